"""What the console's pages read, through the API's own database gateways (``common.Services``,
on the API's thread and event loop): the same typed records the JSON API reads, so a page and
``GET /api/...`` always agree. No SQL here: every statement lives in ``db/queries.sql`` behind
the gateways (``Membership``, ``JobPool``, ``auth``, ``AgentStore``)."""

from __future__ import annotations

from dsm_node import auth
from dsm_node.agents.store import AgentAlert, AgentRecord, AgentStatus, AgentStore
from dsm_node.api.common import Services
from dsm_node.cluster.membership import NodeRecord
from dsm_node.console import views


async def nodes(
    services: Services, threshold_seconds: float, include_decommissioned: bool = False
) -> list[NodeRecord]:
    return await services.membership.list_nodes(threshold_seconds, include_decommissioned)


async def job_counts(
    services: Services, window_seconds: int = views.WINDOW_SECONDS
) -> views.JobCounts:
    return views.job_counts(await services.pool.stats(window_seconds), window_seconds)


async def activity(
    services: Services, window_seconds: int = views.WINDOW_SECONDS
) -> dict[str, list[int]]:
    """Jobs per node per minute over the window, oldest first (``views.activity``)."""
    read = await services.pool.activity(window_seconds)
    return views.activity(read.minutes, read.db_now, window_seconds // 60)


async def alerts(services: Services, include_cleared: bool) -> list[views.AlertRow]:
    return [views.alert_row(a) for a in await services.membership.list_alerts(include_cleared)]


async def open_alert_count(services: Services) -> int:
    return len(await services.membership.list_alerts(include_cleared=False))


async def audit(services: Services, limit: int) -> list[views.AuditRow]:
    return [views.audit_row(e) for e in await auth.list_audit(services.engine, limit)]


async def database_time(services: Services) -> str:
    return views.format_time(await services.membership.database_now())


async def agents(services: Services, limit: int) -> list[AgentRecord]:
    return await AgentStore(services.engine).list_agents(limit=limit)


async def agent_status_counts(services: Services) -> dict[AgentStatus, int]:
    return await AgentStore(services.engine).status_counts()


async def open_agent_alerts(services: Services, limit: int) -> list[AgentAlert]:
    return await AgentStore(services.engine).alerts(include_cleared=False, limit=limit)
