"""The loop that claims jobs for this node and runs them.

One claim statement fetches up to ``batch`` jobs (never more than free slots); each job runs as its
own asyncio task so slow jobs do not hold up fast ones. Successful plain jobs are finished by a
batch completer (one statement for many jobs); transactional jobs finish inside their own
transaction. The loop sleeps on a NOTIFY from enqueuers, with polling as the fallback.

A job's outcome is never forgotten: an outcome that could not be written (the database was away
for a moment) is kept and written again, with the job's fencing token, until it is written or the
token is refused (another node holds the job now). A job's time limit counts from its claim,
waiting for a free transaction slot included, so the node gives up on a job no later than the
database's deadline, after which any node's sweep may return the job to the pool.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dsm_node import metrics
from dsm_node.cluster.membership import Identity
from dsm_node.db.engine import database_unavailable
from dsm_node.jobs import states
from dsm_node.jobs.pool import ClaimedJob, JobPool
from dsm_node.jobs.registry import JobContext, UnknownJobType
from dsm_node.jobs.states import AttemptEnd
from dsm_node.services import JobServices

log = logging.getLogger("dsm.jobs")


class LostClaim(Exception):
    """Another node holds this job now (this node was declared offline); the work is undone."""


@dataclass
class WorkerConfig:
    concurrency: int = 64
    batch: int = 32
    poll_interval: float = 1.0
    completion_flush_interval: float = 0.005
    transactional_concurrency: int = 8
    backoff: states.Backoff = field(default_factory=states.Backoff)


class Worker:
    def __init__(
        self,
        pool: JobPool,
        identity: Callable[[], Identity],
        services: JobServices,
        config: WorkerConfig,
    ) -> None:
        self.pool = pool
        self.identity = identity
        self.services = services
        self.config = config
        self.running: dict[int, tuple[ClaimedJob, asyncio.Task[None]]] = {}
        self._wake = asyncio.Event()
        self._slot_freed = asyncio.Event()
        self._pending_done: list[tuple[int, int, str]] = []
        # failures not written yet, by (job id, attempt): (node id, job, error)
        self._unrecorded: dict[tuple[int, int], tuple[int, ClaimedJob, str]] = {}
        self._done_ready = asyncio.Event()
        self._paused_reason: str | None = "starting"
        self._stopping = False
        self._abandoned: list[tuple[int, int]] = []  # (job id, attempt) of jobs cancelled
        self._tx_slots = asyncio.Semaphore(config.transactional_concurrency)
        # Held while a claim is out (committed or not, not yet back): drain waits for it.
        self._claim_out = asyncio.Lock()

    # -- control --------------------------------------------------------------------------

    def wake(self) -> None:
        self._wake.set()

    def pause(self, reason: str) -> None:
        if self._paused_reason is None:
            log.warning("stopped claiming jobs: %s", reason)
        self._paused_reason = reason

    def resume(self) -> None:
        if self._paused_reason is not None and self._paused_reason != "starting":
            log.info("claiming jobs again")
        self._paused_reason = None
        self.wake()

    @property
    def claiming(self) -> bool:
        return self._paused_reason is None and not self._stopping

    def abandon_running(self, reason: str) -> list[int]:
        """Cancels every running job (this node may no longer finish them)."""
        held = [(job.id, job.attempt) for job, _ in self.running.values()]
        for _, task in list(self.running.values()):
            task.cancel()
        if held:
            log.warning("abandoned %d running jobs: %s", len(held), reason)
        self._abandoned += held
        return [i for i, _ in held]

    def take_abandoned(self) -> list[tuple[int, int]]:
        """The (id, attempt) of abandoned jobs not yet released; the caller releases them (and
        hands them back with ``keep_abandoned`` when it could not)."""
        held, self._abandoned = self._abandoned, []
        return held

    def keep_abandoned(self, held: list[tuple[int, int]]) -> None:
        self._abandoned = held + self._abandoned

    @property
    def unrecorded_outcomes(self) -> int:
        """Outcomes waiting to be written (completions and failures)."""
        return len(self._pending_done) + len(self._unrecorded)

    # -- claim loop -----------------------------------------------------------------------

    async def run(self) -> None:
        cfg = self.config
        while not self._stopping:
            if not self.claiming:
                await self._sleep(self._wake, cfg.poll_interval)
                continue
            free = cfg.concurrency - len(self.running)
            if free < min(cfg.batch, cfg.concurrency) // 2 or free <= 0:
                await self._sleep(self._slot_freed, cfg.poll_interval)
                continue
            want = min(free, cfg.batch)
            me = self.identity()
            started = time.perf_counter()
            # Time limits count from before the claim: never later than the database's deadline.
            claimed_before = asyncio.get_running_loop().time()
            try:
                async with self._claim_out:
                    if not self.claiming:  # stopped or paused while this loop was not looking
                        continue
                    jobs = await self.pool.claim(me.node_id, me.epoch, want)
            except Exception as e:  # the database is away; membership decides what that means
                log.warning("claim failed: %s", _short(e))
                await asyncio.sleep(cfg.poll_interval)
                continue
            metrics.CLAIM_SECONDS.observe(time.perf_counter() - started)
            if not self.claiming:
                # Paused (fenced) or stopping while the claim was out: its jobs are this node's
                # now, but it may not start them; they join the abandoned jobs, released (no
                # attempt spent) by drain or once the lease is renewed.
                if jobs:
                    log.warning(
                        "%d jobs claimed just before this node stopped claiming: not started",
                        len(jobs),
                    )
                self._abandoned += [(job.id, job.attempt) for job in jobs]
                continue
            for job in jobs:
                _child(metrics.QUEUE_WAIT_SECONDS, job.type).observe(max(0.0, job.waited_seconds))
                task = asyncio.create_task(
                    self._execute(me, job, claimed_before + job.timeout_seconds),
                    name=f"job-{job.id}",
                )
                self.running[job.id] = (job, task)
            if len(jobs) < want:
                await self._sleep(self._wake, cfg.poll_interval)

    async def _sleep(self, event: asyncio.Event, seconds: float) -> None:
        """Waits for the event or the time, whichever comes first."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await event.wait()
        event.clear()

    # -- running one job ------------------------------------------------------------------

    async def _execute(self, me: Identity, job: ClaimedJob, deadline: float) -> None:
        """Runs one job until ``deadline`` (event-loop time) and records its outcome."""
        started = time.perf_counter()
        outcome: AttemptEnd | None = AttemptEnd.SUCCEEDED
        try:
            jt = self.pool.registry.get(job.type)
            ctx = JobContext(job.id, job.counted_attempt, me.name, self.services)
            if jt.transactional:
                async with contextlib.AsyncExitStack() as stack:
                    async with asyncio.timeout_at(deadline):  # a free slot is part of the time
                        await stack.enter_async_context(self._tx_slots)
                        conn = await stack.enter_async_context(self.pool.engine.begin())
                        ctx.conn = conn
                        await jt.handler(ctx, job.payload)
                    if not await self.pool.complete_in(conn, me.node_id, [(job.id, job.attempt)]):
                        raise LostClaim()
            else:
                async with asyncio.timeout_at(deadline):
                    await jt.handler(ctx, job.payload)
                self._pending_done.append((job.id, job.attempt, job.type))
                self._done_ready.set()
                outcome = None  # counted when the completion is written
        except LostClaim:
            outcome = AttemptEnd.LOST
            log.warning(
                "job %d (%s): claim lost to another node; its work was rolled back",
                job.id,
                job.type,
            )
        except asyncio.CancelledError:
            outcome = AttemptEnd.ABANDONED
            raise
        except Exception as e:
            error = (
                f"timed out after {job.timeout_seconds:g} s"
                if isinstance(e, TimeoutError)
                else str(e)
                if isinstance(e, UnknownJobType)
                else f"{type(e).__name__}: {e}"
            )
            outcome = await self._record_failure(me, job, error)
        finally:
            self.running.pop(job.id, None)
            self._slot_freed.set()
            if outcome:
                _child(metrics.JOBS, job.type, outcome).inc()
            _child(metrics.JOB_SECONDS, job.type).observe(time.perf_counter() - started)

    async def _record_failure(self, me: Identity, job: ClaimedJob, error: str) -> AttemptEnd | None:
        """Writes a failed attempt; returns the outcome to count, or None when the failure is
        kept to be written again later (it is counted then)."""
        try:
            result = await self.pool.fail(me.node_id, job, error, self.config.backoff)
        except Exception as e:
            if not database_unavailable(e):
                log.error(
                    "job %d (%s): cannot record its failure (%s); its deadline returns it to the "
                    "pool",
                    job.id,
                    job.type,
                    _short(e),
                )
                return AttemptEnd.LOST
            log.warning(
                "job %d (%s): could not record failure yet, will retry: %s",
                job.id,
                job.type,
                _short(e),
            )
            self._unrecorded[(job.id, job.attempt)] = (me.node_id, job, error)
            self._done_ready.set()
            return None
        return _report_failure(job, error, result)

    async def flush_failures(self) -> bool:
        """Writes the failures kept from earlier; False when the database is still away."""
        for key, (node_id, job, error) in list(self._unrecorded.items()):
            try:
                result = await self.pool.fail(node_id, job, error, self.config.backoff)
            except Exception as e:
                if database_unavailable(e):
                    return False
                log.error(
                    "job %d (%s): cannot record its failure (%s); its deadline returns it to the "
                    "pool",
                    job.id,
                    job.type,
                    _short(e),
                )
                result = None
            del self._unrecorded[key]
            _child(metrics.JOBS, job.type, _report_failure(job, error, result)).inc()
        return True

    # -- batch completer ------------------------------------------------------------------

    async def record_outcomes_forever(self) -> None:
        """Writes completions in batches, and failures that could not be written at once."""
        while True:
            await self._done_ready.wait()
            if len(self._pending_done) < self.config.batch and not self._stopping:
                await asyncio.sleep(self.config.completion_flush_interval)
            written = await self.flush_completions()
            if written and self._unrecorded:
                written = await self.flush_failures()
            if not written:  # the database is away: try again after a pause
                await asyncio.sleep(self.config.poll_interval)
                self._done_ready.set()

    async def flush_completions(self) -> bool:
        """Writes pending completions; False when the database is away (they stay pending)."""
        self._done_ready.clear()
        if not self._pending_done:
            return True
        batch, self._pending_done = self._pending_done, []
        me = self.identity()
        try:
            done = await self.pool.complete(me.node_id, [(i, a) for i, a, _ in batch])
        except Exception as e:
            if not database_unavailable(e):
                log.error(
                    "cannot record %d completions (%s); their deadline returns them to the pool",
                    len(batch),
                    _short(e),
                )
                return True
            log.warning(
                "could not record %d completions yet, will retry: %s", len(batch), _short(e)
            )
            self._pending_done = batch + self._pending_done  # retried on the next flush
            return False
        counts = collections.Counter(
            (job_type, AttemptEnd.SUCCEEDED if job_id in done else AttemptEnd.LOST)
            for job_id, _, job_type in batch
        )
        for labels, n in counts.items():
            _child(metrics.JOBS, *labels).inc(n)
        if len(done) < len(batch):
            log.warning(
                "%d completed jobs had been taken over by other nodes; their results were dropped",
                len(batch) - len(done),
            )
        return True

    # -- shutdown -------------------------------------------------------------------------

    async def drain(self, grace_seconds: float) -> list[tuple[int, int]]:
        """Stops claiming, waits up to the grace period, cancels what still runs; returns the
        (id, attempt) of jobs cut short (to be released back to the pool), and of jobs a claim
        that was out when the stop began brought back (not started).

        A claim that is out is waited for (its statement is bounded by the engine's timeouts):
        its jobs are claimed in the database, and returning without them would leave them to
        the takeover after ``leave``, which spends an attempt."""
        self._stopping = True
        self.wake()
        self._slot_freed.set()
        async with self._claim_out:
            pass
        tasks = [t for _, t in self.running.values()]
        if tasks:
            log.info("waiting up to %g s for %d running jobs", grace_seconds, len(tasks))
            _, pending = await asyncio.wait(tasks, timeout=grace_seconds)
            cut = [(job.id, job.attempt) for job, t in list(self.running.values()) if t in pending]
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        else:
            cut = []
        if await self.flush_completions():
            await self.flush_failures()
        return cut + self.take_abandoned()


def _report_failure(job: ClaimedJob, error: str, result: AttemptEnd | None) -> AttemptEnd:
    """Logs a written failure; returns the outcome to count (``LOST`` when fenced out)."""
    if result is None:
        log.warning(
            "job %d (%s) attempt %d failed (%s), but another node holds it now: not recorded",
            job.id,
            job.type,
            job.counted_attempt,
            error,
        )
        return AttemptEnd.LOST
    level = logging.WARNING if result is AttemptEnd.RETRYING else logging.ERROR
    log.log(
        level,
        "job %d (%s) attempt %d/%d failed, %s: %s",
        job.id,
        job.type,
        job.counted_attempt,
        job.max_attempts,
        result,
        error,
    )
    return result


_children: dict[tuple[object, tuple[str, ...]], Any] = {}


def _child(metric: Any, *labels: str) -> Any:
    """``metric.labels(*labels)``, cached: the lookup costs more than the observation."""
    key = (metric, labels)
    child = _children.get(key)
    if child is None:
        child = _children[key] = metric.labels(*labels)
    return child


def _short(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
