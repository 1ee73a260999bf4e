"""Waiting for a condition, with a deadline instead of a fixed sleep: the one polling helper.

Offers :func:`wait_until` (poll a check until it returns something truthy, return that value) and
:class:`TimedOut` (what it raises: an ``AssertionError``, so a test that times out fails rather
than errors, naming what it waited for).

Use it where nothing can be waited on directly (a process's HTTP endpoint, a row, an API object);
where something can -- a watch, a condition variable, a queue -- wait on that instead
(``tests.k8s.podwatch`` does). The deadline bounds a failure, it is not an assertion on speed:
pick one that a loaded two-core machine meets with room to spare.

The delay between checks starts at 50 ms and doubles up to ``interval``, so a condition that is
already true or soon true costs little and a slow one is not polled hard.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

FIRST_DELAY = 0.05


class TimedOut(AssertionError):
    """The condition did not hold before the deadline (the message names it and its last value)."""


def wait_until(
    check: Callable[[], T | None],
    timeout: float,
    what: str,
    detail: Callable[[], str] | None = None,
    interval: float = 0.1,
) -> T:
    """Call ``check`` until it returns something truthy and return that value.

    After ``timeout`` seconds raise :class:`TimedOut` naming ``what``, the last value when it says
    more than false, and ``detail()`` (a log tail, say). An exception ``check`` raises ends the
    wait at once: a check raises when waiting longer cannot help (the process died).
    """
    deadline = time.monotonic() + timeout
    delay = min(FIRST_DELAY, interval)
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            last = "" if value in (None, False) else f" (last: {value!r})"
            extra = f"\n{detail()}" if detail is not None else ""
            raise TimedOut(f"timed out after {timeout:g} s waiting for {what}{last}{extra}")
        time.sleep(delay)
        delay = min(delay * 2, interval)
