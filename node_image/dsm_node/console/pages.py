"""The console's pages: the route table (each route names the least role it needs, like the API's)
and the handlers. The guard (``console.guarding``) has authenticated, checked Origin, the CSRF
token and the role before any handler here runs; handlers read, render and act.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any
from urllib.parse import quote

import jinja2
from aiohttp import web
from markupsafe import Markup

from dsm_node import __version__, auth, roles
from dsm_node.api import admin, inputs, paths
from dsm_node.api import agents as agents_api
from dsm_node.api.common import (
    KIB,
    NODE_KEY,
    PRINCIPAL_KEY,
    ClientError,
    Route,
    principal,
    ready,
    source,
)
from dsm_node.cluster.membership import NodeRecord
from dsm_node.cluster.status import NodeStatus
from dsm_node.console import charts, reading, security, views
from dsm_node.console.views import GRAPHS

CONSOLE = "console"  # Route.surface of every console route
FORM_KEY = "dsm.console.form"
SESSION_TOKEN_KEY = "dsm.console.session"
SIGN_IN_BODY = 4 * KIB
FORM_BODY = 2 * KIB  # forms other than sign-in carry a token and nothing much else
AUDIT_ROWS = 200
AGENT_ROWS = 1000  # the API's default page of GET /api/agents
MIN_REFRESH_SECONDS, MAX_REFRESH_SECONDS = 1.0, 10.0


# -- templates and assets -----------------------------------------------------------------------


def _logo(size: int) -> Markup:
    return Markup(
        '<svg width="{s}" height="{s}" viewBox="0 0 32 32" aria-hidden="true" focusable="false">'
        '<rect width="32" height="32" rx="6" fill="#0d2745"/>'
        '<path d="M16 5l9 3.5v6.5c0 6-4 10-9 12-5-2-9-6-9-12V8.5z" fill="none" stroke="#fff" '
        'stroke-width="2.4" stroke-linejoin="round"/><path d="M11.5 16l3.2 3.2 6-6.2" '
        'fill="none" stroke="#7cc4ff" stroke-width="2.4" stroke-linecap="round" '
        'stroke-linejoin="round"/></svg>'
    ).format(s=size)


def _alert_icon(alert: views.AlertRow) -> Markup:
    tone = "muted" if alert.cleared_at else "bad"
    return views.icon_svg(
        views.StatusView(alert.type, "offline" if tone == "bad" else "decommissioned", tone)
    )


@cache
def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("dsm_node.console", "templates"),
        autoescape=True,  # every template, whatever its name
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.globals.update(
        logo=_logo,
        icon=views.icon_svg,
        alert_icon=_alert_icon,
        format_time=views.format_time,
        asset_version=hashlib.sha256(__version__.encode()).hexdigest()[:8],
    )
    env.filters["segment"] = lambda s: quote(str(s), safe="")
    env.filters["article"] = roles.article
    return env


@dataclass(frozen=True)
class Asset:
    body: bytes
    content_type: str
    etag: str


ASSET_TYPES = {
    "console.css": "text/css",
    "console.js": "text/javascript",
    "favicon.svg": "image/svg+xml",
}


@cache
def asset(name: str) -> Asset | None:
    if name not in ASSET_TYPES:
        return None
    body = resources.files("dsm_node.console").joinpath("static", name).read_bytes()
    return Asset(body, ASSET_TYPES[name], '"' + hashlib.sha256(body).hexdigest()[:16] + '"')


# -- rendering ----------------------------------------------------------------------------------


def refresh_seconds(heartbeat_interval: float) -> float:
    """How often live regions refresh: every heartbeat, within 1-10 s."""
    return max(MIN_REFRESH_SECONDS, min(MAX_REFRESH_SECONDS, heartbeat_interval))


async def render(
    request: web.Request,
    template: str,
    *,
    status: int = 200,
    headers: dict[str, str] | None = None,
    **context: Any,
) -> web.Response:
    node = request.app[NODE_KEY]
    shared = node.shared()  # None before the node has joined: pages say less
    who = request.get(PRINCIPAL_KEY)
    token = request.get(SESSION_TOKEN_KEY)
    heartbeat = (
        shared.settings.current().heartbeat_interval_seconds if shared else MAX_REFRESH_SECONDS
    )
    base: dict[str, Any] = {
        "user": who,
        "csrf": security.csrf_token(token) if token else "",
        "node_name": node.name,
        "node_version": shared.version if shared else "",
        "refresh_seconds": f"{refresh_seconds(heartbeat):g}",
        "live": False,
        "page": "",
        "open_alerts": 0,
        "db_time": "",
    }
    if who is not None and shared is not None:
        services = ready(request)
        base["open_alerts"] = await reading.open_alert_count(services)
        base["db_time"] = await reading.database_time(services)
    base.update(context)
    body = environment().get_template(template).render(**base)
    return web.Response(
        text=body, status=status, content_type="text/html", charset="utf-8", headers=headers
    )


def see_other(location: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=303, headers={"Location": location, **(headers or {})})


def form(request: web.Request) -> dict[str, str]:
    f: dict[str, str] = request.get(FORM_KEY, {})
    return f


def _counts_by_status(nodes: list[NodeRecord]) -> list[tuple[str, int]]:
    out = []
    for status in (
        NodeStatus.ONLINE,
        NodeStatus.OFFLINE,
        NodeStatus.UPGRADE_REQUIRED,
    ):
        n = sum(1 for x in nodes if x.status is status)
        if n or status is not NodeStatus.UPGRADE_REQUIRED:
            out.append((str(status), n))
    return out


def _threshold_text(seconds: float) -> str:
    if seconds >= 60 and seconds % 60 == 0:
        minutes = int(seconds // 60)
        return f"{minutes} minute" + ("" if minutes == 1 else "s")
    return f"{seconds:g} seconds"


# -- handlers -----------------------------------------------------------------------------------


async def home(request: web.Request) -> web.Response:
    return see_other(paths.CONSOLE_MANAGER_NODES)


async def static(request: web.Request) -> web.Response:
    a = asset(request.match_info["name"])
    if a is None:
        raise ClientError(404, "no such file")
    headers = {"ETag": a.etag, "Cache-Control": "no-cache"}
    if request.headers.get("If-None-Match") == a.etag:
        return web.Response(status=304, headers=headers)
    return web.Response(body=a.body, content_type=a.content_type, headers=headers)


async def sign_in_page(request: web.Request) -> web.Response:
    if request.get(PRINCIPAL_KEY) is not None:  # already signed in (the guard looked)
        return see_other(security.safe_next(request.query.get("next"), paths.CONSOLE_MANAGER_NODES))
    return await render(
        request,
        "sign_in.html",
        title="Sign in",
        page="sign-in",
        error=None,
        username="",
        next=security.safe_next(request.query.get("next"), paths.CONSOLE_MANAGER_NODES),
    )


async def sign_in(request: web.Request) -> web.Response:
    services = ready(request)
    f = form(request)
    username, password = f.get("username", ""), f.get("password", "")
    target = security.safe_next(f.get("next"), paths.CONSOLE_MANAGER_NODES)
    problem = None
    if not 1 <= len(username) <= 200:
        problem = "Enter your user name."
    elif not 1 <= len(password) <= 1000:
        problem = "Enter your password."
    status, headers = 400, {}
    if problem is None:
        try:
            token, _ = await auth.sign_in(
                services.engine, username, password, source(request), services.node_name
            )
        except auth.SignInError as e:
            status, problem = e.status, _sign_in_problem(e)
            if e.retry_after is not None:
                headers["Retry-After"] = str(max(1, round(e.retry_after)))
        else:
            return see_other(
                target, {"Set-Cookie": security.session_cookie(token, auth.SESSION_TTL_SECONDS)}
            )
    return await render(
        request,
        "sign_in.html",
        status=status,
        headers=headers,
        title="Sign in",
        page="sign-in",
        error=problem,
        username=username,
        next=target,
    )


def _sign_in_problem(e: auth.SignInError) -> str:
    if e.status == 401:
        return "Wrong user name or password."
    if e.status == 429:
        return "Too many failed sign-ins for this user name or address. Try again in a few minutes."
    return "The manager is busy signing others in. Try again in a moment."


async def sign_out(request: web.Request) -> web.Response:
    services = ready(request)
    token = request[SESSION_TOKEN_KEY]
    await auth.sign_out(services.engine, token)
    return see_other(paths.CONSOLE_SIGN_IN, {"Set-Cookie": security.cleared_cookie()})


async def manager_nodes(request: web.Request) -> web.Response:
    services = ready(request)
    threshold = services.offline_threshold
    nodes = await reading.nodes(services, threshold)
    counts = await reading.job_counts(services)
    rows = views.node_rows(nodes, counts)
    return await render(
        request,
        "manager_nodes.html",
        title="Manager Nodes",
        page="manager-nodes",
        live=True,
        rows=rows,
        summary=views.status_summary(nodes),
        counts_by_status=_counts_by_status(nodes),
        jobs_last_hour=sum(r.jobs_last_hour for r in rows),
        threshold=_threshold_text(threshold),
    )


async def _node_named(request: web.Request) -> NodeRecord:
    services = ready(request)
    name = request.match_info["name"]
    if not 1 <= len(name) <= admin.MAX_NODE_NAME:
        raise ClientError(400, f"A node name has 1 to {admin.MAX_NODE_NAME} characters.")
    threshold = services.offline_threshold
    for n in await reading.nodes(services, threshold, include_decommissioned=True):
        if n.name == name:
            return n
    raise ClientError(404, f"There is no manager node named {name!r}.")


async def node_properties(
    request: web.Request, error: str | None = None, status: int = 200
) -> web.Response:
    services = ready(request)
    n = await _node_named(request)
    counts = await reading.job_counts(services)
    by_type = sorted(
        ((t, c) for (name, t), c in counts.cells.items() if name == n.name), key=lambda x: x[0]
    )
    return await render(
        request,
        "node_properties.html",
        status=status,
        title=f"Node {n.name}",
        page="node",
        live=error is None,
        n=n,
        node_status=views.status_view(n.status),
        heartbeat_age=views.age_text(n.seconds_since_heartbeat),
        skew=views.skew_text(n.clock_skew_seconds),
        jobs_by_type=by_type,
        jobs_total=sum(c for _, c in by_type),
        can_change=roles.allows(principal(request).role, roles.ADMINISTRATOR),
        error=error,
    )


async def node_properties_page(request: web.Request) -> web.Response:
    return await node_properties(request)


async def decommission(request: web.Request) -> web.Response:
    """The original's Properties > Options > Decommission: refused with the reason while the
    node is Online (the database's statement checks again, atomically)."""
    services = ready(request)
    n = await _node_named(request)
    refusal = views.decommission_refusal(n)
    if refusal is None:
        done = await services.membership.decommission(
            n.name, services.offline_threshold, principal(request).name
        )
        if done is None:
            refusal = f"Node {n.name} came back online; it was not decommissioned."
        else:
            await admin.audit(request, "decommission-node", n.name, {"statusBefore": str(n.status)})
            return see_other(paths.CONSOLE_MANAGER_NODES + "/" + quote(n.name, safe=""))
    await admin.audit(request, "decommission-refused", n.name, {"status": str(n.status)})
    return await node_properties(request, error=refusal, status=409)


async def system_information(request: web.Request) -> web.Response:
    services = ready(request)
    graph = views.graph_choice(request.query.get("graph"))
    if graph is None:
        raise ClientError(
            400, f"There is no graph {request.query.get('graph')!r}; choose one of the list."
        )
    nodes = await reading.nodes(services, services.offline_threshold)
    counts = await reading.job_counts(services)
    names = views.chart_nodes(nodes, counts)
    by_node, by_type, types = counts.by_node(), counts.by_type(), counts.types()
    title = GRAPHS[graph]
    chart_id = "chart-" + graph
    head: list[str]
    table: list[list[Any]]
    label_columns = 1
    if graph == "map":
        statuses = {n.name: views.status_view(n.status) for n in nodes}
        minutes = await reading.activity(services)
        chart = charts.network_map(
            [
                charts.MapNode(
                    n.name,
                    statuses[n.name],
                    by_node.get(n.name, 0),
                    minutes.get(n.name, [0] * views.ACTIVITY_MINUTES),
                )
                for n in nodes
            ],
            chart_id=chart_id,
            title=title,
        )
        head, label_columns = ["Node", "Status", "Jobs"], 2
        table = [[n.name, str(n.status), by_node.get(n.name, 0)] for n in nodes]
    elif graph == "by-node":
        chart = charts.bar_chart(
            [charts.Bar(name, by_node.get(name, 0)) for name in names],
            chart_id=chart_id,
            title=title,
            key="node",
        )
        head = ["Node", "Jobs"]
        table = [[name, by_node.get(name, 0)] for name in names]
    elif graph == "by-type":
        chart = charts.bar_chart(
            [charts.Bar(t, by_type[t], charts.series_colour(i)) for i, t in enumerate(types)],
            chart_id=chart_id,
            title=title,
            key="type",
        )
        head = ["Job type", "Jobs"]
        table = [[t, by_type[t]] for t in types]
    else:
        chart = charts.stacked_chart(names, types, counts.cells, chart_id=chart_id, title=title)
        head = ["Node", *types, "Total"]
        table = [
            [name, *(counts.cells.get((name, t), 0) for t in types), by_node.get(name, 0)]
            for name in names
        ]
    if not counts.total():
        table = []
    return await render(
        request,
        "system_information.html",
        title="System Information",
        page="system-information",
        live=True,
        graphs=GRAPHS,
        graph=graph,
        chart=chart,
        total=counts.total(),
        node_count=len(nodes),
        type_count=len(types),
        counts_by_status=_counts_by_status(nodes),
        table_head=head,
        table_rows=table,
        table_label_columns=label_columns,
    )


async def alerts(request: web.Request) -> web.Response:
    services = ready(request)
    include_cleared = inputs.flag(request.query.get("all"), "all")
    return await render(
        request,
        "alerts.html",
        title="Alerts",
        page="alerts",
        live=True,
        rows=await reading.alerts(services, include_cleared),
        include_cleared=include_cleared,
    )


async def audit_log(request: web.Request) -> web.Response:
    services = ready(request)
    return await render(
        request,
        "audit_log.html",
        title="Audit Log",
        page="audit-log",
        live=True,
        rows=await reading.audit(services, AUDIT_ROWS),
        limit=AUDIT_ROWS,
    )


async def agents(request: web.Request) -> web.Response:
    services = ready(request)
    settings = services.settings.current()
    listed = await reading.agents(services, AGENT_ROWS)
    open_alerts = await reading.open_agent_alerts(services, AGENT_ROWS)
    counts = await reading.agent_status_counts(services)
    return await render(
        request,
        "agents.html",
        title="Agents",
        page="agents",
        live=True,
        rows=views.agent_rows(listed, open_alerts),
        counts=views.agent_counts(counts),
        total=sum(counts.values()),
        limit=AGENT_ROWS,
        offline_after=views.offline_after_text(
            settings.agent_heartbeat_interval_seconds, settings.agent_missed_heartbeats_offline
        ),
        alerts=[views.agent_alert_row(a) for a in open_alerts],
    )


ADMIN, AUDITOR = roles.ADMINISTRATOR, roles.AUDITOR


def _api_role(method: str, path: str) -> str | None:
    (route,) = [r for r in agents_api.ROUTES if (r.method, r.path) == (method, path)]
    return route.role


def _page(method: str, path: str, handler: Any, role: str | None, max_body: int = 0) -> Route:
    return Route(method, path, handler, role, max_body, surface=CONSOLE)


ROUTES = [
    _page("GET", paths.CONSOLE_HOME, home, AUDITOR),
    _page("GET", paths.CONSOLE_STATIC, static, None),
    _page("GET", paths.CONSOLE_SIGN_IN, sign_in_page, None),
    # sign-in reads a body from anyone: keep it small (the API's sign-in has the same bound)
    _page("POST", paths.CONSOLE_SIGN_IN, sign_in, None, SIGN_IN_BODY),
    _page("POST", paths.CONSOLE_SIGN_OUT, sign_out, AUDITOR, FORM_BODY),
    _page("GET", paths.CONSOLE_MANAGER_NODES, manager_nodes, AUDITOR),
    _page("GET", paths.CONSOLE_NODE, node_properties_page, AUDITOR),
    _page("POST", paths.CONSOLE_DECOMMISSION, decommission, ADMIN, FORM_BODY),
    _page("GET", paths.CONSOLE_SYSTEM_INFORMATION, system_information, AUDITOR),
    _page("GET", paths.CONSOLE_ALERTS, alerts, AUDITOR),
    _page("GET", paths.CONSOLE_AUDIT_LOG, audit_log, AUDITOR),
    # whoever may list agents through the API may see this page, and no one else
    _page("GET", paths.CONSOLE_AGENTS, agents, _api_role("GET", agents_api.API_AGENTS)),
]
