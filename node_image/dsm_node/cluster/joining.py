"""Joining the cluster: one transaction under the schema lock decides everything at once.

In order: read the schema and the cluster's software version; a node *older* than the cluster
refuses (it must be upgraded) and writes nothing; the node's local secret must unlock the master
key, or it refuses and writes nothing; pending migrations run; a node *newer* than the cluster takes
over, marking every older node ``Offline (Upgrade Required)``; the master key, the first
administrator and the bootstrap API key are created when missing; the node registers.
Two nodes started at the same instant queue on the lock: the second sees the first's work.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from packaging.version import InvalidVersion, Version
from sqlalchemy.ext.asyncio import AsyncEngine

from dsm_node import auth, crypto, keys, settings_store
from dsm_node.cluster.membership import Decommissioned, Identity, Membership
from dsm_node.cluster.status import StoredStatus
from dsm_node.db import migrating
from dsm_node.db.queries import Q

log = logging.getLogger("dsm.cluster")


class UpgradeRequired(RuntimeError):
    """This node runs an older version than the cluster: upgrade it."""


class DuplicateName(RuntimeError):
    """Another live node already uses this name."""


@dataclass
class Bootstrap:
    admin_username: str = "admin"
    admin_password: str | None = None
    api_key: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Joined:
    identity: Identity
    keyring: crypto.Keyring
    schema_version: int
    cluster_version: str
    applied: tuple[int, ...]
    took_over_from: list[str]


def parse_version(v: str) -> Version:
    try:
        return Version(v)
    except InvalidVersion:
        raise ValueError(f"software version {v!r} is not a valid version (e.g. 1.4.2)") from None


async def wait_for_name(engine: AsyncEngine, name: str, default_interval: float) -> None:
    """A restarted node reuses its name as soon as the previous holder's heartbeat is older than
    two intervals (at once when it already is); a holder whose heartbeat still advances is a live
    duplicate, and this node refuses to start."""
    async with engine.connect() as conn:
        if not await _table_exists(conn, "nodes"):
            return
        first = await Membership.node_row_in(conn, name)
        stored = {r.key: r.value for r in await conn.execute(Q.get_settings)}
    interval = float(stored.get("heartbeat_interval_seconds", default_interval))
    if first is None or first.status is not StoredStatus.ONLINE:
        return
    if first.silent_seconds > 2 * interval:
        return
    log.info(
        "node name %s was online %.1f s ago; checking that it is not still alive",
        name,
        first.silent_seconds,
    )
    deadline = asyncio.get_running_loop().time() + 2.5 * interval
    while asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(min(1.0, interval / 2))
        now = await Membership(engine).node_row(name)
        if now is None or now.status is not StoredStatus.ONLINE:
            return
        if now.silent_seconds > 2 * interval:
            return  # silent for two intervals: the previous incarnation is gone
        if now.last_heartbeat > first.last_heartbeat or now.epoch != first.epoch:
            raise DuplicateName(
                f"another node named {name!r} is online and heartbeating; give each node a "
                "unique name"
            )


async def join(
    engine: AsyncEngine,
    *,
    name: str,
    address: str,
    api_port: int,
    version: str,
    wrapper: crypto.KeyWrapper,
    bootstrap: Bootstrap,
    extra_dirs: list[Path] | None = None,
    reuse_decommissioned_name: bool = False,
) -> Joined:
    mine = parse_version(version)
    migrations = migrating.load_migrations(extra_dirs)
    target = migrations[-1].version
    before: migrating.SchemaState | None = None
    ring: crypto.Keyring | None = None
    async with engine.begin() as conn:

        async def check(state: migrating.SchemaState) -> None:
            """Before anything is written: an older node, or one with the wrong secret, leaves."""
            nonlocal before, ring
            before = state
            cluster = parse_version(state.software_version) if state.software_version else None
            if state.schema_version > target or (cluster is not None and mine < cluster):
                raise UpgradeRequired(
                    f"the cluster runs version {state.software_version} (schema "
                    f"{state.schema_version}); this node runs {version} (schema {target}): "
                    "upgrade this node"
                )
            ring = await keys.unlock(conn, wrapper)  # raises WrongSecret

        schema = await migrating.migrate_in(conn, version, migrations, check)
        assert before is not None  # check ran
        cluster = parse_version(before.software_version) if before.software_version else None
        took_over: list[str] = []
        if cluster is None or mine > cluster:
            await conn.execute(Q.set_cluster_version, {"version": version})
            older = [
                int(r.id)
                for r in (await conn.execute(Q.nodes_for_version_check)).all()
                if _older(r.version, mine)
            ]
            if older:
                rows = await conn.execute(
                    Q.mark_upgrade_required, {"ids": older, "version": version}
                )
                took_over = [r.name for r in rows]
        if ring is None:
            ring = await keys.bootstrap(conn, wrapper)
            log.info("created the cluster's master key")
        created = await auth.bootstrap(
            conn, ring, bootstrap.admin_username, bootstrap.admin_password, bootstrap.api_key
        )
        for what in created:
            log.info("created %s", what)
        await settings_store.write(conn, bootstrap.settings, only_if_absent=True)
        if reuse_decommissioned_name:
            released = (await conn.execute(Q.release_decommissioned_name, {"name": name})).first()
            if released is not None:
                log.info(
                    "name %s was decommissioned (node id %d); joining as a new node",
                    name,
                    released.id,
                )
        identity = await Membership.register_in(conn, name, address, api_port, version)
    if schema.applied:
        log.info("schema migrated to version %d (applied %s)", target, list(schema.applied))
    if took_over:
        log.warning(
            "took over the cluster at version %s; older nodes must be upgraded: %s",
            version,
            ", ".join(took_over),
        )
    return Joined(
        identity,
        ring,
        target,
        str(max(mine, cluster) if cluster else mine),
        schema.applied,
        took_over,
    )


def _older(v: str, than: Version) -> bool:
    try:
        return Version(v) < than
    except InvalidVersion:
        return True


async def _table_exists(conn: Any, table: str) -> bool:
    return bool((await conn.execute(Q.table_exists, {"table": table})).scalar())


__all__ = ["Bootstrap", "Decommissioned", "DuplicateName", "Joined", "UpgradeRequired", "join"]
