"""The console's view models and browser-security rules: pure, no I/O."""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
import types

import pytest

from dsm_node import roles
from dsm_node.agents.store import AgentAlert, AgentRecord, AgentStatus
from dsm_node.api import agents as api_agents
from dsm_node.api import views as api_views
from dsm_node.cluster.membership import NodeRecord
from dsm_node.cluster.status import NodeStatus, StoredStatus
from dsm_node.console import pages, security, views
from dsm_node.jobs.pool import JobCount
from dsm_node.jobs.states import Outcome

T0 = dt.datetime(2026, 5, 1, 19, 40, 12, tzinfo=dt.UTC)


def record(name: str, status: NodeStatus) -> NodeRecord:
    return NodeRecord(
        id=1,
        name=name,
        address="127.0.0.2",
        api_port=4119,
        version="0.1.0",
        stored_status=StoredStatus.ONLINE,
        status=status,
        status_reason="",
        last_heartbeat=T0,
        seconds_since_heartbeat=4.2,
        started_at=T0,
        status_changed_at=T0,
        clock_skew_seconds=None,
        time_zone="UTC",
    )


def count(node: str, type_: str, outcome: Outcome, jobs: int) -> JobCount:
    return JobCount(1, node, type_, outcome, jobs)


@pytest.mark.parametrize(
    ("status", "refused"),
    [
        (NodeStatus.ONLINE, "is Online: only an Offline node can be decommissioned"),
        (NodeStatus.OFFLINE, None),
        (NodeStatus.UPGRADE_REQUIRED, None),
        (NodeStatus.DECOMMISSIONED, "already decommissioned"),
    ],
)
def test_decommission_refusal(status: NodeStatus, refused: str | None) -> None:
    n = record("a", status)
    reason = views.decommission_refusal(n)
    assert (reason is None) == (refused is None)
    if refused:
        assert refused in (reason or "")


def test_every_status_has_words_an_icon_and_a_tone() -> None:
    for status in NodeStatus:
        v = views.status_view(status)
        assert v.text == str(status)
        assert v.icon in views.ICON_PATHS and v.tone in views.TONE_COLOURS
        icon = views.icon_svg(v)
        assert 'aria-hidden="true"' in icon  # the words beside it carry the status
    tones = {views.status_view(s).tone for s in NodeStatus}
    assert len(tones) == len(NodeStatus)  # each status looks different, too


def test_job_counts_sum_outcomes_like_the_api() -> None:
    rows = [
        count("a", "noop", Outcome.SUCCEEDED, 10),
        count("a", "noop", Outcome.FAILED, 2),
        count("b", "sleep", Outcome.SUCCEEDED, 3),
        count("b", "noop", Outcome.SUCCEEDED, 1),
    ]
    c = views.job_counts(rows, 3600)
    assert c.cells == {("a", "noop"): 12, ("b", "sleep"): 3, ("b", "noop"): 1}
    assert c.by_node() == {"a": 12, "b": 4}
    assert c.by_type() == {"noop": 13, "sleep": 3}
    assert c.types() == ["noop", "sleep"] and c.total() == 16


def test_rows_and_graphs_show_idle_and_departed_nodes() -> None:
    nodes = [record("a", NodeStatus.ONLINE), record("b", NodeStatus.OFFLINE)]
    counts = views.job_counts([count("gone", "noop", Outcome.SUCCEEDED, 4)], 3600)
    assert views.chart_nodes(nodes, counts) == ["a", "b", "gone"]
    rows = views.node_rows(nodes, counts)
    assert [r.jobs_last_hour for r in rows] == [0, 0]
    assert rows[0].heartbeat_age == "4 s ago"
    assert views.status_summary(nodes) == "2 nodes: 1 Online, 1 Offline"
    assert views.status_summary([]) == "No manager nodes."


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.2, "just now"),
        (-3, "just now"),  # a heartbeat stamped after the read: never 'in the future'
        (12.9, "12 s ago"),
        (60, "1 min ago"),
        (184, "3 min 4 s ago"),
        (7500, "2 h 5 min ago"),
        (7200, "2 h ago"),
        (3 * 86400 + 5, "3 d ago"),
    ],
)
def test_age_text(seconds: float, text: str) -> None:
    assert views.age_text(seconds) == text


def test_times_are_shown_in_utc() -> None:
    plus_two = dt.timezone(dt.timedelta(hours=2))
    assert views.format_time(T0.astimezone(plus_two)) == "2026-05-01 19:40:12 UTC"
    assert views.format_time(None) == ""
    assert views.skew_text(None) == "not measured yet"
    assert views.skew_text(-31.25) == "31.2 s behind the database"


