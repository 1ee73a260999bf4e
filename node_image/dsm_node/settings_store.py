"""Cluster-wide settings stored in the database and read by every node (cached between reads)."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from dsm_node.db.queries import Q


class ClusterSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    heartbeat_interval_seconds: float = Field(10.0, gt=0, description="How often nodes heartbeat.")
    offline_threshold_seconds: float = Field(
        180.0, gt=0, description="Silence after which a node is Offline and its work taken over."
    )
    job_history_retention_seconds: float = Field(
        7 * 86400, gt=0, description="How long finished jobs stay readable."
    )
    job_counts_retention_seconds: float = Field(
        30 * 86400, gt=0, description="How long per-minute job counts are kept."
    )
    # Load-balancer overrides (the original product's three address/port pairs): when set, agents
    # are told to use these instead of the list of node addresses.
    manager_address: str | None = Field(None, description="Manager (console/API) address.")
    manager_port: int | None = Field(None, ge=1, le=65535, description="Manager port.")
    heartbeat_address: str | None = Field(None, description="Agent heartbeat address.")
    heartbeat_port: int | None = Field(None, ge=1, le=65535, description="Heartbeat port.")
    relay_address: str | None = Field(None, description="Relay (updates) address.")
    relay_port: int | None = Field(None, ge=1, le=65535, description="Relay port.")


async def read(engine: AsyncEngine) -> ClusterSettings:
    async with engine.connect() as conn:
        rows = (await conn.execute(Q.get_settings)).all()
    known = ClusterSettings.model_fields
    return ClusterSettings(**{r.key: r.value for r in rows if r.key in known})


async def write(
    conn: AsyncConnection, values: dict[str, Any], *, only_if_absent: bool = False
) -> None:
    ClusterSettings(**values)  # validates names' values before anything is written
    for key, value in values.items():
        if key not in ClusterSettings.model_fields:
            raise ValueError(f"unknown setting {key!r}")
        q = Q.put_setting_default if only_if_absent else Q.put_setting
        await conn.execute(q, {"key": key, "value": json.dumps(value)})
