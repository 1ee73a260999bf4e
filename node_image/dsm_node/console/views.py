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

from dsm_node.cluster.status import NodeStatus

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


@dataclass(frozen=True)
class NodeInfo:
    """One manager node as the console reads it (the membership's record, typed)."""

    id: int
    name: str
    address: str
    api_port: int
    version: str
    status: NodeStatus
    status_reason: str | None
    last_heartbeat: dt.datetime
    seconds_since_heartbeat: float
    started_at: dt.datetime
    status_changed_at: dt.datetime
    clock_skew_seconds: float | None
    time_zone: str | None


def node_info(record: Mapping[str, Any]) -> NodeInfo:
    """From a record of ``Membership.list_nodes``."""
    return NodeInfo(
        id=int(record["id"]),
        name=str(record["name"]),
        address=str(record["address"]),
        api_port=int(record["apiPort"]),
        version=str(record["version"]),
        status=NodeStatus(record["status"]),
        status_reason=record.get("statusReason"),
        last_heartbeat=_time(record["lastHeartbeat"]),
        seconds_since_heartbeat=float(record["secondsSinceHeartbeat"]),
        started_at=_time(record["startedAt"]),
        status_changed_at=_time(record["statusChangedAt"]),
        clock_skew_seconds=record.get("clockSkewSeconds"),
        time_zone=record.get("timeZone"),
    )


def _time(value: dt.datetime | str) -> dt.datetime:
    return value if isinstance(value, dt.datetime) else dt.datetime.fromisoformat(value)


def decommission_refusal(node: NodeInfo) -> str | None:
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

    node: NodeInfo
    status: StatusView
    heartbeat_age: str
    jobs_last_hour: int


def node_rows(nodes: Sequence[NodeInfo], counts: JobCounts) -> list[NodeRow]:
    by_node = counts.by_node()
    return [
        NodeRow(
            n, status_view(n.status), age_text(n.seconds_since_heartbeat), by_node.get(n.name, 0)
        )
        for n in nodes
    ]


def status_summary(nodes: Sequence[NodeInfo]) -> str:
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


def job_counts(rows: Iterable[Mapping[str, Any]], window_seconds: int) -> JobCounts:
    """From the rows of ``JobPool.stats`` (node, type, outcome, count)."""
    cells: dict[tuple[str, str], int] = {}
    for r in rows:
        key = (str(r["node"]), str(r["type"]))
        cells[key] = cells.get(key, 0) + int(r["count"])
    return JobCounts(window_seconds, cells)


def chart_nodes(nodes: Sequence[NodeInfo], counts: JobCounts) -> list[str]:
    """The nodes a graph shows: every listed node (even idle ones), then any node that ran jobs
    in the window but is no longer listed (decommissioned since)."""
    names = [n.name for n in nodes]
    extra = sorted(set(counts.by_node()) - set(names))
    return names + extra


ACTIVITY_MINUTES = 60


def activity(
    rows: Iterable[Mapping[str, Any]], now: dt.datetime, minutes: int = ACTIVITY_MINUTES
) -> dict[str, list[int]]:
    """Jobs per node per minute over the last ``minutes`` minutes, oldest first; the last bucket
    is the minute ``now`` is in (the database's clock). Rows: node, minute, jobs."""
    this_minute = now.replace(second=0, microsecond=0)
    out: dict[str, list[int]] = {}
    for r in rows:
        minute: dt.datetime = r["minute"]
        back = int((this_minute - minute).total_seconds() // 60)
        if 0 <= back < minutes:
            series = out.setdefault(str(r["node"]), [0] * minutes)
            series[minutes - 1 - back] += int(r["jobs"])
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
