"""The job pool against a real PostgreSQL, in process: claims, fencing, retries, local and periodic
jobs, statistics. Node processes are exercised in test_node_processes.py."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from dsm_node.cluster.membership import Identity, Membership
from dsm_node.db.engine import create_engine
from dsm_node.jobs import (
    builtin,  # noqa: F401
    states,
)
from dsm_node.jobs.pool import JobPool, NewJob
from dsm_node.jobs.registry import REGISTRY, Periodic, Registry
from tests.support import jobtypes  # noqa: F401
from tests.support.postgres import SWEEP_THRESHOLD, server_up_for

pytestmark = pytest.mark.integration


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    e = create_engine(database_url, pool_size=4)
    await server_up_for(e)  # the tests fake silence by backdating heartbeats
    yield e
    await e.dispose()


@pytest.fixture
def pool(engine: AsyncEngine) -> JobPool:
    return JobPool(engine)


async def register(engine: AsyncEngine, name: str) -> Identity:
    return await Membership(engine).register(name, "127.0.0.1", 4119, "0.1.0")


async def scalar(engine: AsyncEngine, sql: str, **params: object) -> object:
    async with engine.connect() as conn:
        return (await conn.execute(text(sql), params)).scalar()


async def test_claims_respect_priority_then_due_time(pool: JobPool, engine: AsyncEngine) -> None:
    me = await register(engine, "a")
    ids = (
        await pool.enqueue(
            [
                NewJob("noop", {"n": 1}),
                NewJob("noop", {"n": 2}, priority=5),
                NewJob("noop", {"n": 3}, delay_seconds=3600),
                NewJob("noop", {"n": 4}),
            ]
        )
    ).ids
    claimed = await pool.claim(me.node_id, me.epoch, 10)
    assert [j.payload["n"] for j in claimed] == [2, 1, 4]  # the delayed one is not due
    assert all(j.attempt == 1 for j in claimed)
    assert set(ids) - {j.id for j in claimed} == {ids[2]}


async def test_skip_locked_claims_never_overlap(pool: JobPool, engine: AsyncEngine) -> None:
    nodes = [await register(engine, f"n{i}") for i in range(3)]
    await pool.enqueue([NewJob("noop", {}) for _ in range(600)])
    batches = await asyncio.gather(
        *[pool.claim(n.node_id, n.epoch, 50) for n in nodes for _ in range(5)]
    )
    ids = [j.id for b in batches for j in b]
    assert len(ids) == len(set(ids)) == 600


async def test_completion_is_fenced_by_owner_and_attempt(
    pool: JobPool, engine: AsyncEngine
) -> None:
    a, b = await register(engine, "a"), await register(engine, "b")
    (job_id,) = (await pool.enqueue([NewJob("noop", {})])).ids
    (first,) = await pool.claim(a.node_id, a.epoch, 1)
    # a goes silent; a peer declares it offline and takes the job over
    await engine.dispose()
    async with engine.begin() as conn:
        await conn.execute(
            text("UPDATE nodes SET last_heartbeat = now() - interval '1 hour' WHERE id = :id"),
            {"id": a.node_id},
        )
    swept = await Membership(engine).sweep(
        threshold_seconds=SWEEP_THRESHOLD, deadline_grace_seconds=60
    )
    assert swept.offline[0][0] == "a" and swept.requeued == 1
    (second,) = await pool.claim(b.node_id, b.epoch, 1)
    assert second.id == job_id and second.attempt == first.attempt + 1
    # a wakes up and tries to finish: nothing happens
    assert await pool.complete(a.node_id, [(job_id, first.attempt)]) == set()
    assert await pool.fail(a.node_id, first, "late", states.Backoff()) is None
    # a can neither renew its lease nor claim
    assert await Membership(engine).heartbeat(a) is None
    await pool.enqueue([NewJob("noop", {})])
    assert await pool.claim(a.node_id, a.epoch, 10) == []
    # b finishes it, once
    assert await pool.complete(b.node_id, [(job_id, second.attempt)]) == {job_id}
    job = await pool.get(job_id)
    assert job is not None and job.state == "succeeded" and job.node_id == b.node_id


async def test_failures_retry_with_backoff_then_dead_letter(
    pool: JobPool, engine: AsyncEngine
) -> None:
    me = await register(engine, "a")
    (job_id,) = (await pool.enqueue([NewJob("always_fails", {}, max_attempts=2)])).ids
    (j,) = await pool.claim(me.node_id, me.epoch, 1)
    assert (
        await pool.fail(me.node_id, j, "boom 1", states.Backoff(base_seconds=2, jitter=0))
        == "retrying"
    )
    job = await pool.get(job_id)
    assert job is not None and job.state == "retrying" and job.error == "boom 1"
    assert await pool.claim(me.node_id, me.epoch, 1) == []  # backing off
    # Claimable again once the backoff is over (not before: see the line above), polled rather
    # than slept, since a loaded machine may take longer than the backoff to get here.
    for _ in range(300):
        if claimed := await pool.claim(me.node_id, me.epoch, 1):
            break
        await asyncio.sleep(0.1)
    (j2,) = claimed
    assert j2.attempt == 2
    assert await pool.fail(me.node_id, j2, "boom 2", states.Backoff()) == "failed"
    job = await pool.get(job_id)
    assert job is not None and job.state == "failed" and job.error == "boom 2"
    assert job.attempt == 2


async def test_unique_key_makes_a_duplicate_enqueue_a_no_op(pool: JobPool) -> None:
    first = await pool.enqueue([NewJob("noop", {}, unique_key="sync-directory")])
    again = await pool.enqueue([NewJob("noop", {}, unique_key="sync-directory")])
    assert len(first.ids) == 1 and again.ids == [] and again.duplicates == 1


async def test_bad_job_in_a_batch_stores_nothing(pool: JobPool, engine: AsyncEngine) -> None:
    with pytest.raises(ValueError, match="seconds"):
        await pool.enqueue([NewJob("noop", {}), NewJob("sleep", {"seconds": "soon"})])
    with pytest.raises(KeyError, match="nope"):
        await pool.enqueue([NewJob("noop", {}), NewJob("nope", {})])
    assert await scalar(engine, "SELECT count(*) FROM jobs") == 0


async def test_local_jobs_fan_out_to_online_nodes_only(pool: JobPool, engine: AsyncEngine) -> None:
    a, b, c = [await register(engine, n) for n in "abc"]
    await Membership(engine).leave(c, "halted")
    ids = (await pool.enqueue([NewJob("clear_caches", {})])).ids
    assert len(ids) == 2
    # a cannot take b's local job, even when b is slow
    got_a = await pool.claim(a.node_id, a.epoch, 10)
    assert [j.local for j in got_a] == [True]
    assert await pool.claim(a.node_id, a.epoch, 10) == []
    # b goes offline: its local job is discarded, never taken over
    async with engine.begin() as conn:
        await conn.execute(
            text("UPDATE nodes SET last_heartbeat = now() - interval '1 hour' WHERE id = :id"),
            {"id": b.node_id},
        )
    swept = await Membership(engine).sweep(
        threshold_seconds=SWEEP_THRESHOLD, deadline_grace_seconds=60
    )
    assert swept.discarded == 1
    outcomes = await scalar(engine, "SELECT string_agg(outcome, ',') FROM job_history")
    assert outcomes == "discarded"
    assert await pool.claim(a.node_id, a.epoch, 10) == []


async def test_periodic_runs_once_per_period_across_nodes(engine: AsyncEngine) -> None:
    reg = Registry()
    reg.add(REGISTRY.get("noop"))
    reg.every(Periodic("tick", "noop", every=3600))
    pools = [JobPool(engine, reg) for _ in range(3)]
    results = await asyncio.gather(*[p.schedule_periodic() for p in pools for _ in range(4)])
    assert sum(len(r) for r in results) == 1
    assert await scalar(engine, "SELECT count(*) FROM periodic_runs WHERE name = 'tick'") == 1


async def test_stats_by_node_and_type_include_rolled_up_and_fresh_jobs(
    pool: JobPool, engine: AsyncEngine
) -> None:
    a, b = await register(engine, "a"), await register(engine, "b")
    await pool.enqueue([NewJob("noop", {}) for _ in range(30)])
    for node, n in ((a, 10), (b, 20)):
        jobs = await pool.claim(node.node_id, node.epoch, n)
        await pool.complete(node.node_id, [(j.id, j.attempt) for j in jobs])
    # age ten of them by five minutes so that the rollup takes them
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "UPDATE job_history SET finished_at = finished_at - interval '5 minutes' "
                "WHERE id IN (SELECT id FROM job_history ORDER BY id LIMIT 10)"
            )
        )
        await conn.execute(
            text("UPDATE job_counts_watermark SET rolled_until = now() - interval '10 minutes'")
        )
        counted, _ = await JobPool.roll_up_counts(conn)
    assert counted == 10
    stats = await pool.stats(3600)
    by = {(r.node, r.type, r.outcome): r.jobs for r in stats}
    assert by == {("a", "noop", "succeeded"): 10, ("b", "noop", "succeeded"): 20}
    assert await pool.stats(60) != stats  # the aged ones fall out of a one-minute window


async def test_run_at_in_the_future_is_scheduled(pool: JobPool) -> None:
    later = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    (job_id,) = (await pool.enqueue([NewJob("noop", {}, run_at=later)])).ids
    job = await pool.get(job_id)
    assert job is not None and job.state == "scheduled"


async def test_a_batch_mixing_explicit_and_default_timeouts_is_stored(pool: JobPool) -> None:
    """A type's default timeout may be an int (noop: 30) and a request's a float: one batch."""
    result = await pool.enqueue(
        [
            NewJob("noop", {}),
            NewJob("noop", {}, timeout_seconds=12.5, max_attempts=7),
            NewJob("sleep", {"seconds": 1}),
        ]
    )
    assert len(result.ids) == 3
