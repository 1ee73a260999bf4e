"""View models: what the console shows, computed from records without I/O.

A node's status is always shown as words and an icon together, never by colour alone (a tone
chooses the colour; the words carry the meaning). Times are the database's (``db_now`` and the
stored timestamps): the console never judges liveness by the serving node's clock.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from markupsafe import Markup

from dsm_node.agents.store import AgentAlert, AgentRecord, AgentStatus
from dsm_node.auth import AuditEntry
from dsm_node.cluster.membership import AlertRecord, NodeRecord
from dsm_node.cluster.status import NodeStatus
from dsm_node.jobs.pool import JobCount, MinuteCount

WINDOW_SECONDS = 3600  # "over the last hour", everywhere in System Information


# -- statuses ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class StatusView:
    """How a status is shown: its words, an icon name, and a tone (the colour class)."""

    text: str
    icon: str  # "online", "offline", "upgrade", "decommissioned"
    tone: str  # "ok", "bad", "warn", "muted"


_STATUS_VIEWS = {
    NodeStatus.ONLINE: StatusView(str(NodeStatus.ONLINE), "online", "ok"),
    NodeStatus.OFFLINE: StatusView(str(NodeStatus.OFFLINE), "offline", "bad"),
    NodeStatus.UPGRADE_REQUIRED: StatusView(str(NodeStatus.UPGRADE_REQUIRED), "upgrade", "warn"),
    NodeStatus.DECOMMISSIONED: StatusView(
        str(NodeStatus.DECOMMISSIONED), "decommissioned", "muted"
    ),
}

# Each icon is drawn in a 16x16 box as white strokes on a disc of the tone's colour.
ICON_PATHS = {
    "online": "M4.5 8.5l2.5 2.5 4.5-5",
    "offline": "M5.5 5.5l5 5M10.5 5.5l-5 5",
    "upgrade": "M8 12V4.5M5 7.5l3-3 3 3",
    "decommissioned": "M5 8h6",
}
TONE_COLOURS = {"ok": "#1a7f37", "bad": "#c0262d", "warn": "#b35c00", "muted": "#6b7280"}


def status_view(status: NodeStatus) -> StatusView:
    return _STATUS_VIEWS[status]


def icon_svg(view: StatusView, size: int = 16) -> Markup:
    """The status icon as inline SVG for HTML (decorative: the words beside it carry the status)."""
    return Markup(
        '<svg class="icon" width="{s}" height="{s}" viewBox="0 0 16 16" aria-hidden="true" '
        'focusable="false"><circle cx="8" cy="8" r="8" fill="{c}"/><path d="{d}" fill="none" '
        'stroke="#fff" stroke-width="2" stroke-linecap="round" stroke-linejoin="round"/></svg>'
    ).format(s=size, c=TONE_COLOURS[view.tone], d=ICON_PATHS[view.icon])


# -- nodes ------------------------------------------------------------------------------------


def decommission_refusal(node: NodeRecord) -> str | None:
    """Why Decommission is refused for this node, or None when it is allowed (the rule of the
    original product: only an Offline node can be decommissioned)."""
    if node.status is NodeStatus.ONLINE:
        return (
            f"Node {node.name} is Online: only an Offline node can be decommissioned. "
            "Stop it first and wait until it shows Offline."
        )
    if node.status is NodeStatus.DECOMMISSIONED:
        return f"Node {node.name} is already decommissioned."
    return None


@dataclass(frozen=True)
class NodeRow:
    """A line of the Manager Nodes table."""

    node: NodeRecord
    status: StatusView
    heartbeat_age: str
    jobs_last_hour: int


def node_rows(nodes: Sequence[NodeRecord], counts: JobCounts) -> list[NodeRow]:
    by_node = counts.by_node()
    return [
        NodeRow(
            n, status_view(n.status), age_text(n.seconds_since_heartbeat), by_node.get(n.name, 0)
        )
        for n in nodes
    ]


def status_summary(nodes: Sequence[NodeRecord]) -> str:
    """'3 nodes: 2 Online, 1 Offline' (statuses in the order of the specification)."""
    if not nodes:
        return "No manager nodes."
    parts = []
    for status in NodeStatus:
        n = sum(1 for x in nodes if x.status is status)
        if n:
            parts.append(f"{n} {status}")
    noun = "node" if len(nodes) == 1 else "nodes"
    return f"{len(nodes)} {noun}: " + ", ".join(parts)


def age_text(seconds: float) -> str:
    """How long ago, for people: 'just now', '12 s ago', '3 min 4 s ago', '2 h 5 min ago'."""
    s = max(0, int(seconds))
    if s < 1:
        return "just now"
    if s < 60:
        return f"{s} s ago"
    if s < 3600:
        m, rest = divmod(s, 60)
        return f"{m} min {rest} s ago" if rest else f"{m} min ago"
    if s < 86400:
        h, rest = divmod(s, 3600)
        m = rest // 60
        return f"{h} h {m} min ago" if m else f"{h} h ago"
    return f"{s // 86400} d ago"


def format_time(t: dt.datetime | None) -> str:
    """A timestamp in UTC, to the second: '2026-05-01 19:40:12 UTC' ('' for None)."""
    if t is None:
        return ""
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.UTC)
    return t.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def skew_text(seconds: float | None) -> str:
    if seconds is None:
        return "not measured yet"
    if abs(seconds) < 0.05:
        return "in step with the database"
    direction = "ahead of" if seconds > 0 else "behind"
    return f"{abs(seconds):.1f} s {direction} the database"


# -- job counts -------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobCounts:
    """Jobs finished in the window by node and type (all outcomes), as ``GET /api/jobs/stats``
    reports them: ``by_node`` and ``by_type`` equal its ``byNode`` and ``byType``."""

    window_seconds: int
    cells: Mapping[tuple[str, str], int]  # (node, type) -> jobs

    def by_node(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for (node, _), n in self.cells.items():
            out[node] = out.get(node, 0) + n
        return out

    def by_type(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for (_, type_), n in self.cells.items():
            out[type_] = out.get(type_, 0) + n
        return out

    def types(self) -> list[str]:
        return sorted({t for _, t in self.cells})

    def total(self) -> int:
        return sum(self.cells.values())


def job_counts(rows: Iterable[JobCount], window_seconds: int) -> JobCounts:
    """From the records of ``JobPool.stats`` (every outcome counts)."""
    cells: dict[tuple[str, str], int] = {}
    for r in rows:
        key = (r.node, r.type)
        cells[key] = cells.get(key, 0) + r.jobs
    return JobCounts(window_seconds, cells)


def chart_nodes(nodes: Sequence[NodeRecord], counts: JobCounts) -> list[str]:
    """The nodes a graph shows: every listed node (even idle ones), then any node that ran jobs
    in the window but is no longer listed (decommissioned since)."""
    names = [n.name for n in nodes]
    extra = sorted(set(counts.by_node()) - set(names))
    return names + extra


ACTIVITY_MINUTES = 60


def activity(
    rows: Iterable[MinuteCount], now: dt.datetime, minutes: int = ACTIVITY_MINUTES
) -> dict[str, list[int]]:
    """Jobs per node per minute over the last ``minutes`` minutes, oldest first; the last bucket
    is the minute ``now`` is in (the database's clock)."""
    this_minute = now.replace(second=0, microsecond=0)
    out: dict[str, list[int]] = {}
    for r in rows:
        back = int((this_minute - r.minute).total_seconds() // 60)
        if 0 <= back < minutes:
            series = out.setdefault(r.node, [0] * minutes)
            series[minutes - 1 - back] += r.jobs
    return out


# -- System Information -----------------------------------------------------------------------

GRAPHS = {
    "map": "Network Map with Activity Graph",
    "by-node": "Jobs by Node",
    "by-type": "Jobs by Type",
    "by-node-and-type": "Total jobs by node and type",
}
DEFAULT_GRAPH = "map"


def graph_choice(value: str | None) -> str | None:
    """The graph a query names (the default when none is named); None for an unknown name."""
    if value is None or value == "":
        return DEFAULT_GRAPH
    return value if value in GRAPHS else None


# -- alerts and the audit log -----------------------------------------------------------------


@dataclass(frozen=True)
class AlertRow:
    type: str
    node: str
    message: str
    raised_at: str
    cleared_at: str


@dataclass(frozen=True)
class AuditRow:
    at: str
    actor: str
    node: str
    action: str
    target: str
    detail: str
    source: str


def alert_row(a: AlertRecord) -> AlertRow:
    return AlertRow(a.type, a.node, a.message, format_time(a.raised_at), format_time(a.cleared_at))


def audit_row(e: AuditEntry) -> AuditRow:
    return AuditRow(
        format_time(e.at),
        e.actor,
        e.node or "",
        e.action,
        e.target or "",
        audit_detail(e.detail),
        e.source or "",
    )


def audit_detail(detail: Any) -> str:
    """The action's details as compact JSON ('' when there are none)."""
    if detail in (None, {}, ""):
        return ""
    if isinstance(detail, str):
        try:
            detail = json.loads(detail)
        except ValueError:
            return str(detail)
    return json.dumps(detail, separators=(", ", ": "), sort_keys=True, ensure_ascii=False)


# -- agents -----------------------------------------------------------------------------------

# The words are the API's (``GET /api/agents`` reports "Online", "Offline", ...), so the page and
# the API agree word for word.
_AGENT_VIEWS = {
    AgentStatus.ONLINE: StatusView("Online", "online", "ok"),
    AgentStatus.OFFLINE: StatusView("Offline", "offline", "bad"),
    # activated, no heartbeat yet: waiting for its first contact
    AgentStatus.ACTIVATED: StatusView("Activated", "upgrade", "warn"),
    AgentStatus.DEACTIVATED: StatusView("Deactivated", "decommissioned", "muted"),
}
AGENT_STATUS_ORDER = [
    AgentStatus.ONLINE,
    AgentStatus.OFFLINE,
    AgentStatus.ACTIVATED,
    AgentStatus.DEACTIVATED,
]


def agent_status_view(status: AgentStatus) -> StatusView:
    return _AGENT_VIEWS[status]


@dataclass(frozen=True)
class AgentRow:
    """A line of the Agents table."""

    agent: AgentRecord
    status: StatusView
    heartbeat_age: str  # by the database's clock; "never" before the first heartbeat
    skew: str
    alerts: list[str]  # the types of its open agent alerts


def agent_rows(agents: Sequence[AgentRecord], open_alerts: Sequence[AgentAlert]) -> list[AgentRow]:
    by_agent: dict[int, list[str]] = {}
    for a in open_alerts:
        if a.cleared_at is None:
            by_agent.setdefault(a.agent_id, []).append(a.type)
    return [
        AgentRow(
            a,
            agent_status_view(a.status),
            "never" if a.seconds_since_heartbeat is None else age_text(a.seconds_since_heartbeat),
            "" if a.last_heartbeat is None else skew_text(a.clock_skew_seconds),
            sorted(by_agent.get(a.id, [])),
        )
        for a in agents
    ]


def agent_counts(counts: Mapping[AgentStatus, int]) -> list[tuple[str, int]]:
    """Agents by status in a fixed order (Online and Offline always, the others when present)."""
    out = []
    for status in AGENT_STATUS_ORDER:
        n = counts.get(status, 0)
        if n or status in (AgentStatus.ONLINE, AgentStatus.OFFLINE):
            out.append((agent_status_view(status).text, n))
    return out


@dataclass(frozen=True)
class AgentAlertRow:
    type: str
    agent_id: int
    hostname: str
    message: str
    raised_at: str
    view: StatusView


def agent_alert_row(a: AgentAlert) -> AgentAlertRow:
    # open alerts only: always the "bad" tone, the alert's type as the words
    view = StatusView(a.type, "offline", "bad")
    return AgentAlertRow(a.type, a.agent_id, a.hostname, a.message, format_time(a.raised_at), view)


def offline_after_text(interval_seconds: float, missed: int) -> str:
    """'3 missed heartbeats (every 60 s)': when an agent turns Offline."""
    noun = "heartbeat" if missed == 1 else "heartbeats"
    return f"{missed} missed {noun} (every {interval_seconds:g} s)"
