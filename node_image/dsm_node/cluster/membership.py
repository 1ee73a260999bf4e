"""Cluster membership against the shared database: register, heartbeat, sweep, leave.

Every node sweeps once per heartbeat interval: any node may declare a silent peer offline and put
its work back in the pool. Concurrent sweeps are harmless (each takes rows FOR UPDATE SKIP LOCKED;
the second finds nothing to do). Liveness is judged by the database's clock alone.

The heartbeat and the sweep are independent: the heartbeat has a connection of its own and is never
queued behind a sweep, and no membership statement waits on a row another node has locked (that
node may be frozen inside its transaction): sweeps skip locked rows and return to them next time,
and every statement's lock wait is bounded (``cluster.timing``).
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from dsm_node import faults
from dsm_node.cluster.status import NodeStatus, StoredStatus, effective_status
from dsm_node.db.queries import Q

log = logging.getLogger("dsm.cluster")


class Decommissioned(RuntimeError):
    """This node name was decommissioned; start the node under a new name."""


@dataclass(frozen=True)
class Identity:
    node_id: int
    epoch: int
    name: str


@dataclass(frozen=True)
class NodeRecord:
    """A node as administrators see it (``status`` is the effective one: a node recorded online
    but silent past the threshold is ``Offline``)."""

    id: int
    name: str
    address: str
    api_port: int
    version: str
    stored_status: StoredStatus
    status: NodeStatus
    status_reason: str
    last_heartbeat: dt.datetime
    seconds_since_heartbeat: float
    started_at: dt.datetime
    status_changed_at: dt.datetime
    clock_skew_seconds: float | None
    time_zone: str | None


@dataclass(frozen=True)
class MemberRow:
    """A node's row as stored now, for decisions about it: may a name be reused, why was a lease
    lost. ``cluster_version`` is the cluster's software version."""

    id: int
    name: str
    status: StoredStatus
    version: str
    epoch: int
    last_heartbeat: dt.datetime
    db_now: dt.datetime
    cluster_version: str | None

    @property
    def silent_seconds(self) -> float:
        return (self.db_now - self.last_heartbeat).total_seconds()


@dataclass(frozen=True)
class Renewal:
    """A renewed lease: the database's clock and time zone, for the clock check."""

    db_clock: dt.datetime
    db_utc_offset: float
    db_tz: str


@dataclass(frozen=True)
class AlertRecord:
    id: int
    type: str
    node: str
    message: str
    raised_at: dt.datetime
    cleared_at: dt.datetime | None


@dataclass(frozen=True)
class SweepResult:
    offline: list[tuple[str, float]]
    requeued: int
    discarded: int
    expired: int = 0  # running jobs past their deadline, returned to the pool
    dead: int = 0  # of those, out of attempts: failed


