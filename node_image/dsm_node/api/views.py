"""The API's JSON shapes, built from the data layer's typed records. Only ``api`` speaks JSON: the
records (``cluster.membership``, ``jobs.pool``, ``auth``, ``agents.store``) carry Python values,
and these functions decide the names (camelCase) and encodings (ISO 8601 times) clients see."""

from __future__ import annotations

import datetime as dt
from typing import Any

from dsm_node.agents.store import AgentAlert, AgentEvent, AgentRecord, AgentStatus, TokenRecord
from dsm_node.auth import AuditEntry, UserRecord
from dsm_node.cluster.membership import AlertRecord, NodeRecord
from dsm_node.jobs.pool import JobCount, JobRecord


def _iso(t: dt.datetime | None) -> str | None:
    return t.isoformat() if t is not None else None


def node(n: NodeRecord) -> dict[str, Any]:
    return {
        "id": n.id,
        "name": n.name,
        "address": n.address,
        "apiPort": n.api_port,
        "version": n.version,
        "status": str(n.status),
        "statusReason": n.status_reason,
        "lastHeartbeat": n.last_heartbeat.isoformat(),
        "secondsSinceHeartbeat": n.seconds_since_heartbeat,
        "startedAt": n.started_at.isoformat(),
        "statusChangedAt": n.status_changed_at.isoformat(),
        "clockSkewSeconds": n.clock_skew_seconds,
        "timeZone": n.time_zone,
    }


def job(j: JobRecord, node_names: dict[int, str]) -> dict[str, Any]:
    return {
        "id": j.id,
        "type": j.type,
        "payload": j.payload,
        "state": str(j.state),
        "priority": j.priority,
        "attempt": j.attempt,
        "maxAttempts": j.max_attempts,
        "nodeId": j.node_id,
        "targetNodeId": j.target_node_id,
        "createdAt": _iso(j.created_at),
        "runAt": _iso(j.run_at),
        "claimedAt": _iso(j.claimed_at),
        "finishedAt": _iso(j.finished_at),
        "error": j.error,
        "node": node_names.get(j.node_id) if j.node_id is not None else None,
        "targetNode": node_names.get(j.target_node_id) if j.target_node_id is not None else None,
    }


def job_stats(window: float, counts: list[JobCount]) -> dict[str, Any]:
    by_node: dict[str, int] = {}
    by_type: dict[str, int] = {}
    for c in counts:
        by_node[c.node] = by_node.get(c.node, 0) + c.jobs
        by_type[c.type] = by_type.get(c.type, 0) + c.jobs
    return {
        "windowSeconds": window,
        "byNode": by_node,
        "byType": by_type,
        "byNodeAndType": [
            {"node": c.node, "type": c.type, "outcome": str(c.outcome), "count": c.jobs}
            for c in counts
        ],
    }


def user(u: UserRecord, full_name: str | None, email: str | None) -> dict[str, Any]:
    """A user, with personal data already decrypted."""
    return {
        "username": u.username,
        "role": u.role,
        "disabled": u.disabled,
        "fullName": full_name,
        "email": email,
    }


def audit_entry(e: AuditEntry) -> dict[str, Any]:
    return {
        "id": e.id,
        "at": e.at.isoformat(),
        "actor": e.actor,
        "node": e.node,
        "action": e.action,
        "target": e.target,
        "detail": e.detail,
        "source": e.source,
    }


def alert(a: AlertRecord) -> dict[str, Any]:
    return {
        "id": a.id,
        "type": a.type,
        "node": a.node,
        "message": a.message,
        "raisedAt": a.raised_at.isoformat(),
        "clearedAt": _iso(a.cleared_at),
    }


# -- agents (dsm_node.agents.store) ------------------------------------------------------------


def agent_status(s: AgentStatus) -> str:
    return s.value.capitalize()  # Online, Offline, Activated, Deactivated


def activation_token(t: TokenRecord) -> dict[str, Any]:
    return {
        "id": t.id,
        "description": t.description,
        "uses": t.uses,
        "maxUses": t.max_uses,
        "expiresAt": t.expires_at.isoformat(),
        "createdAt": t.created_at.isoformat(),
        "createdBy": t.created_by,
        "revokedAt": _iso(t.revoked_at),
        "state": str(t.state),
    }


def agent(a: AgentRecord) -> dict[str, Any]:
    return {
        "id": a.id,
        "hostname": a.hostname,
        "status": agent_status(a.status),
        "statusChangedAt": a.status_changed_at.isoformat(),
        "activatedAt": a.activated_at.isoformat(),
        "activatedOn": a.activated_on,
        "lastHeartbeat": _iso(a.last_heartbeat),
        "secondsSinceHeartbeat": a.seconds_since_heartbeat,
        "lastNode": a.last_node,
        "heartbeats": a.heartbeats,
        "ackedSequence": a.acked_seq,
        "agentStatus": a.agent_status,
        "statusMessage": a.status_message,
        "version": a.agent_version,
        "clockSkewSeconds": a.clock_skew_seconds,
        "configFingerprint": a.config_fingerprint,
        "counters": a.counters,
        "certificateExpiresAt": a.cert_not_after.isoformat(),
        "deactivatedAt": _iso(a.deactivated_at),
    }


def agent_counts(counts: dict[AgentStatus, int]) -> dict[str, int]:
    return {str(s): n for s, n in sorted(counts.items())}


def agent_event(e: AgentEvent) -> dict[str, Any]:
    return {
        "seq": e.seq,
        "type": e.type,
        "at": e.agent_time.isoformat(),
        "data": e.data,
        "receivedAt": e.received_at.isoformat(),
        "node": e.node,
    }


def agent_alert(a: AgentAlert) -> dict[str, Any]:
    return {
        "id": a.id,
        "type": a.type,
        "agentId": a.agent_id,
        "hostname": a.hostname,
        "message": a.message,
        "raisedAt": a.raised_at.isoformat(),
        "clearedAt": _iso(a.cleared_at),
    }
