"""Periodic jobs that watch agents, computed with the database's clock (never a node's):

- ``agents_watch`` (every 5 s): an agent silent for more than ``agentMissedHeartbeatsOffline``
  intervals is ``Offline`` with an "Agent Offline" alert (cleared when it heartbeats again); an
  agent whose clock is off by more than ``agentClockSkewLimitSeconds`` raises "Agent Clock Out of
  Sync" (cleared once it is back within the limit).
- ``prune_agent_events`` (hourly): events older than ``agentEventRetentionSeconds`` and cleared
  agent alerts as old, in batches.

Both are transactional job types: their writes commit with the job's completion, once.
"""

from __future__ import annotations

from dsm_node.db.queries import Q
from dsm_node.jobs.registry import REGISTRY, JobContext, Payload, Periodic, job_type
from dsm_node.roles import ADMINISTRATOR

WATCH_EVERY_SECONDS = 5
PRUNE_BATCH = 10_000


@job_type(
    "agents_watch", transactional=True, max_attempts=3, timeout=60, required_role=ADMINISTRATOR
)
async def agents_watch(ctx: JobContext, payload: Payload) -> None:
    """Marks silent agents Offline and raises or clears agent alerts."""
    assert ctx.conn is not None
    s = ctx.services.settings.current()
    gone = (
        await ctx.conn.execute(
            Q.mark_silent_agents_offline,
            {
                "interval": s.agent_heartbeat_interval_seconds,
                "missed": s.agent_missed_heartbeats_offline,
            },
        )
    ).one()
    back = len((await ctx.conn.execute(Q.clear_agent_offline_alerts)).all())
    limit = {"limit": s.agent_clock_skew_limit_seconds}
    skewed = len((await ctx.conn.execute(Q.raise_agent_clock_alerts, limit)).all())
    synced = len((await ctx.conn.execute(Q.clear_agent_clock_alerts, limit)).all())
    if gone.offline:
        ctx.log.warning(
            "%d agents Offline (no heartbeat for %d intervals of %g s)",
            gone.offline,
            s.agent_missed_heartbeats_offline,
            s.agent_heartbeat_interval_seconds,
        )
    if back:
        ctx.log.info("%d agents back online: their Offline alerts cleared", back)
    if skewed:
        ctx.log.warning(
            "Agent Clock Out of Sync: %d agents off by more than %g s",
            skewed,
            s.agent_clock_skew_limit_seconds,
        )
    if synced:
        ctx.log.info("%d agent clock alerts cleared", synced)


@job_type(
    "prune_agent_events",
    transactional=True,
    max_attempts=10,
    timeout=600,
    required_role=ADMINISTRATOR,
)
async def prune_agent_events(ctx: JobContext, payload: Payload) -> None:
    """Deletes agent events and cleared agent alerts older than the retention, in batches."""
    assert ctx.conn is not None
    s = ctx.services.settings.current()
    total = 0
    while True:
        r = await ctx.conn.execute(
            Q.prune_agent_events,
            {"retention": s.agent_event_retention_seconds, "batch": PRUNE_BATCH},
        )
        total += r.rowcount
        if r.rowcount < PRUNE_BATCH:
            break
    alerts = await ctx.conn.execute(
        Q.prune_agent_alerts, {"retention": s.agent_event_retention_seconds}
    )
    if total or alerts.rowcount:
        ctx.log.info("pruned %d agent events and %d cleared agent alerts", total, alerts.rowcount)


REGISTRY.every(Periodic("agents_watch", "agents_watch", every=WATCH_EVERY_SECONDS))
REGISTRY.every(Periodic("prune_agent_events", "prune_agent_events", every=3600))
