"""A PostgreSQL restart on its own must not make healthy nodes Offline: while the server is down
nobody can heartbeat, so silence counts from the last heartbeat or the server's start, whichever
is later (queries.sql, ``mark_silent_nodes_offline``). The statements run against a server of the
test's own, restarted by the test; the nodes' last heartbeats are set to before the restart, as
an outage longer than the threshold leaves them."""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from dsm_node.cluster.membership import Membership
from dsm_node.cluster.status import NodeStatus
from dsm_node.db import migrating
from dsm_node.db.engine import create_engine
from dsm_node.db.queries import Q
from dsm_node.embedded_pg import EmbeddedPostgres

pytestmark = pytest.mark.integration

THRESHOLD = 30.0  # longer than the restart takes, even on a loaded machine
SILENT_BEFORE_RESTART = 60.0  # the outage was longer than the threshold


@pytest.fixture(scope="module")
def own_postgres() -> Iterator[EmbeddedPostgres]:
    """A PostgreSQL server of this module's own: the tests restart it."""
    pg = EmbeddedPostgres(Path(tempfile.mkdtemp(prefix="dsm-restart-pg-")) / "data")
    pg.start()
    try:
        with psycopg.connect(pg.admin_url, autocommit=True) as conn:
            conn.execute("CREATE DATABASE dsm")
        yield pg
    finally:
        pg.stop("immediate")


@pytest.fixture
async def url(own_postgres: EmbeddedPostgres) -> AsyncIterator[str]:
    url = own_postgres.url("dsm")
    engine = create_engine(url, pool_size=2)
    try:
        await migrating.ensure_schema(engine, "0.1.0")
        async with engine.begin() as conn:
            await conn.execute(text("TRUNCATE nodes CASCADE"))
    finally:
        await engine.dispose()
    yield url


async def nodes_silent_across_a_restart(pg: EmbeddedPostgres, url: str) -> AsyncEngine:
    """Three online nodes whose last heartbeats are older than the threshold, then a restart;
    returns an engine on the restarted server."""
    engine = create_engine(url, pool_size=2)
    membership = Membership(engine)
    for name in ("n1", "n2", "n3"):
        await membership.register(name, "127.0.0.1", 4119, "0.1.0")
    async with engine.begin() as conn:
        await conn.execute(
            text("UPDATE nodes SET last_heartbeat = now() - make_interval(secs => :s)"),
            {"s": SILENT_BEFORE_RESTART},
        )
    await engine.dispose()
    await asyncio.to_thread(pg.stop, "fast")
    await asyncio.to_thread(pg.start)
    return create_engine(url, pool_size=2)


async def statuses(engine: AsyncEngine) -> dict[str, tuple[str, int]]:
    async with engine.connect() as conn:
        rows = await conn.execute(text("SELECT name, status, epoch FROM nodes"))
        return {r.name: (r.status, int(r.epoch)) for r in rows}


async def test_a_restart_alone_makes_no_node_offline(
    own_postgres: EmbeddedPostgres, url: str
) -> None:
    engine = await nodes_silent_across_a_restart(own_postgres, url)
    try:
        membership = Membership(engine)
        swept = await membership.sweep(THRESHOLD, 2.0)
        assert swept.offline == [], "a database restart made waiting nodes Offline"
        assert {s for s, _ in (await statuses(engine)).values()} == {"online"}
        shown = await membership.list_nodes(THRESHOLD)
        assert {n.status for n in shown} == {NodeStatus.ONLINE}
        assert all(n.seconds_since_heartbeat >= SILENT_BEFORE_RESTART for n in shown)
        # nor can an administrator decommission one of them as if it were Offline
        assert await membership.decommission("n1", THRESHOLD, "admin") is None
    finally:
        await engine.dispose()


async def test_a_node_still_silent_a_threshold_after_the_restart_is_offline(
    own_postgres: EmbeddedPostgres, url: str
) -> None:
    """The restart gives every node the whole threshold to heartbeat again, and no more."""
    engine = await nodes_silent_across_a_restart(own_postgres, url)
    try:
        short = 1.0
        await asyncio.sleep(short + 0.5)  # the server has been up longer than the threshold
        membership = Membership(engine)
        swept = await membership.sweep(short, 2.0)
        assert sorted(name for name, _ in swept.offline) == ["n1", "n2", "n3"]
        # the log line tells the real silence, since the last heartbeat
        assert all(silent >= SILENT_BEFORE_RESTART for _, silent in swept.offline)
        shown = await membership.list_nodes(short)
        assert {n.status for n in shown} == {NodeStatus.OFFLINE}
    finally:
        await engine.dispose()


async def agents_silent_across_a_restart(pg: EmbeddedPostgres, url: str) -> AsyncEngine:
    """Two Online agents silent for longer than their offline limit, then a restart."""
    engine = create_engine(url, pool_size=2)
    async with engine.begin() as conn:
        await conn.execute(text("TRUNCATE agents CASCADE"))
        await conn.execute(
            text(
                "INSERT INTO agents (hostname, status, cert_serial, cert_not_after, activated_on,"
                " last_heartbeat) SELECT 'agent-' || i, 'online', i, now() + interval '1 day',"
                " 'n1', now() - make_interval(secs => :s) FROM generate_series(1, 2) i"
            ),
            {"s": SILENT_BEFORE_RESTART},
        )
    await engine.dispose()
    await asyncio.to_thread(pg.stop, "fast")
    await asyncio.to_thread(pg.start)
    return create_engine(url, pool_size=2)


async def mark_silent_agents(engine: AsyncEngine, interval: float, missed: int) -> int:
    async with engine.begin() as conn:
        gone = await conn.execute(
            Q.mark_silent_agents_offline, {"interval": interval, "missed": missed}
        )
        return int(gone.one().offline)


async def test_a_restart_alone_makes_no_agent_offline(
    own_postgres: EmbeddedPostgres, url: str
) -> None:
    """Agents cannot heartbeat while the database is down either: the same rule as for nodes."""
    engine = await agents_silent_across_a_restart(own_postgres, url)
    try:
        assert await mark_silent_agents(engine, THRESHOLD / 2, 2) == 0
        async with engine.connect() as conn:
            rows = await conn.execute(text("SELECT status FROM agents"))
            assert {r.status for r in rows} == {"online"}
        # and once the server has been up for the limit, a still-silent agent is Offline
        await asyncio.sleep(1.5)
        assert await mark_silent_agents(engine, 0.5, 2) == 2
    finally:
        await engine.dispose()
