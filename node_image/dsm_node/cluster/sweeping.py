"""The sweep loop: once per heartbeat interval this node declares silent peers offline and returns
their jobs (and any job past its deadline) to the pool (``Membership.sweep``).

It runs apart from the heartbeat: a sweep stuck behind a peer frozen inside its transaction holds
up only the next sweep, never this node's own lease.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from dsm_node import metrics
from dsm_node.cluster.live import LiveSettings
from dsm_node.cluster.membership import Membership
from dsm_node.cluster.timing import Timing

log = logging.getLogger("dsm.node")


async def sweep_forever(
    membership: Membership, live: LiveSettings, active: Callable[[], bool]
) -> None:
    """Sweeps once per interval while ``active()``; a sweep stuck on the database holds up only
    the next sweep."""
    loop = asyncio.get_running_loop()
    sweep: asyncio.Task[None] | None = None
    sweep_started = 0.0
    while True:
        changed = live.watch()
        t = live.timing
        t0 = loop.time()
        if active():
            if sweep is None or sweep.done():
                sweep = asyncio.create_task(sweep_once(membership, t))
                sweep_started = t0
            await asyncio.wait({sweep}, timeout=t.heartbeat_interval)
            if sweep.done():
                if not sweep.cancelled() and (e := sweep.exception()) is not None:
                    log.warning("sweep failed: %s", _first_line(e) or type(e).__name__)
            else:
                log.warning("sweep waiting on the database for %.1f s", loop.time() - sweep_started)
        await live.pause(t.heartbeat_interval - (loop.time() - t0), since=changed)


async def sweep_once(membership: Membership, t: Timing) -> None:
    swept = await membership.sweep(t.offline_threshold, t.deadline_grace)
    for name, silent in swept.offline:
        metrics.TAKEOVERS.inc()
        log.warning("declared %s offline (no heartbeat for %.0f s)", name, silent)
    if swept.requeued or swept.discarded:
        log.warning(
            "took over: %d jobs back in the pool, %d local jobs discarded",
            swept.requeued,
            swept.discarded,
        )
    if swept.expired:
        log.warning(
            "%d running jobs were past their deadline: %d back in the pool, %d out of "
            "attempts (failed)",
            swept.expired,
            swept.expired - swept.dead,
            swept.dead,
        )


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:300]
