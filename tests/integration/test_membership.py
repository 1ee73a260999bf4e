"""Membership and takeover statements against a real PostgreSQL, in process: the sweep never waits
on a row another transaction holds (that node may be frozen) and finds it again later; orphans of
an earlier incarnation, jobs past their deadline, refunded releases; the session limits every
connection carries, and the server ending a session left idle inside a transaction."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from dsm_node.cluster import timing
from dsm_node.cluster.membership import Identity, Membership
from dsm_node.db.engine import SessionLimits, create_engine, database_unavailable
from dsm_node.jobs import (
    builtin,  # noqa: F401
    states,
)
from dsm_node.jobs.pool import JobPool, NewJob
from tests.support.postgres import SWEEP_THRESHOLD, server_up_for

pytestmark = pytest.mark.integration

# Every membership statement in these tests gives up on a lock after this long: a test that
# waited on a lock would fail quickly instead of passing slowly.
LIMITS = SessionLimits({"lock_timeout": "2s"})


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    e = create_engine(database_url, pool_size=4, limits=LIMITS)
    await server_up_for(e)  # the tests fake silence by backdating heartbeats
    yield e
    await e.dispose()


@pytest.fixture
def pool(engine: AsyncEngine) -> JobPool:
    return JobPool(engine)


async def register(engine: AsyncEngine, name: str) -> Identity:
    return await Membership(engine).register(name, "127.0.0.1", 4119, "0.1.0")


async def silence(engine: AsyncEngine, node: Identity, seconds: float = 3600) -> None:
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "UPDATE nodes SET last_heartbeat = now() - make_interval(secs => :s) WHERE id = :id"
            ),
            {"s": seconds, "id": node.node_id},
        )


async def scalar(engine: AsyncEngine, sql: str, **params: object) -> object:
    async with engine.connect() as conn:
        return (await conn.execute(text(sql), params)).scalar()


async def sweep(engine: AsyncEngine, grace: float = 60) -> object:
    return await Membership(engine).sweep(
        threshold_seconds=SWEEP_THRESHOLD, deadline_grace_seconds=grace
    )


async def hold(conn: AsyncConnection, sql: str, **params: object) -> None:
    """Locks rows from another transaction, as a node frozen inside its transaction would."""
    await conn.execute(text(sql), params)


async def test_a_silent_nodes_locked_row_is_skipped_then_swept(engine: AsyncEngine) -> None:
    frozen, _ = await register(engine, "frozen"), await register(engine, "b")
    await silence(engine, frozen)
    async with engine.connect() as holder:
        await hold(holder, "SELECT 1 FROM nodes WHERE id = :id FOR UPDATE", id=frozen.node_id)
        swept = await asyncio.wait_for(sweep(engine), 10)  # would wait forever before
        assert swept.offline == []  # type: ignore[attr-defined]
        await holder.rollback()  # the server ended the frozen session
    swept = await sweep(engine)
    assert [name for name, _ in swept.offline] == ["frozen"]  # type: ignore[attr-defined]


async def test_locked_orphans_are_skipped_then_requeued(engine: AsyncEngine, pool: JobPool) -> None:
    a = await register(engine, "a")
    await pool.enqueue([NewJob("noop", {}) for _ in range(3)])
    claimed = await pool.claim(a.node_id, a.epoch, 3)
    await silence(engine, a)
    async with engine.connect() as holder:
        # a froze mid-completion: it deleted the first job's row, not committed
        await hold(holder, "DELETE FROM jobs WHERE id = :id", id=claimed[0].id)
        swept = await asyncio.wait_for(sweep(engine), 10)
        assert swept.offline and swept.requeued == 2  # type: ignore[attr-defined]
        await holder.rollback()
    swept = await sweep(engine)
    assert swept.requeued == 1  # type: ignore[attr-defined]
    assert await scalar(engine, "SELECT count(*) FROM jobs WHERE state = 'ready'") == 3


async def test_jobs_of_an_earlier_incarnation_are_orphans(
    engine: AsyncEngine, pool: JobPool
) -> None:
    first = await register(engine, "a")
    await pool.enqueue([NewJob("noop", {})])
    (job,) = await pool.claim(first.node_id, first.epoch, 1)
    async with engine.connect() as holder:
        # the old incarnation is frozen holding the job when the node restarts
        await hold(holder, "SELECT 1 FROM jobs WHERE id = :id FOR UPDATE", id=job.id)
        second = await asyncio.wait_for(register(engine, "a"), 10)
        assert second.node_id == first.node_id and second.epoch == first.epoch + 1
        await holder.rollback()
    swept = await sweep(engine)  # a node with this id is online, but not the owner incarnation
    assert swept.requeued == 1  # type: ignore[attr-defined]
    (again,) = await pool.claim(second.node_id, second.epoch, 1)
    assert again.id == job.id and again.attempt == job.attempt + 1
    assert await pool.complete(first.node_id, [(job.id, job.attempt)]) == set()


async def test_a_job_past_its_deadline_returns_whoever_owns_it(
    engine: AsyncEngine, pool: JobPool
) -> None:
    a = await register(engine, "a")
    (retried, dead) = (
        await pool.enqueue(
            [
                NewJob("noop", {"n": 1}, max_attempts=3, timeout_seconds=3),
                NewJob("noop", {"n": 2}, max_attempts=1, timeout_seconds=3),
            ]
        )
    ).ids
    claimed = {j.id: j for j in await pool.claim(a.node_id, a.epoch, 2)}
    # before the deadline (and its grace), nothing expires; after it, both jobs do
    assert (await sweep(engine, grace=0.5)).expired == 0  # type: ignore[attr-defined]
    await asyncio.sleep(3.6)
    swept = await sweep(engine, grace=0.5)
    assert (swept.expired, swept.dead) == (2, 1)  # type: ignore[attr-defined]
    assert await scalar(engine, "SELECT state FROM jobs WHERE id = :id", id=retried) == "ready"
    assert await scalar(engine, "SELECT outcome FROM job_history WHERE id = :id", id=dead) == (
        "failed"
    )
    # the owner's late finish is fenced out, and it may not release what it no longer holds
    assert await pool.complete(a.node_id, [(retried, claimed[retried].attempt)]) == set()
    assert await pool.fail(a.node_id, claimed[retried], "late", states.Backoff()) is None
    assert await pool.release(a.node_id, [(retried, claimed[retried].attempt)], "late") == 0
    (again,) = await pool.claim(a.node_id, a.epoch, 1)
    assert again.id == retried and again.counted_attempt == 2


async def test_a_release_refunds_the_attempt_and_keeps_fencing(
    engine: AsyncEngine, pool: JobPool
) -> None:
    a = await register(engine, "a")
    (job_id,) = (await pool.enqueue([NewJob("noop", {}, max_attempts=1)])).ids
    tokens = []
    for _ in range(3):  # three graceful restarts
        (job,) = await pool.claim(a.node_id, a.epoch, 1)
        assert job.counted_attempt == 1
        tokens.append(job.attempt)
        assert await pool.release(a.node_id, [(job.id, job.attempt)], "shutdown") == 1
    assert tokens == [1, 2, 3], "the fencing token never repeats"
    public = await pool.get(job_id)
    assert public is not None and (public.attempt, public.state) == (0, "ready")
    (job,) = await pool.claim(a.node_id, a.epoch, 1)
    # an old token can neither finish nor release the job
    assert await pool.complete(a.node_id, [(job_id, tokens[-1])]) == set()
    assert await pool.release(a.node_id, [(job_id, tokens[-1])], "stale") == 0
    # its only counted attempt fails: a dead letter after one real failure, not before
    assert await pool.fail(a.node_id, job, "boom", states.Backoff()) == "failed"
    public = await pool.get(job_id)
    assert public is not None and (public.state, public.attempt) == ("failed", 1)


async def test_session_limits_apply_to_new_and_pooled_connections(database_url: str) -> None:
    limits = SessionLimits({"lock_timeout": "1500ms"}, {"keepalives": 1, "keepalives_idle": 7})
    e = create_engine(database_url, pool_size=1, max_overflow=0, limits=limits)
    try:
        assert await scalar(e, "SELECT current_setting('lock_timeout')") == "1500ms"
        t, _ = timing.effective(1.0, 6.0)
        limits.update(t.membership_session(), t.client_tcp())
        async with e.connect() as conn:  # the same pooled connection, updated at checkout
            got = (
                await conn.execute(
                    text(
                        "SELECT current_setting('lock_timeout'), "
                        "current_setting('idle_in_transaction_session_timeout'), "
                        "current_setting('statement_timeout')"
                    )
                )
            ).one()
        assert tuple(got) == ("1s", "2s", "2s")
    finally:
        await e.dispose()


async def test_the_server_ends_a_session_left_idle_in_a_transaction(database_url: str) -> None:
    """What frees a frozen node's locks: its session, idle inside a transaction, is ended."""
    limits = SessionLimits({"idle_in_transaction_session_timeout": "500ms"})
    frozen = create_engine(database_url, pool_size=1, limits=limits)
    other = create_engine(database_url, pool_size=1, limits=SessionLimits({"lock_timeout": "5s"}))
    try:
        a = await register(other, "a")
        async with frozen.connect() as conn:
            await conn.execute(
                text("UPDATE nodes SET last_heartbeat = now() WHERE id = :id"), {"id": a.node_id}
            )
            # the node freezes here, holding its row; a peer needs the row
            async with other.begin() as peer:
                await peer.execute(text("UPDATE nodes SET status_reason = 'x' WHERE id = 1"))
            with pytest.raises(Exception) as ended:
                await conn.commit()
            assert database_unavailable(ended.value)
    finally:
        await frozen.dispose()
        await other.dispose()