def test_graph_choice() -> None:
    assert views.graph_choice(None) == views.graph_choice("") == "map"
    assert all(views.graph_choice(k) == k for k in views.GRAPHS)
    assert views.graph_choice("pie") is None


def test_audit_detail_is_compact_json() -> None:
    assert views.audit_detail({}) == "" and views.audit_detail(None) == ""
    assert views.audit_detail({"b": 1, "a": "x"}) == '{"a": "x", "b": 1}'
    assert views.audit_detail('{"a": 1}') == '{"a": 1}'
    assert views.audit_detail("not json") == "not json"


def test_refresh_follows_the_heartbeat_within_bounds() -> None:
    assert pages.refresh_seconds(0.5) == 1.0
    assert pages.refresh_seconds(5) == 5
    assert pages.refresh_seconds(600) == 10.0


# -- browser security ------------------------------------------------------------------------


def test_csrf_token_is_bound_to_the_session() -> None:
    a, b = "session-token-a", "session-token-b"
    assert security.csrf_token(a) == security.csrf_token(a) != security.csrf_token(b)
    assert a not in security.csrf_token(a)
    assert security.csrf_valid(a, security.csrf_token(a))
    for wrong in (security.csrf_token(b), "", None, "0" * 64, security.csrf_token(a)[:-1], "é"):
        assert not security.csrf_valid(a, wrong)


def test_session_cookie_attributes() -> None:
    cookie = security.session_cookie("tok", 28800)
    assert cookie.startswith("__Host-dsm-session=tok;")
    for attribute in ("Secure", "HttpOnly", "SameSite=Strict", "Path=/", "Max-Age=28800"):
        assert attribute in cookie.split("; ")
    assert "Domain" not in cookie  # __Host- cookies stay on the host that set them
    assert "Max-Age=0" in security.cleared_cookie()


@pytest.mark.parametrize(
    ("origin", "referer", "host", "problem"),
    [
        ("https://lb.example", None, "lb.example", None),
        ("https://127.0.0.2:4119", None, "127.0.0.2:4119", None),
        ("HTTPS://LB.example", None, "lb.example", None),
        ("https://evil.example", None, "lb.example", "cross-origin request from https://evil"),
        ("http://lb.example", None, "lb.example", "cross-origin"),  # not over TLS
        ("https://lb.example:8443", None, "lb.example", "cross-origin"),
        ("null", None, "lb.example", "opaque origin"),
        (None, "https://lb.example/manager-nodes/a", "lb.example", None),
        (None, "https://evil.example/x", "lb.example", "cross-origin request from https://evil"),
        (None, None, "lb.example", "neither"),
        ("https://lb.example", None, None, "no Host"),
    ],
)
def test_origin_check(
    origin: str | None, referer: str | None, host: str | None, problem: str | None
) -> None:
    found = security.origin_problem(origin, referer, host)
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/system-information?graph=by-type", "/system-information?graph=by-type"),
        (None, "/d"),
        ("", "/d"),
        ("//evil.example/x", "/d"),
        ("/\\evil.example", "/d"),
        ("https://evil.example/", "/d"),
        ("/sign-in", "/d"),
        ("/sign-in?next=/x", "/d"),
        ("/a\r\nSet-Cookie: x=y", "/d"),
        ("/ünïcode", "/d"),
    ],
)
def test_after_sign_in_only_local_pages(target: str | None, expected: str) -> None:
    assert security.safe_next(target, "/d") == expected


def test_headers_forbid_inline_script_framing_and_sniffing() -> None:
    csp = dict(part.split(" ", 1) for part in security.CONTENT_SECURITY_POLICY.split("; "))
    assert csp["default-src"] == "'self'" and csp["script-src"] == "'self'"
    assert csp["frame-ancestors"] == "'none'" and csp["form-action"] == "'self'"
    assert "unsafe" not in security.CONTENT_SECURITY_POLICY
    assert security.HEADERS["X-Frame-Options"] == "DENY"
    assert security.HEADERS["X-Content-Type-Options"] == "nosniff"


def test_every_asset_and_template_ships_in_the_package() -> None:
    for name in pages.ASSET_TYPES:
        asset = pages.asset(name)
        assert asset is not None and asset.body
    assert pages.asset("../pages.py") is None and pages.asset("missing.css") is None
    env = pages.environment()
    for template in env.list_templates():
        env.get_template(template)  # parses
    assert env.autoescape is True


def test_templates_have_no_inline_script_or_style() -> None:
    """The CSP would block them; this says which template has one before a browser does."""
    env = pages.environment()
    assert env.loader is not None
    for template in env.list_templates():
        source = env.loader.get_source(env, template)[0]
        assert "<script>" not in source and "<script " not in source.replace(
            '<script src="/static/console.js', ""
        ), template
        assert " style=" not in source and "<style" not in source, template
        assert not re.search(r"\son[a-z]+\s*=", source), f"{template}: an inline event handler"


