"""The worker's claim loop against a real PostgreSQL, in process, with a claim held up between
its commit and its return: the worst moment for a graceful stop or a fence to arrive. Jobs that
claim brings back must not start, and must be handed back for release (no attempt spent)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any, cast

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from dsm_node.cluster.membership import Identity, Membership
from dsm_node.db.engine import create_engine
from dsm_node.jobs import builtin  # noqa: F401  (registers sleep)
from dsm_node.jobs.pool import ClaimedJob, JobPool, NewJob
from dsm_node.jobs.worker import Worker, WorkerConfig
from dsm_node.services import JobServices

pytestmark = pytest.mark.integration


class HeldClaims(JobPool):
    """A pool whose claims, once committed, wait for ``go`` before they return."""

    def __init__(self, engine: AsyncEngine) -> None:
        super().__init__(engine)
        self.committed = asyncio.Event()
        self.go = asyncio.Event()
        self.returned = asyncio.Event()

    async def claim(self, node_id: int, epoch: int, limit: int) -> list[ClaimedJob]:
        jobs = await super().claim(node_id, epoch, limit)
        if jobs:
            self.committed.set()
            await self.go.wait()
            self.returned.set()
        return jobs


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    e = create_engine(database_url, pool_size=4)
    yield e
    await e.dispose()


async def started_worker(
    engine: AsyncEngine,
) -> tuple[HeldClaims, Worker, Identity, asyncio.Task[None], int]:
    me = await Membership(engine).register("w", "127.0.0.1", 4119, "0.1.0")
    pool = HeldClaims(engine)
    (job_id,) = (await pool.enqueue([NewJob("sleep", {"seconds": 600}, max_attempts=2)])).ids
    services = JobServices("w", engine, cast(Any, None), cast(Any, None), cast(Any, None))
    worker = Worker(pool, lambda: me, services, WorkerConfig(poll_interval=0.1))
    run = asyncio.create_task(worker.run())
    worker.resume()
    await asyncio.wait_for(pool.committed.wait(), 30)  # the job is claimed, the claim not back
    return pool, worker, me, run, job_id


async def counted(engine: AsyncEngine, job_id: int) -> tuple[str, int]:
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                text("SELECT state, attempt - released_claims FROM jobs WHERE id = :id"),
                {"id": job_id},
            )
        ).one()
    return str(row[0]), int(row[1])


async def stop(run: asyncio.Task[None]) -> None:
    run.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await run


async def test_a_graceful_stop_releases_a_job_claimed_while_it_began(
    engine: AsyncEngine,
) -> None:
    pool, worker, me, run, job_id = await started_worker(engine)
    try:
        draining = asyncio.create_task(worker.drain(0.2))
        await asyncio.sleep(0.5)  # the grace period is over while the claim is still out
        pool.go.set()
        cut = await asyncio.wait_for(draining, 30)
        assert worker.running == {}, "a job claimed during the stop was started"
        assert [i for i, _ in cut] == [job_id], "the job claimed during the stop is not released"
        assert await pool.release(me.node_id, cut, "released at shutdown") == 1
        assert await counted(engine, job_id) == ("ready", 0)  # no attempt spent
    finally:
        await stop(run)


async def test_a_claim_that_returns_after_a_pause_starts_nothing(engine: AsyncEngine) -> None:
    """A fence (``pause`` then ``abandon_running``) while a claim is out: what it brings back
    joins the abandoned jobs, released once the lease is renewed."""
    pool, worker, me, run, job_id = await started_worker(engine)
    try:
        worker.pause("no heartbeat for 4.1 s")
        assert worker.abandon_running("fenced") == []
        pool.go.set()
        await asyncio.wait_for(pool.returned.wait(), 30)
        await asyncio.sleep(0.1)  # the claim loop handles what came back
        assert worker.running == {}, "a job claimed by a fenced node was started"
        held = worker.take_abandoned()
        assert [i for i, _ in held] == [job_id]
        assert await pool.release(me.node_id, held, "released after a fence") == 1
        assert await counted(engine, job_id) == ("ready", 0)
    finally:
        await stop(run)
