"""A real PostgreSQL for the test suite, started once per run; each test gets a fresh database
cloned from a migrated template (milliseconds, not a migration per test).

A pytest plugin (registered by tests/conftest.py) offering the fixtures ``pg_server`` (the
:class:`Server`: create and drop databases), ``pg_template`` (the migrated template's name),
``database_url`` (a fresh migrated database per test) and ``empty_database_url`` (one without a
schema). Set ``DSM_TEST_DATABASE_URL`` to a superuser URL of an external server to use it
instead.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from dsm_node.db import migrating
from dsm_node.db.engine import create_engine
from dsm_node.embedded_pg import EmbeddedPostgres, PostgresNotFound

TEMPLATE = "dsm_template"
_counter = itertools.count()

# The offline threshold of in-process sweeps in tests that fake a node's silence by backdating its
# heartbeat: longer than such a test takes, short enough to wait for (see server_up_for).
SWEEP_THRESHOLD = 30.0


async def server_up_for(engine: AsyncEngine, seconds: float = SWEEP_THRESHOLD) -> None:
    """Waits until the database server has been up for ``seconds``. Peers count a node's silence
    from its last heartbeat or the server's start, whichever is later (a restart alone makes no
    node Offline), so a backdated heartbeat looks silent only on a server older than the
    threshold."""
    async with engine.connect() as conn:
        up = (
            await conn.execute(
                text("SELECT extract(epoch FROM now() - pg_postmaster_start_time())")
            )
        ).scalar_one()
    await asyncio.sleep(max(0.0, seconds - float(up)))


class Server:
    def __init__(self, admin_url: str) -> None:
        self.admin_url = admin_url

    def url(self, database: str) -> str:
        return make_url(self.admin_url).set(database=database).render_as_string(hide_password=False)

    def admin(self, sql: str) -> None:
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(sql)

    def create(self, name: str, template: str | None = None) -> str:
        self.admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self.admin(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
        return self.url(name)

    def drop(self, name: str) -> None:
        self.admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def pg_server() -> Iterator[Server]:
    external = os.environ.get("DSM_TEST_DATABASE_URL")
    if external:
        yield Server(external)
        return
    try:
        pg = EmbeddedPostgres(Path(tempfile.mkdtemp(prefix="dsm-test-pg-")) / "data").start()
    except PostgresNotFound as e:
        if os.environ.get("CI") == "true":
            pytest.fail(f"PostgreSQL is required: {e}")
        pytest.skip(f"PostgreSQL server binaries not found ({e}); run `make deps`")
    try:
        yield Server(pg.admin_url)
    finally:
        pg.stop("immediate")


@pytest.fixture(scope="session")
def pg_template(pg_server: Server) -> str:
    url = pg_server.create(TEMPLATE)

    async def migrate() -> None:
        engine = create_engine(url, pool_size=1)
        try:
            await migrating.ensure_schema(engine, "0.1.0")
        finally:
            await engine.dispose()

    asyncio.run(migrate())
    return TEMPLATE


@pytest.fixture
def database_url(pg_server: Server, pg_template: str) -> Iterator[str]:
    """A fresh, migrated database for one test."""
    name = f"t{os.getpid()}_{next(_counter)}"
    url = pg_server.create(name, template=pg_template)
    yield url
    pg_server.drop(name)


@pytest.fixture
def empty_database_url(pg_server: Server) -> Iterator[str]:
    """A fresh database with no schema at all."""
    name = f"e{os.getpid()}_{next(_counter)}"
    url = pg_server.create(name)
    yield url
    pg_server.drop(name)
