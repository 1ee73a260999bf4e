"""The schema: migrations build exactly the committed schema; every named statement in
queries.sql is valid against it; migration is serialized and atomic."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import psycopg
import psycopg.sql
import pytest

from dsm_node.db import migrating
from dsm_node.db.engine import create_engine
from dsm_node.db.queries import Q
from tests.support.schema import snapshot

pytestmark = pytest.mark.integration
SCHEMA_TXT = Path(migrating.__file__).parent / "schema.txt"


def test_migrations_yield_the_committed_schema(database_url: str) -> None:
    assert snapshot(database_url) == SCHEMA_TXT.read_text(), (
        "the migrated schema differs from db/schema.txt; regenerate it with "
        "`python -m tests.support.schema URL > node_image/dsm_node/db/schema.txt` and review"
    )


# Utility statements PREPARE does not take: run for real (LISTEN and LOCK TABLE in a transaction
# that is rolled back, CREATE DATABASE on a throwaway name).
UTILITY = {"listen_jobs", "lock_encrypted_tables", "create_database"}


@pytest.mark.parametrize("name", sorted(Q.sql))
def test_every_named_statement_is_valid_against_the_schema(database_url: str, name: str) -> None:
    if name in UTILITY:
        _run_utility(database_url, name)
        return
    numbered: dict[str, int] = {}

    def number(m: re.Match[str]) -> str:
        return f"${numbered.setdefault(m.group(1), len(numbered) + 1)}"

    sql = re.sub(r"(?<![:\w]):(\w+)", number, Q.sql[name])
    with psycopg.connect(database_url) as conn:
        conn.execute(f"PREPARE probe AS {sql}")  # type: ignore[arg-type]


async def test_concurrent_migrations_apply_once(empty_database_url: str) -> None:
    engines = [create_engine(empty_database_url, pool_size=1) for _ in range(4)]
    try:
        states = await asyncio.gather(*[migrating.ensure_schema(e, "0.1.0") for e in engines])
    finally:
        for e in engines:
            await e.dispose()
    latest = len(migrating.load_migrations())
    assert sorted(len(s.applied) for s in states) == [0, 0, 0, latest]


async def test_a_failing_migration_leaves_the_database_untouched(
    empty_database_url: str, tmp_path: Path
) -> None:
    (tmp_path / f"{_next_version():04d}_broken.sql").write_text(
        "CREATE TABLE half_done (id int);\nSELECT no_such_function();\n"
    )
    engine = create_engine(empty_database_url, pool_size=1)
    try:
        with pytest.raises(Exception, match="no_such_function"):
            await migrating.ensure_schema(engine, "0.1.0", extra_dirs=[tmp_path])
    finally:
        await engine.dispose()
    with psycopg.connect(empty_database_url) as conn:
        tables = conn.execute(
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
        ).fetchone()
    assert tables == (0,), "a failed migration left tables behind"


async def test_a_newer_schema_is_refused(database_url: str, tmp_path: Path) -> None:
    (tmp_path / f"{_next_version():04d}_next.sql").write_text(
        "CREATE TABLE next_feature (id int);\n"
    )
    engine = create_engine(database_url, pool_size=1)
    try:
        await migrating.ensure_schema(engine, "0.2.0", extra_dirs=[tmp_path])
        with pytest.raises(migrating.SchemaTooNew, match="upgrade this node"):
            await migrating.ensure_schema(engine, "0.1.0")
    finally:
        await engine.dispose()


def _run_utility(database_url: str, name: str) -> None:
    if name == "create_database":
        throwaway = f"probe_{name}_{id(name)}"
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(
                psycopg.sql.SQL(Q.sql[name]).format(database=psycopg.sql.Identifier(throwaway))
            )
            conn.execute(
                psycopg.sql.SQL("DROP DATABASE {}").format(psycopg.sql.Identifier(throwaway))
            )
        return
    with psycopg.connect(database_url) as conn:
        conn.execute(Q.psycopg(name))  # type: ignore[arg-type]
        conn.rollback()


def _next_version() -> int:
    return len(migrating.load_migrations()) + 1
