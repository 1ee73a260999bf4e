"""The job pool's gateway to the database: every job statement goes through here.

Claims and completions work in batches (one statement for many jobs): on one database the cost of
a job is dominated by commits, and batching is where every fast Postgres queue found its speed.
Each claim spends an attempt; completion, retry and failure are conditional on (owner, attempt),
so a node that lost its claim cannot finish the job.
"""

from __future__ import annotations

import datetime as dt
import json
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from dsm_node import faults
from dsm_node.db.queries import Q
from dsm_node.jobs import states
from dsm_node.jobs.registry import REGISTRY, Payload, Registry


@dataclass
class NewJob:
    type: str
    payload: Payload
    priority: int | None = None
    run_at: dt.datetime | None = None
    delay_seconds: float = 0.0
    max_attempts: int | None = None
    timeout_seconds: float | None = None
    unique_key: str | None = None


@dataclass(frozen=True)
class ClaimedJob:
    id: int
    type: str
    payload: Payload
    attempt: int  # the claim's number: with the owner, the fencing token (never repeats)
    counted_attempt: int  # attempts counted against max_attempts (released claims are not)
    max_attempts: int
    timeout_seconds: float
    local: bool
    waited_seconds: float


@dataclass(frozen=True)
class EnqueueResult:
    ids: list[int]
    duplicates: int


@dataclass(frozen=True)
class JobRecord:
    """One job, waiting, running or finished (``attempt`` counts against ``max_attempts``;
    ``max_attempts`` is None once finished)."""

    id: int
    type: str
    payload: Payload
    state: states.PublicState
    priority: int
    attempt: int
    max_attempts: int | None
    node_id: int | None  # the node running it, or the one that finished it
    target_node_id: int | None  # a local job's node
    created_at: dt.datetime
    run_at: dt.datetime | None
    claimed_at: dt.datetime | None
    finished_at: dt.datetime | None
    error: str | None


@dataclass(frozen=True)
class JobCount:
    """Jobs finished by a node, by type and outcome, over a window."""

    node_id: int
    node: str
    type: str
    outcome: states.Outcome
    jobs: int


@dataclass(frozen=True)
class MinuteCount:
    """Jobs a node finished in one minute (the database's clock), all types and outcomes."""

    node_id: int
    node: str
    minute: dt.datetime
    jobs: int


@dataclass(frozen=True)
class Activity:
    """Jobs per node and minute over a window, and the database's clock when they were read
    (which minute is "this minute")."""

    db_now: dt.datetime
    minutes: list[MinuteCount]


@dataclass(frozen=True)
class QueueDepth:
    type: str
    state: states.JobState
    jobs: int