# -- agents -----------------------------------------------------------------------------------


def agent(
    agent_id: int,
    status: AgentStatus,
    seconds: float | None,
    skew: float | None = None,
    node: str | None = "node-1",
) -> AgentRecord:
    return AgentRecord(
        id=agent_id,
        hostname=f"host-{agent_id}",
        status=status,
        status_changed_at=T0,
        activated_at=T0,
        activated_on="node-1",
        last_heartbeat=None if seconds is None else T0,
        seconds_since_heartbeat=seconds,
        last_node=None if seconds is None else node,
        heartbeats=0 if seconds is None else 7,
        acked_seq=0,
        agent_status=None,
        status_message=None,
        agent_version="1.2.3",
        clock_skew_seconds=skew,
        config_fingerprint=None,
        counters=None,
        cert_not_after=T0,
        deactivated_at=None,
    )


def agent_alert(alert_id: int, agent_id: int, type_: str, cleared: bool = False) -> AgentAlert:
    return AgentAlert(
        alert_id, type_, agent_id, f"host-{agent_id}", "silent", T0, T0 if cleared else None
    )


def test_every_agent_status_has_the_apis_words_an_icon_and_a_tone() -> None:
    for status in AgentStatus:
        v = views.agent_status_view(status)
        assert v.text == api_views.agent_status(status)  # the page and the API agree
        assert v.icon in views.ICON_PATHS and v.tone in views.TONE_COLOURS


def test_agent_rows_age_skew_and_open_alerts() -> None:
    rows = views.agent_rows(
        [
            agent(1, AgentStatus.ONLINE, 2.4, skew=-1.25),
            agent(2, AgentStatus.OFFLINE, 125.0, skew=0.01),
            agent(3, AgentStatus.ACTIVATED, None),
        ],
        [
            agent_alert(10, 2, "Offline"),
            agent_alert(11, 2, "Agent Clock Skew"),
            agent_alert(12, 1, "Offline", cleared=True),  # cleared: not shown
        ],
    )
    assert [(r.status.text, r.heartbeat_age, r.skew, r.alerts) for r in rows] == [
        ("Online", "2 s ago", "1.2 s behind the database", []),
        ("Offline", "2 min 5 s ago", "in step with the database", ["Agent Clock Skew", "Offline"]),
        ("Activated", "never", "", []),  # no heartbeat: neither an age nor a skew yet
    ]
    assert rows[0].agent.last_node == "node-1" and rows[2].agent.last_node is None


def test_agent_counts_keep_a_fixed_order() -> None:
    assert views.agent_counts({}) == [("Online", 0), ("Offline", 0)]
    assert views.agent_counts(
        {AgentStatus.DEACTIVATED: 1, AgentStatus.OFFLINE: 2, AgentStatus.ONLINE: 3}
    ) == [("Online", 3), ("Offline", 2), ("Deactivated", 1)]


def test_offline_after_text() -> None:
    assert views.offline_after_text(60, 3) == "3 missed heartbeats (every 60 s)"
    assert views.offline_after_text(0.5, 1) == "1 missed heartbeat (every 0.5 s)"


def test_the_agents_page_needs_the_role_the_apis_agent_list_needs() -> None:
    (page,) = [r for r in pages.ROUTES if r.path == "/agents"]
    (api,) = [r for r in api_agents.ROUTES if (r.method, r.path) == ("GET", "/api/agents")]
    assert page.role == api.role == roles.AUDITOR


def test_agent_strings_are_escaped_on_the_page() -> None:
    hostile = '<img src=x onerror="alert(1)">'
    a = dataclasses.replace(
        agent(1, AgentStatus.ONLINE, 1.0),
        hostname=hostile,
        status_message=hostile,
        agent_version=hostile,
        last_node=hostile,
    )
    al = dataclasses.replace(agent_alert(1, 1, hostile), hostname=hostile, message=hostile)
    html = (
        pages.environment()
        .get_template("agents.html")
        .render(
            user=types.SimpleNamespace(name="audrey", role="auditor"),
            csrf="",
            node_name="n",
            node_version="",
            refresh_seconds="1",
            live=True,
            page="agents",
            open_alerts=0,
            db_time="",
            title="Agents",
            rows=views.agent_rows([a], [al]),
            counts=views.agent_counts({AgentStatus.ONLINE: 1}),
            total=1,
            limit=1000,
            offline_after=views.offline_after_text(60, 3),
            alerts=[views.agent_alert_row(al)],
        )
    )
    assert "<img" not in html
    assert html.count("&lt;img src=x onerror=&#34;alert(1)&#34;&gt;") >= 8
