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

import logging
from dataclasses import dataclass
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from dsm_node import faults
from dsm_node.cluster.status import NodeStatus, effective_status
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
    ) -> Any:
        """Renews this node's lease; None means it was declared offline (or replaced).
        Returns the database's now(), clock and UTC offset for the clock check."""
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
            return row

    async def set_alert(self, alert_type: str, node_id: int, message: str | None) -> None:
        """Raises (message) or clears (None) this node's open alert of a type."""
        async with self.engine.begin() as conn:
            if message is None:
                await conn.execute(Q.clear_alert, {"type": alert_type, "node_id": node_id})
            else:
                await conn.execute(
                    Q.raise_alert, {"type": alert_type, "node_id": node_id, "message": message}
                )

    async def node_row(self, name: str) -> Any:
        async with self.engine.connect() as conn:
            return (await conn.execute(Q.node_row, {"name": name})).first()

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
    ) -> list[dict[str, Any]]:
        async with self.engine.connect() as conn:
            rows = (await conn.execute(Q.list_nodes)).all()
        return [
            {
                "id": r.id,
                "name": r.name,
                "address": r.address,
                "apiPort": r.api_port,
                "version": r.version,
                "status": str(
                    effective_status(r.status, r.last_heartbeat, r.db_now, threshold_seconds)
                ),
                "statusReason": r.status_reason,
                "lastHeartbeat": r.last_heartbeat.isoformat(),
                "secondsSinceHeartbeat": round((r.db_now - r.last_heartbeat).total_seconds(), 3),
                "startedAt": r.started_at.isoformat(),
                "statusChangedAt": r.status_changed_at.isoformat(),
                "clockSkewSeconds": r.clock_skew_seconds,
                "timeZone": r.time_zone,
            }
            for r in rows
            if include_decommissioned or r.status != "decommissioned"
        ]


__all__ = ["Decommissioned", "Identity", "Membership", "NodeStatus", "SweepResult"]