class Membership:
    def __init__(self, engine: AsyncEngine, heartbeat_engine: AsyncEngine | None = None) -> None:
        self.engine = engine
        # The heartbeat's own connection: never queued behind a sweep or an API call.
        self.heartbeat_engine = heartbeat_engine or engine

    async def register(self, name: str, address: str, api_port: int, version: str) -> Identity:
        """Registers this node (a new incarnation for a known name) in one transaction."""
        async with self.engine.begin() as conn:
            return await self.register_in(conn, name, address, api_port, version)

    @staticmethod
    async def register_in(
        conn: AsyncConnection, name: str, address: str, api_port: int, version: str
    ) -> Identity:
        row = (
            await conn.execute(
                Q.register_node,
                {"name": name, "address": address, "api_port": api_port, "version": version},
            )
        ).first()
        if row is None:
            raise Decommissioned(
                f"node {name!r} was decommissioned and cannot rejoin under that name; "
                "start it under a new name"
            )
        node_id, epoch = int(row.id), int(row.epoch)
        requeued = (
            await conn.execute(
                Q.requeue_jobs_of_node,
                {"node_id": node_id, "reason": f"taken over: {name} restarted"},
            )
        ).all()
        discarded = (
            await conn.execute(
                Q.discard_local_jobs_of_nodes,
                {"node_ids": [node_id], "reason": f"{name} restarted with empty caches"},
            )
        ).all()
        if epoch > 1:
            log.info(
                "rejoined as %s (incarnation %d); %d jobs of the previous incarnation back in the "
                "pool, %d of its local jobs discarded",
                name,
                epoch,
                len(requeued),
                len(discarded),
            )
        else:
            log.info("registered as %s (node id %d)", name, node_id)
        return Identity(node_id, epoch, name)

    async def heartbeat(
        self, me: Identity, skew: float | None = None, time_zone: str | None = None
    ) -> Renewal | None:
        """Renews this node's lease; None means it was declared offline (or replaced).
        Returns the database's clock and UTC offset for the clock check."""
        async with self.heartbeat_engine.begin() as conn:
            row = (
                await conn.execute(
                    Q.heartbeat,
                    {
                        "node_id": me.node_id,
                        "epoch": me.epoch,
                        "skew": skew,
                        "time_zone": time_zone,
                    },
                )
            ).first()
            await faults.point("heartbeat")  # this node's row locked, not committed yet
        if row is None:
            return None
        return Renewal(row.db_clock, float(row.db_utc_offset), str(row.db_tz))

    async def set_alert(self, alert_type: str, node_id: int, message: str | None) -> None:
        """Raises (message) or clears (None) this node's open alert of a type."""
        async with self.engine.begin() as conn:
            if message is None:
                await conn.execute(Q.clear_alert, {"type": alert_type, "node_id": node_id})
            else:
                await conn.execute(
                    Q.raise_alert, {"type": alert_type, "node_id": node_id, "message": message}
                )

    async def node_row(self, name: str) -> MemberRow | None:
        async with self.engine.connect() as conn:
            return await self.node_row_in(conn, name)

    @staticmethod
    async def node_row_in(conn: AsyncConnection, name: str) -> MemberRow | None:
        r = (await conn.execute(Q.node_row, {"name": name})).first()
        if r is None:
            return None
        return MemberRow(
            int(r.id),
            r.name,
            StoredStatus(r.status),
            r.version,
            int(r.epoch),
            r.last_heartbeat,
            r.db_now,
            r.cluster_version,
        )

    async def database_now(self) -> dt.datetime:
        """The database's clock (the one every liveness judgement uses)."""
        async with self.engine.connect() as conn:
            now: dt.datetime = (await conn.execute(Q.db_clock)).one().db_now
        return now

    async def list_alerts(self, include_cleared: bool = False) -> list[AlertRecord]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(Q.list_alerts, {"include_cleared": include_cleared})
            return [
                AlertRecord(int(r.id), r.type, r.node, r.message, r.raised_at, r.cleared_at)
                for r in rows
            ]

    async def decommission(self, name: str, threshold: float, actor: str) -> int | None:
        """Decommissions an Offline node: its local jobs are dropped, anything it held goes back
        to the pool, its job history stays. None when it is not Offline."""
        async with self.engine.begin() as conn:
            row = (
                await conn.execute(
                    Q.decommission_node, {"name": name, "threshold": threshold, "actor": actor}
                )
            ).first()
            if row is None:
                return None
            await conn.execute(
                Q.discard_local_jobs_of_nodes, {"node_ids": [row.id], "reason": "decommissioned"}
            )
            await conn.execute(Q.requeue_orphaned_jobs)
            return int(row.id)

    async def sweep(self, threshold_seconds: float, deadline_grace_seconds: float) -> SweepResult:
        """Declares silent peers offline, discards local jobs of nodes no longer online, returns
        orphaned jobs and jobs past their deadline to the pool.

        Each step is its own short transaction and converges by itself: a row skipped because a
        frozen transaction holds it is found again by the next sweep."""
        async with self.engine.begin() as conn:
            gone = (
                await conn.execute(Q.mark_silent_nodes_offline, {"threshold": threshold_seconds})
            ).all()
            await faults.point("sweep")  # peers' rows locked, not committed yet
        async with self.engine.begin() as conn:
            discarded = len((await conn.execute(Q.discard_orphaned_local_jobs)).all())
        async with self.engine.begin() as conn:
            requeued = len((await conn.execute(Q.requeue_orphaned_jobs)).all())
            expired = (
                await conn.execute(Q.expire_overdue_jobs, {"grace": deadline_grace_seconds})
            ).one()
            if requeued or expired.retried:
                await conn.execute(Q.notify_jobs)
        return SweepResult(
            [(r.name, float(r.silent_seconds)) for r in gone],
            requeued,
            discarded,
            int(expired.retried) + int(expired.failed),
            int(expired.failed),
        )

    async def leave(self, me: Identity, reason: str) -> None:
        """Marks this node offline at once (a halted node shows Offline); drops its local jobs."""
        async with self.engine.begin() as conn:
            await conn.execute(
                Q.leave, {"node_id": me.node_id, "epoch": me.epoch, "reason": reason}
            )
            await conn.execute(
                Q.discard_local_jobs_of_nodes, {"node_ids": [me.node_id], "reason": reason}
            )
            # Anything still marked running under this node goes back to the pool now.
            if (await conn.execute(Q.requeue_orphaned_jobs)).all():
                await conn.execute(Q.notify_jobs)

    async def list_nodes(
        self, threshold_seconds: float, include_decommissioned: bool = False
    ) -> list[NodeRecord]:
        async with self.engine.connect() as conn:
            rows = (await conn.execute(Q.list_nodes)).all()
        return [
            NodeRecord(
                id=int(r.id),
                name=r.name,
                address=r.address,
                api_port=int(r.api_port),
                version=r.version,
                stored_status=StoredStatus(r.status),
                status=effective_status(
                    StoredStatus(r.status), r.silent_since, r.db_now, threshold_seconds
                ),
                status_reason=r.status_reason,
                last_heartbeat=r.last_heartbeat,
                seconds_since_heartbeat=round((r.db_now - r.last_heartbeat).total_seconds(), 3),
                started_at=r.started_at,
                status_changed_at=r.status_changed_at,
                clock_skew_seconds=r.clock_skew_seconds,
                time_zone=r.time_zone,
            )
            for r in rows
            if include_decommissioned or r.status != StoredStatus.DECOMMISSIONED
        ]


__all__ = [
    "AlertRecord",
    "Decommissioned",
    "Identity",
    "MemberRow",
    "Membership",
    "NodeRecord",
    "NodeStatus",
    "Renewal",
    "SweepResult",
]