class JobPool:
    def __init__(self, engine: AsyncEngine, registry: Registry = REGISTRY) -> None:
        self.engine = engine
        self.registry = registry

    # -- producing -------------------------------------------------------------------------

    def validate(self, job: NewJob) -> NewJob:
        """Raises ValueError (readable) for an unknown type or a payload the type refuses."""
        jt = self.registry.get(job.type)
        job.payload = jt.validate(job.payload)
        if job.max_attempts is not None and job.max_attempts < 1:
            raise ValueError("maxAttempts must be at least 1")
        if job.timeout_seconds is not None and job.timeout_seconds <= 0:
            raise ValueError("timeoutSeconds must be positive")
        return job

    async def enqueue(
        self,
        jobs: list[NewJob],
        also: Callable[[AsyncConnection, EnqueueResult], Awaitable[None]] | None = None,
    ) -> EnqueueResult:
        """Stores jobs atomically: all of them or, on any error, none. ``also`` runs in the same
        transaction (the API's audit entry commits with the jobs, or neither does)."""
        for j in jobs:
            self.validate(j)
        plain = [j for j in jobs if not self.registry.get(j.type).local]
        local = [j for j in jobs if self.registry.get(j.type).local]
        async with self.engine.begin() as conn:
            plain_ids = await self._enqueue_plain(conn, plain) if plain else []
            ids = list(plain_ids)
            for j in local:
                ids += await self._enqueue_local(conn, j)
            result = EnqueueResult(ids, duplicates=len(plain) - len(plain_ids))
            if also is not None:
                await also(conn, result)
            if ids:
                await conn.execute(Q.notify_jobs)
        return result

    async def _enqueue_plain(self, conn: AsyncConnection, jobs: list[NewJob]) -> list[int]:
        types = [self.registry.get(j.type) for j in jobs]
        rows = await conn.execute(
            Q.enqueue_jobs,
            {
                "types": [j.type for j in jobs],
                "payloads": [json.dumps(j.payload) for j in jobs],
                "priorities": [
                    j.priority if j.priority is not None else t.priority
                    for j, t in zip(jobs, types, strict=True)
                ],
                "run_ats": [j.run_at for j in jobs],
                "delays": [float(j.delay_seconds) for j in jobs],
                "max_attempts": [
                    int(j.max_attempts or t.max_attempts) for j, t in zip(jobs, types, strict=True)
                ],
                # float(): a type's default may be an int; psycopg refuses a list of mixed types
                "timeouts": [
                    float(j.timeout_seconds or t.timeout) for j, t in zip(jobs, types, strict=True)
                ],
                "unique_keys": [j.unique_key for j in jobs],
            },
        )
        return [int(r.id) for r in rows]

    async def _enqueue_local(self, conn: AsyncConnection, j: NewJob) -> list[int]:
        t = self.registry.get(j.type)
        rows = await conn.execute(
            Q.enqueue_local_job,
            {
                "type": j.type,
                "payload": json.dumps(j.payload),
                "priority": j.priority if j.priority is not None else t.priority,
                "max_attempts": j.max_attempts or t.max_attempts,
                "timeout": float(j.timeout_seconds or t.timeout),
                "unique_key": j.unique_key,
            },
        )
        return [int(r.id) for r in rows]

    async def schedule_periodic(self) -> list[int]:
        """Enqueues the current period's run of every periodic task that has none yet."""
        ids: list[int] = []
        async with self.engine.begin() as conn:
            for p in self.registry.periodic.values():
                t = self.registry.get(p.job_type)
                rows = await conn.execute(
                    Q.schedule_periodic,
                    {
                        "every": p.every,
                        "name": p.name,
                        "type": p.job_type,
                        "payload": json.dumps(p.payload),
                        "max_attempts": t.max_attempts,
                        "timeout": t.timeout,
                    },
                )
                ids += [int(r.id) for r in rows]
            if ids:
                await conn.execute(Q.notify_jobs)
        return ids

    # -- consuming -------------------------------------------------------------------------

    async def claim(self, node_id: int, epoch: int, limit: int) -> list[ClaimedJob]:
        async with self.engine.begin() as conn:
            await conn.execute(Q.claim_plan)  # keeps the claim on the index (see queries.sql)
            rows = await conn.execute(
                Q.claim_jobs, {"node_id": node_id, "epoch": epoch, "limit": limit}
            )
            return [
                ClaimedJob(
                    int(r.id),
                    r.type,
                    r.payload,
                    int(r.attempt),
                    int(r.counted_attempt),
                    int(r.max_attempts),
                    float(r.timeout_seconds),
                    r.target_node is not None,
                    float(r.waited_seconds),
                )
                for r in rows
            ]

    async def complete(self, node_id: int, done: list[tuple[int, int]]) -> set[int]:
        """Finishes successful jobs in one statement; returns the ids this node still owned."""
        async with self.engine.begin() as conn:
            return await self.complete_in(conn, node_id, done)

    @staticmethod
    async def complete_in(
        conn: AsyncConnection, node_id: int, done: list[tuple[int, int]]
    ) -> set[int]:
        rows = await conn.execute(
            Q.finish_jobs,
            {
                "node_id": node_id,
                "ids": [i for i, _ in done],
                "attempts": [a for _, a in done],
                "outcome": states.Outcome.SUCCEEDED.value,
                "error": None,
            },
        )
        finished = {int(r.id) for r in rows}
        await faults.point("completion")  # rows deleted, locks held, not committed yet
        return finished

    async def fail(
        self,
        node_id: int,
        job: ClaimedJob,
        error: str,
        backoff: states.Backoff,
        rnd: random.Random | None = None,
    ) -> states.AttemptEnd | None:
        """Records a failed attempt: ``RETRYING`` or ``FAILED``, or None when the claim was
        lost."""
        decision = states.after_failure(job.counted_attempt, job.max_attempts, backoff, rnd)
        stored = storable_text(error)[:4000]
        async with self.engine.begin() as conn:
            if decision.retry:
                row = (
                    await conn.execute(
                        Q.retry_job,
                        {
                            "id": job.id,
                            "attempt": job.attempt,
                            "node_id": node_id,
                            "error": stored,
                            "delay": decision.delay_seconds,
                        },
                    )
                ).first()
                return states.AttemptEnd.RETRYING if row else None
            row = (
                await conn.execute(
                    Q.finish_jobs,
                    {
                        "node_id": node_id,
                        "ids": [job.id],
                        "attempts": [job.attempt],
                        "outcome": states.Outcome.FAILED.value,
                        "error": stored,
                    },
                )
            ).first()
            return states.AttemptEnd.FAILED if row else None

    async def release(self, node_id: int, held: list[tuple[int, int]], reason: str) -> int:
        """Returns running jobs, given as (id, attempt), to the pool without counting the attempt
        (a release is not a failure); jobs this node no longer holds are left alone."""
        if not held:
            return 0
        async with self.engine.begin() as conn:
            rows = await conn.execute(
                Q.release_jobs,
                {
                    "node_id": node_id,
                    "ids": [i for i, _ in held],
                    "attempts": [a for _, a in held],
                    "reason": reason,
                },
            )
            return len(rows.all())

    # -- reading ---------------------------------------------------------------------------

    async def get(self, job_id: int) -> JobRecord | None:
        async with self.engine.connect() as conn:
            r = (await conn.execute(Q.get_job, {"id": job_id})).first()
        if r is None:
            return None
        state = states.JobState(r.state) if r.state is not None else None
        outcome = states.Outcome(r.outcome) if r.outcome is not None else None
        return JobRecord(
            id=int(r.id),
            type=r.type,
            payload=r.payload,
            state=states.public_state(
                state, outcome, int(r.attempt), r.run_at is not None and r.run_at > r.db_now
            ),
            priority=int(r.priority),
            attempt=int(r.attempt),
            max_attempts=r.max_attempts,
            node_id=r.node_id,
            target_node_id=r.target_node,
            created_at=r.created_at,
            run_at=r.run_at,
            claimed_at=r.claimed_at,
            finished_at=r.finished_at,
            error=r.error,
        )

    async def stats(self, window_seconds: float) -> list[JobCount]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(Q.job_stats, {"window": window_seconds})
            return [
                JobCount(
                    int(r.node_id),
                    r.node or f"node-{r.node_id}",
                    r.type,
                    states.Outcome(r.outcome),
                    int(r.jobs),
                )
                for r in rows
            ]

    async def activity(self, window_seconds: int) -> Activity:
        """Jobs finished per node and minute over the window (rolled-up minutes and the raw
        tail, like ``stats``): the console's activity graph."""
        async with self.engine.connect() as conn:
            now: dt.datetime = (await conn.execute(Q.db_clock)).one().db_now
            rows = await conn.execute(Q.job_activity_by_minute, {"window": window_seconds})
            minutes = [
                MinuteCount(int(r.node_id), r.node or f"node-{r.node_id}", r.minute, int(r.jobs))
                for r in rows
            ]
        return Activity(now, minutes)

    async def queue_depth(self) -> list[QueueDepth]:
        async with self.engine.connect() as conn:
            return [
                QueueDepth(r.type, states.JobState(r.state), int(r.n))
                for r in await conn.execute(Q.queue_depth)
            ]

    # -- housekeeping, in a transactional job's transaction ---------------------------------

    @staticmethod
    async def roll_up_counts(conn: AsyncConnection) -> tuple[int, int]:
        """Rolls closed minutes of job_history into per-minute counts; returns (jobs counted,
        rows written)."""
        row = (await conn.execute(Q.rollup_job_counts)).one()
        return int(row.jobs_counted), int(row.rows_written)

    @staticmethod
    async def prune(
        conn: AsyncConnection, history_seconds: float, counts_seconds: float, batch: int = 10_000
    ) -> tuple[int, int]:
        """Deletes finished jobs and per-minute counts past their retention (never rows not
        rolled up yet), and old periodic slots; returns (jobs, counts) deleted."""
        total = 0
        while True:
            r = await conn.execute(
                Q.prune_job_history, {"retention": history_seconds, "batch": batch}
            )
            total += r.rowcount
            if r.rowcount < batch:
                break
        counts = await conn.execute(Q.prune_job_counts, {"retention": counts_seconds})
        await conn.execute(Q.prune_periodic_runs, {"retention": history_seconds})
        return total, counts.rowcount


def storable_text(s: str) -> str:
    """PostgreSQL text cannot hold NUL (an error message may): a recording must not fail on it."""
    return s.replace("\x00", "\\0").encode("utf-8", "backslashreplace").decode("utf-8")
