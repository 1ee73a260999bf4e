"""Waiting for a condition read from the API, with a deadline instead of a fixed sleep.

Used where no watch fits: a read that must turn true (a status count, an object gone).
The backoff starts at 50 ms so fast conditions cost little, and stops at 0.5 s so slow ones are not
polled hard while the control plane shares two cores with the test.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest


def wait_until(what: str, check: Callable[[], bool], timeout: float = 30) -> None:
    """Call ``check`` until it returns True; fail the test naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    delay = 0.05
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}", pytrace=False)
        time.sleep(delay)
        delay = min(delay * 2, 0.5)
