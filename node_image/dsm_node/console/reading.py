"""What the console's pages read, through the API's own database gateways (``common.Services``,
on the API's thread and event loop): the same reads the JSON API makes, so a page and
``GET /api/...`` always agree."""

from __future__ import annotations

import datetime as dt

from dsm_node.api.common import Services
from dsm_node.console import views
from dsm_node.db.queries import Q


async def nodes(
    services: Services, threshold_seconds: float, include_decommissioned: bool = False
) -> list[views.NodeInfo]:
    records = await services.membership.list_nodes(threshold_seconds, include_decommissioned)
    return [views.node_info(r) for r in records]


async def job_counts(
    services: Services, window_seconds: int = views.WINDOW_SECONDS
) -> views.JobCounts:
    return views.job_counts(await services.pool.stats(window_seconds), window_seconds)


async def activity(
    services: Services, window_seconds: int = views.WINDOW_SECONDS
) -> dict[str, list[int]]:
    """Jobs per node per minute over the window, oldest first (``views.activity``)."""
    async with services.engine.connect() as conn:
        now: dt.datetime = (await conn.execute(Q.db_clock)).one().db_now
        rows = (await conn.execute(Q.job_activity_by_minute, {"window": window_seconds})).all()
    return views.activity(
        [{"node": r.node or f"node-{r.node_id}", "minute": r.minute, "jobs": r.jobs} for r in rows],
        now,
        window_seconds // 60,
    )


async def alerts(services: Services, include_cleared: bool) -> list[views.AlertRow]:
    async with services.engine.connect() as conn:
        rows = (await conn.execute(Q.list_alerts, {"include_cleared": include_cleared})).all()
    return [
        views.AlertRow(
            r.type,
            r.node,
            r.message,
            views.format_time(r.raised_at),
            views.format_time(r.cleared_at),
        )
        for r in rows
    ]


async def open_alert_count(services: Services) -> int:
    async with services.engine.connect() as conn:
        return len((await conn.execute(Q.list_alerts, {"include_cleared": False})).all())


async def audit(services: Services, limit: int) -> list[views.AuditRow]:
    async with services.engine.connect() as conn:
        rows = (await conn.execute(Q.list_audit, {"limit": limit})).all()
    return [
        views.AuditRow(
            views.format_time(r.at),
            r.actor,
            r.node or "",
            r.action,
            r.target or "",
            views.audit_detail(r.detail),
            r.source or "",
        )
        for r in rows
    ]


async def database_time(services: Services) -> str:
    async with services.engine.connect() as conn:
        now: dt.datetime = (await conn.execute(Q.db_clock)).one().db_now
    return views.format_time(now)
