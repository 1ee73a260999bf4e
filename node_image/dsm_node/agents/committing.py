"""Group commit: concurrent heartbeats on a node are written together, one transaction per batch,
and each is answered only after its batch committed.

On one database the cost of a small write is its commit (a WAL flush); a batch of a few hundred
heartbeats with ten events each costs one flush. Batches form by themselves: a committer takes
what is waiting (at most ``max_batch``), waiting at most ``max_wait`` after the first heartbeat for
more, and while it commits the next committer collects the next batch. ``max_batch=1`` with many
committers is the one-transaction-per-heartbeat baseline the benchmark compares with.

A batch never holds two heartbeats of one agent (the second waits for the next batch: their
sequence checks depend on each other). A batch that fails because of one heartbeat's data is
retried one heartbeat at a time, so one bad heartbeat costs no other its answer; a database that
cannot be reached fails the batch with 503, and the agents try another node.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from dsm_node.agents.protocol import ProtocolError
from dsm_node.agents.store import BatchResult, Outcome, Pending
from dsm_node.db.engine import database_unavailable

log = logging.getLogger("dsm.agents")

Record = Callable[[list[Pending]], Awaitable[BatchResult]]


@dataclass
class Stats:
    batches: int = 0
    heartbeats: int = 0
    events_stored: int = 0
    largest_batch: int = 0
    sizes: collections.deque[int] = field(default_factory=lambda: collections.deque(maxlen=1000))


class GroupCommitter:
    def __init__(
        self, record: Record, *, max_batch: int = 500, max_wait: float = 0.005, committers: int = 2
    ) -> None:
        self._record = record
        self.max_batch, self.max_wait, self.committers = max_batch, max_wait, committers
        self._queue: collections.deque[tuple[Pending, asyncio.Future[Outcome]]] = (
            collections.deque()
        )
        self._arrived = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.stats = Stats()
        self.on_batch: Callable[[int, int, float], None] | None = None

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._committer()) for _ in range(self.committers)]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        while self._queue:
            _, fut = self._queue.popleft()
            if not fut.done():
                fut.set_result(ProtocolError(503, "shutting_down", "the node is stopping"))

    async def submit(self, pending: Pending) -> Outcome:
        fut: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._queue.append((pending, fut))
        self._arrived.set()
        # The answer is the batch's: a client that goes away does not undo its commit.
        return await asyncio.shield(fut)

    def _take(self) -> list[tuple[Pending, asyncio.Future[Outcome]]]:
        batch: list[tuple[Pending, asyncio.Future[Outcome]]] = []
        seen: set[int] = set()
        held: list[tuple[Pending, asyncio.Future[Outcome]]] = []
        while self._queue and len(batch) < self.max_batch:
            item = self._queue.popleft()
            if item[0].agent_id in seen:
                held.append(item)
            else:
                seen.add(item[0].agent_id)
                batch.append(item)
        self._queue.extendleft(reversed(held))
        if not self._queue:
            self._arrived.clear()
        return batch

    async def _committer(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._arrived.wait()
            if not self._queue:
                self._arrived.clear()
                continue
            if self.max_wait > 0 and len(self._queue) < self.max_batch:
                await asyncio.sleep(self.max_wait)
            batch = self._take()
            if not batch:
                continue
            started = loop.time()
            results = await self._commit([p for p, _ in batch])
            for (_, fut), outcome in zip(batch, results.outcomes, strict=True):
                if not fut.done():
                    fut.set_result(outcome)
            s = self.stats
            s.batches += 1
            s.heartbeats += len(batch)
            s.events_stored += results.events_stored
            s.largest_batch = max(s.largest_batch, len(batch))
            s.sizes.append(len(batch))
            if self.on_batch is not None:
                self.on_batch(len(batch), results.events_stored, loop.time() - started)

    async def _commit(self, batch: list[Pending]) -> BatchResult:
        try:
            return await self._record(batch)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            if database_unavailable(e):
                _warn(f"database unavailable: {_first_line(e)}")
                refusal = ProtocolError(503, "database_unavailable", "database unavailable")
                return BatchResult([refusal] * len(batch), 0)
            if len(batch) == 1:
                log.warning(
                    "heartbeat of agent %d could not be stored: %s",
                    batch[0].agent_id,
                    _first_line(e),
                )
                return BatchResult(
                    [ProtocolError(400, "unstorable", f"cannot be stored: {_first_line(e)}")], 0
                )
        # One heartbeat's data broke the batch: one at a time, so only it is refused.
        outcomes: list[Outcome] = []
        stored = 0
        for p in batch:
            r = await self._commit([p])
            outcomes += r.outcomes
            stored += r.events_stored
        return BatchResult(outcomes, stored)


_last_warning = [0.0]


def _warn(message: str) -> None:
    """At most one line every 10 s: an outage must not flood the log."""
    now = time.monotonic()
    if now - _last_warning[0] >= 10:
        _last_warning[0] = now
        log.warning("heartbeats refused: %s", message)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
