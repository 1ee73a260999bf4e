"""Schema creation and migration, serialized across nodes by one PostgreSQL advisory lock.

All pending migrations run in one transaction (PostgreSQL DDL is transactional): a node killed half
way leaves the database exactly as it was, and the next node starts over. Two nodes started at the
same instant on an empty database queue on the lock; the second finds the work done.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from dsm_node.db.queries import Q

log = logging.getLogger("dsm.db")

# Any constant works as long as every node uses the same; this one spells "dsm-schema".
SCHEMA_LOCK_ID = 0x64736D2D736368

_FILE = re.compile(r"^(\d{4})_([\w-]+)\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


@dataclass(frozen=True)
class SchemaState:
    schema_version: int
    software_version: str | None
    applied: tuple[int, ...] = ()


class SchemaTooNew(RuntimeError):
    """The database schema is newer than this node knows: upgrade this node."""


def load_migrations(extra_dirs: list[Path] | None = None) -> list[Migration]:
    found: dict[int, Migration] = {}
    sources: list[tuple[str, str]] = [
        (f.name, f.read_text())
        for f in resources.files("dsm_node.db").joinpath("migrations").iterdir()
        if f.name.endswith(".sql")
    ]
    for d in extra_dirs or []:
        sources += [(p.name, p.read_text()) for p in sorted(Path(d).glob("*.sql"))]
    for filename, sql in sources:
        m = _FILE.match(filename)
        if not m:
            raise ValueError(f"migration file {filename!r} is not named NNNN_name.sql")
        version = int(m.group(1))
        if version in found:
            raise ValueError(f"two migrations have version {version}")
        found[version] = Migration(version, m.group(2), sql)
    migrations = [found[v] for v in sorted(found)]
    expected = list(range(1, len(migrations) + 1))
    if [m.version for m in migrations] != expected:
        raise ValueError(f"migration versions must be 1..N without gaps, got {sorted(found)}")
    return migrations


async def read_state(conn: AsyncConnection) -> SchemaState:
    exists = (await conn.execute(Q.table_exists, {"table": "dsm_schema"})).scalar()
    if not exists:
        return SchemaState(0, None)
    row = (await conn.execute(Q.schema_version)).one_or_none()
    if row is None:
        return SchemaState(0, None)
    return SchemaState(int(row.schema_version), str(row.software_version))


async def apply_pending(
    conn: AsyncConnection, state: SchemaState, migrations: list[Migration]
) -> tuple[int, ...]:
    """Applies the migrations newer than the database, inside the caller's transaction."""
    applied: list[int] = []
    for m in migrations[state.schema_version :]:
        log.info("applying migration %04d_%s", m.version, m.name)
        # exec_driver_sql: migration files are plain SQL; their colons are not bind markers.
        await conn.exec_driver_sql(m.sql)
        applied.append(m.version)
    if applied:
        await conn.execute(Q.record_schema_version, {"version": migrations[-1].version})
    return tuple(applied)


async def migrate_in(
    conn: AsyncConnection,
    software_version: str,
    migrations: list[Migration],
    check: Callable[[SchemaState], Awaitable[None]] | None = None,
) -> SchemaState:
    """The one migration path (``ensure_schema``, and every node's join): inside the caller's
    transaction and under the schema lock (held until it ends), ``check`` looks at the schema
    before anything is written (joining: versions and the master key; it raises to refuse), a
    schema newer than this node knows is refused, pending migrations run, and a database without
    a cluster version gets this one. Returns the schema as it is now and what was applied."""
    target = migrations[-1].version
    await conn.execute(Q.schema_lock, {"key": SCHEMA_LOCK_ID})
    state = await read_state(conn)
    if check is not None:
        await check(state)
    if state.schema_version > target:
        raise SchemaTooNew(
            f"database schema version {state.schema_version} is newer than this node's "
            f"{target} (cluster software {state.software_version}); upgrade this node"
        )
    applied = await apply_pending(conn, state, migrations)
    if state.software_version is None:
        await conn.execute(Q.set_cluster_version, {"version": software_version})
    return SchemaState(target, state.software_version or software_version, applied)


async def ensure_schema(
    engine: AsyncEngine,
    software_version: str,
    *,
    extra_dirs: list[Path] | None = None,
) -> SchemaState:
    """Brings the schema to the newest migration this node carries; refuses a newer schema
    (``dsm db upgrade``, the test suite's template database). Nodes join through
    ``cluster.joining``, which takes the same path and also checks versions and the master key."""
    migrations = load_migrations(extra_dirs)
    async with engine.begin() as conn:
        return await migrate_in(conn, software_version, migrations)
