"""Test-only fault points: freeze a node at an exact moment, such as inside a transaction.

The worst moment for a node to stop (a VM pause, a SIGSTOP, a network partition without a reset)
is while it holds row locks that its peers need. Such a moment lasts microseconds, so a test cannot
hit it from outside by timing a signal. Instead the node's code names a few such moments with
``await faults.point(name)``:

- ``completion``: a completion statement has deleted the finished job rows, before the commit;
- ``heartbeat``: the heartbeat has updated this node's row, before the commit;
- ``sweep``: a sweep statement has updated peers' rows, before the commit;
- ``startup``: the node has registered itself Online and not yet built its services.

Nothing happens unless the node was started with ``DSM_TEST_FAULT_FILE`` set (one comparison per
call otherwise). With it, a test writes point names into that file (for example
``completion heartbeat``); the next time every named point is reached at the same time, each
waiting inside its open transaction, the node deletes the file and stops itself with SIGSTOP.
The test observes the stop, checks the locks held (``pg_locks``), and sends SIGCONT when it likes.

A name written as ``name=hang`` (for example ``sweep=hang``) instead makes that point wait, inside
its transaction, for as long as the file says so: only that task is stuck, the process runs on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal

log = logging.getLogger("dsm.faults")

_FILE = os.environ.get("DSM_TEST_FAULT_FILE") or None
# Each waiting point, and the event that lets it go once the process has been stopped and resumed.
_reached: dict[str, asyncio.Event] = {}
# How long a point waits for its companions before carrying on normally (it waits again the next
# time it is reached): short, so that the wait itself never holds a transaction open long enough
# for the server to end it.
MEET_TIMEOUT_SECONDS = 0.5


def _armed() -> set[str]:
    assert _FILE is not None
    try:
        with open(_FILE) as f:
            return set(f.read().split())
    except FileNotFoundError:
        return set()


async def point(name: str) -> None:
    """A named moment in the node's work; see the module docstring."""
    if _FILE is None:
        return
    wanted = _armed()
    if f"{name}=hang" in wanted:
        log.warning("fault: %s hangs", name)
        while f"{name}=hang" in _armed():  # noqa: ASYNC110 (the test edits a file, no event)
            await asyncio.sleep(0.1)
        log.warning("fault: %s goes on", name)
        return
    if name not in wanted or name in _reached:
        return
    released = _reached[name] = asyncio.Event()
    try:
        if set(_reached) >= wanted:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(_FILE)
            log.warning("fault: stopping this process at %s", ", ".join(sorted(wanted)))
            for h in logging.getLogger().handlers:
                h.flush()
            os.kill(os.getpid(), signal.SIGSTOP)
            log.warning("fault: resumed")
            for event in _reached.values():
                event.set()
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(MEET_TIMEOUT_SECONDS):
                await released.wait()
    finally:
        _reached.pop(name, None)


def enabled() -> bool:
    return _FILE is not None
