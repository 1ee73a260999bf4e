"""The administrator's console in a real browser, against real nodes on a real PostgreSQL:
issue 13's scenarios, one test each (a failing scenario names itself)."""

from __future__ import annotations

import http.server
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, BrowserContext, Page, expect

from tests.console.helpers import (
    ADMIN_PASSWORD,
    AUDITOR_PASSWORD,
    create_auditor,
    csrf_of,
    data,
    nav,
    served_by,
    shot,
    sign_in,
    start_nodes,
    status_cell,
)
from tests.support import agents
from tests.support.loopback import next_address
from tests.support.nodes import REPO, Cluster, NodeProcess, query
from tests.support.tcpproxy import Proxy
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration
# the next software version, with its test migration (as in tests/integration/test_lifecycle.py)
V2 = {
    "DSM_SOFTWARE_VERSION": "0.2.0",
    "DSM_EXTRA_MIGRATIONS_DIR": str(REPO / "tests" / "support" / "migrations_v2"),
}


def api_statuses(node: NodeProcess) -> dict[str, str]:
    status, body = node.request("GET", "/api/nodes")
    assert status == 200, body
    return {n["name"]: n["status"] for n in body["nodes"]}


def stop_until_offline(viewer: NodeProcess, node: NodeProcess) -> None:
    """SIGTERM, then wait until the cluster says Offline: a node stopped before its start had
    finished does not mark itself offline and turns Offline only after the threshold."""
    node.stop()
    wait_until(lambda: api_statuses(viewer)[node.name] == "Offline", 60, f"{node.name} Offline")


@pytest.fixture
def balancer(dsm_cluster: Cluster) -> Iterator[tuple[Proxy, list[NodeProcess]]]:
    """Two nodes behind one host name: a TCP proxy choosing a node per connection."""
    nodes = start_nodes(dsm_cluster, ["node-1", "node-2"])
    proxy = Proxy(listen_host=next_address(), targets=[(n.address, n.port) for n in nodes])
    yield proxy, nodes
    proxy.close()


def test_a_session_made_on_one_node_is_valid_on_another(
    balancer: tuple[Proxy, list[NodeProcess]], page: Page, context: BrowserContext, artifacts: Path
) -> None:
    proxy, _ = balancer
    base = f"https://{proxy.host}:{proxy.port}"
    proxy.prefer(0)
    page.goto(base + "/manager-nodes")
    expect(page).to_have_url(base + "/sign-in?next=/manager-nodes")
    shot(page, artifacts, "sign-in", readme=True)
    sign_in(page, base)
    assert served_by(page) == "node-1"
    (cookie,) = context.cookies()
    assert cookie["name"] == "__Host-dsm-session"
    assert cookie["httpOnly"] and cookie["secure"] and cookie["sameSite"] == "Strict"
    assert cookie["path"] == "/"

    proxy.prefer(1)
    proxy.drop()  # the browser's open connections end: its next request reaches node-2
    page.reload()
    expect(page.get_by_role("heading", level=1, name="Manager Nodes")).to_be_visible()
    assert served_by(page) == "node-2"

    page.get_by_role("button", name="Sign out").click()
    expect(page).to_have_url(base + "/sign-in")
    assert context.cookies() == []
    # the session is gone from the database: the old cookie opens nothing on either node
    for i in (0, 1):
        proxy.prefer(i)
        proxy.drop()
        context.add_cookies([{**cookie, "sameSite": "Strict"}])
        page.goto(base + "/system-information")
        expect(page).to_have_url(base + "/sign-in?next=/system-information")


def test_a_killed_node_turns_offline_without_a_reload(
    dsm_cluster: Cluster, page: Page, artifacts: Path
) -> None:
    one, _, three = start_nodes(dsm_cluster, ["node-1", "node-2", "node-3"])
    sign_in(page, one.url)
    for name in ("node-1", "node-2", "node-3"):
        expect(status_cell(page, name)).to_have_text("Online")
    page.evaluate("window.notReloaded = true")
    three.kill()
    expect(status_cell(page, "node-3")).to_have_text("Offline")
    assert page.evaluate("window.notReloaded === true"), "the page was reloaded"
    expect(status_cell(page, "node-1")).to_have_text("Online")
    # the words say it, and the icon beside them says it too (not colour alone)
    assert "Offline" in page.locator("#nodes-summary").inner_text()
    assert status_cell(page, "node-3").locator("svg.icon").count() == 1
    shot(page, artifacts, "manager-nodes", readme=True)


def test_decommission_is_refused_with_the_reason_while_online_and_done_when_offline(
    dsm_cluster: Cluster, page: Page, artifacts: Path
) -> None:
    one, two = start_nodes(dsm_cluster, ["node-1", "node-2"])
    sign_in(page, one.url)
    page.get_by_role("link", name="node-2").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Node node-2")
    page.get_by_role("button", name="Decommission").click()
    expect(page.locator("#decommission-error")).to_contain_text(
        "Node node-2 is Online: only an Offline node can be decommissioned"
    )
    shot(page, artifacts, "decommission-refused")
    assert api_statuses(one)["node-2"] == "Online"

    two.stop()  # SIGTERM: the node shows Offline at once
    page.goto(one.url + "/manager-nodes/node-2")
    expect(page.locator("#node-status [data-status]")).to_have_text("Offline")
    shot(page, artifacts, "node-properties", readme=True)
    page.get_by_role("button", name="Decommission").click()
    expect(page.locator("#node-status [data-status]")).to_have_text("Decommissioned")
    assert "node-2" not in api_statuses(one)
    nav(page, "Manager Nodes").click()
    expect(page.locator("#nodes-table tbody tr")).to_have_count(1)

    nav(page, "Audit Log").click()
    actions = data(page.locator("#audit-table tbody tr"), "action")
    assert {"action": "decommission-node"} in actions
    assert {"action": "decommission-refused"} in actions
    shot(page, artifacts, "audit-log", readme=True)


Stats = dict[str, Any]


def _agree(
    node: NodeProcess, read_page: Callable[[], Any], check: Callable[[Stats, Any], None]
) -> None:
    """Waits until ``check(stats, shown)`` passes for the API's stats and what the page shows,
    with the API's answer unchanged around the page read (periodic jobs may finish at any
    moment). Judged by behaviour, not time: the page refreshes itself every heartbeat, so it
    may lag the API by a refresh and must catch up by itself. When it never does, the failure
    names the last difference."""
    last: list[str] = []

    def attempt() -> bool:
        before = node.request("GET", "/api/jobs/stats")[1]
        shown = read_page()
        after = node.request("GET", "/api/jobs/stats")[1]
        if before != after:
            return False
        try:
            check(after, shown)
        except AssertionError as e:
            last[:] = [f"last difference: {e}"]
            return False
        return True

    wait_until(attempt, 60, "the page to show the API's counts", detail=lambda: "".join(last))


def test_each_graph_shows_the_counts_the_api_reports(
    dsm_cluster: Cluster, page: Page, artifacts: Path
) -> None:
    nodes = start_nodes(dsm_cluster, ["node-1", "node-2", "node-3"])
    one = nodes[0]
    jobs = [{"type": "noop"}] * 120 + [{"type": "sleep", "payload": {"seconds": 0.02}}] * 45
    status, body = one.request("POST", "/api/jobs", {"jobs": jobs})
    assert status == 201, body
    # a local job: runs once on every node, so three types ran on three nodes
    assert one.request("POST", "/api/jobs", {"type": "clear_caches"})[0] == 201
    url = dsm_cluster.database_url
    wait_until(
        lambda: (
            query(url, "SELECT count(*) FROM jobs WHERE type IN ('noop','sleep','clear_caches')")
            == [(0,)]
        ),
        120,
        "the jobs to finish",
    )
    statuses = api_statuses(one)
    sign_in(page, one.url)
    nav(page, "System Information").click()

    def stats_now() -> Stats:
        status, body = one.request("GET", "/api/jobs/stats")
        assert status == 200, body
        return dict(body)

    def show(graph: str) -> None:
        page.get_by_label("Graph", exact=True).select_option(graph)
        page.get_by_role("button", name="Show").click()
        expect(page.locator("#graph-region")).to_have_attribute("data-graph", graph)

    def every_node(stats: Stats) -> dict[str, int]:
        """Jobs by node as a graph shows them: idle nodes with 0, departed ones too."""
        return {n: stats["byNode"].get(n, 0) for n in {*statuses, *stats["byNode"]}}

    show("map")
    per_minute_script = """[...document.querySelectorAll('g.map-node')].map(g => [g.dataset.node,
        g.querySelector('g.sparkline').dataset.counts.split(',').map(Number)])"""

    def check_map(stats: Stats, shown: Any) -> None:
        nodes_shown, per_minute = shown
        by_node = stats["byNode"]
        assert {s["node"]: int(s["count"]) for s in nodes_shown} == {
            n: by_node.get(n, 0) for n in statuses
        }
        assert {s["node"]: s["status"] for s in nodes_shown} == statuses
        assert all(by_node.get(n, 0) > 0 for n in statuses)
        # the activity graph spreads each node's jobs over the minutes of the hour (the test is
        # far shorter than an hour, so no job has left the window)
        assert {node: len(series) for node, series in per_minute} == {n: 60 for n in statuses}
        assert {node: sum(series) for node, series in per_minute} == {
            n: by_node.get(n, 0) for n in statuses
        }

    _agree(
        one,
        lambda: (
            data(page.locator("g.map-node"), "node", "status", "count"),
            page.evaluate(per_minute_script),
        ),
        check_map,
    )
    shot(page, artifacts, "system-information-map", readme=True)

    show("by-node")

    def check_by_node(stats: Stats, shown: Any) -> None:
        assert {s["node"]: int(s["count"]) for s in shown} == every_node(stats)

    _agree(one, lambda: data(page.locator("g.bar"), "node", "count"), check_by_node)
    shot(page, artifacts, "system-information-by-node", readme=True)

    show("by-type")

    def check_by_type(stats: Stats, shown: Any) -> None:
        assert {s["type"]: int(s["count"]) for s in shown} == stats["byType"]
        assert {"noop", "sleep", "clear_caches"} <= set(stats["byType"])
        assert stats["byType"]["noop"] == 120 and stats["byType"]["sleep"] == 45

    _agree(one, lambda: data(page.locator("g.bar"), "type", "count"), check_by_type)
    shot(page, artifacts, "system-information-by-type", readme=True)

    show("by-node-and-type")

    def check_by_node_and_type(stats: Stats, shown: Any) -> None:
        cells: dict[tuple[str, str], int] = {}
        for r in stats["byNodeAndType"]:  # the API splits by outcome; the graph sums them
            cells[(r["node"], r["type"])] = cells.get((r["node"], r["type"]), 0) + r["count"]
        segments, rows = shown
        assert {(s["node"], s["type"]): int(s["count"]) for s in segments} == cells
        assert {r["node"]: int(r["total"]) for r in rows} == every_node(stats)
        assert all(cells.get((n, "clear_caches")) == 1 for n in statuses)

    def read_by_node_and_type() -> Any:
        return (
            data(page.locator("g.segment"), "node", "type", "count"),
            data(page.locator("g.row"), "node", "total"),
        )

    _agree(one, read_by_node_and_type, check_by_node_and_type)
    # the numbers are also a table, for people who cannot see the graph
    page.get_by_text("Show the numbers as a table").click()
    expect(page.locator("#graph-data")).to_be_visible()
    shot(page, artifacts, "system-information-by-node-and-type", readme=True)

    # the graph follows new jobs by itself: no reload, the page's numbers catch up with the API's
    page.evaluate("window.notReloaded = true")
    assert one.request("POST", "/api/jobs", {"jobs": [{"type": "noop"}] * 30})[0] == 201
    wait_until(lambda: stats_now()["byType"].get("noop") == 150, 120, "30 more noop jobs")
    _agree(one, read_by_node_and_type, check_by_node_and_type)
    assert page.evaluate("window.notReloaded === true"), "the page was reloaded"

    # Manager Nodes' "Jobs, last hour" column says the same
    nav(page, "Manager Nodes").click()

    def check_jobs_column(stats: Stats, shown: Any) -> None:
        assert {r["node"]: int(r["jobs"]) for r in shown} == {
            n: stats["byNode"].get(n, 0) for n in statuses
        }

    jobs_script = """rows => rows.map(r => ({node: r.dataset.node,
        jobs: r.querySelector('[data-jobs]').dataset.jobs}))"""
    _agree(
        one,
        lambda: page.locator("#nodes-table tbody tr").evaluate_all(jobs_script),
        check_jobs_column,
    )


def test_an_upgrade_shows_offline_upgrade_required(
    dsm_cluster: Cluster, page: Page, artifacts: Path
) -> None:
    start_nodes(dsm_cluster, ["node-1", "node-2"])
    newer = dsm_cluster.start("node-3", **V2)  # a higher DSM_SOFTWARE_VERSION: it takes over
    sign_in(page, newer.url)
    for name in ("node-1", "node-2"):
        expect(status_cell(page, name)).to_have_text("Offline (Upgrade Required)")
    expect(status_cell(page, "node-3")).to_have_text("Online")
    versions = data(page.locator("#nodes-table tbody tr"), "node")
    assert [v["node"] for v in versions] == ["node-1", "node-2", "node-3"]
    shot(page, artifacts, "manager-nodes-upgrade")
    page.goto(newer.url + "/system-information?graph=map")
    shown = data(page.locator("g.map-node"), "node", "status")
    assert {s["node"]: s["status"] for s in shown} == {
        "node-1": "Offline (Upgrade Required)",
        "node-2": "Offline (Upgrade Required)",
        "node-3": "Online",
    }


def test_the_auditor_sees_everything_and_changes_nothing(
    dsm_cluster: Cluster, page: Page, artifacts: Path
) -> None:
    one, two = start_nodes(dsm_cluster, ["node-1", "node-2"])
    auditor = create_auditor(one)
    stop_until_offline(one, two)  # an administrator could decommission it now
    sign_in(page, one.url, auditor, AUDITOR_PASSWORD)
    for link, heading in [
        ("System Information", "System Information"),
        ("Alerts", "Alerts"),
        ("Audit Log", "Audit Log"),
        ("Manager Nodes", "Manager Nodes"),
    ]:
        nav(page, link).click()
        expect(page.get_by_role("heading", level=1)).to_have_text(heading)
    page.get_by_role("link", name="node-2").click()
    expect(page.locator("#node-status [data-status]")).to_have_text("Offline")
    expect(page.get_by_role("button", name="Decommission")).to_have_count(0)
    expect(page.locator("#read-only")).to_contain_text("you can see everything and change nothing")
    shot(page, artifacts, "auditor-node-properties")
    # a forged POST with the auditor's own session, token and origin is refused all the same
    response = page.request.post(
        one.url + "/manager-nodes/node-2/decommission",
        form={"csrf_token": csrf_of(page)},
        headers={"Origin": one.url},
        max_redirects=0,
    )
    assert response.status == 403, response.text()
    assert "needs administrator" in response.text()
    assert api_statuses(one)["node-2"] == "Offline"


class _AttackerSite:
    """A page on another origin with a form that posts to the console (no script needed)."""

    def __init__(self, target: str) -> None:
        page = (
            "<!doctype html><title>Win a prize</title>"
            f'<form method="post" action="{target}">'
            '<input type="hidden" name="csrf_token" value="guessed">'
            "<button>Claim</button></form>"
        ).encode()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(page)))
                self.end_headers()
                self.wfile.write(page)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer((next_address(), 0), Handler)
        self.url = f"http://{self.server.server_address[0]}:{self.server.server_address[1]}/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_forged_token_missing_session_and_foreign_origin_are_refused(
    dsm_cluster: Cluster, page: Page, context: BrowserContext, browser: Browser, artifacts: Path
) -> None:
    one, two = start_nodes(dsm_cluster, ["node-1", "node-2"])
    stop_until_offline(one, two)  # decommissioning it would succeed if a request got through
    target = one.url + "/manager-nodes/node-2/decommission"
    sign_in(page, one.url)
    page.goto(one.url + "/manager-nodes/node-2")
    token = csrf_of(page)

    # a page of another site submits a form to the console in the signed-in browser
    attacker = _AttackerSite(target)
    try:
        other = context.new_page()
        other.goto(attacker.url)
        with other.expect_response(target) as answer:
            other.get_by_role("button", name="Claim").click()
        assert answer.value.status == 403
        expect(other.locator("#error")).to_contain_text("cross-origin request")
        shot(other, artifacts, "cross-site-form-refused")
        other.close()
    finally:
        attacker.close()

    anonymous = browser.new_context(ignore_https_errors=True)  # no cookies at all

    def post(
        form: dict[str, str], origin: str | None, with_session: bool = True
    ) -> tuple[int, str]:
        headers = {"Origin": origin} if origin else {}
        request = page.request if with_session else anonymous.request
        r = request.post(target, form=form, headers=headers, max_redirects=0)
        return r.status, r.text()

    status, text = post({"csrf_token": "0" * 64}, one.url)
    assert status == 403 and "security token does not match" in text
    status, text = post({}, one.url)
    assert status == 403 and "security token does not match" in text
    status, text = post({"csrf_token": token}, "https://evil.example")
    assert status == 403 and "cross-origin request from https://evil.example" in text
    status, text = post({"csrf_token": token}, None)  # no Origin and no Referer at all
    assert status == 403 and "neither where it comes from" in text
    status, text = post({"csrf_token": token}, one.url, with_session=False)
    assert status == 401 and "not signed in" in text
    assert api_statuses(one)["node-2"] == "Offline"  # nothing got through
    # the same request with everything right succeeds: the refusals were for their reasons
    status, _ = post({"csrf_token": token}, one.url)
    assert status == 303
    assert "node-2" not in api_statuses(one)
    # and a page without a session is never shown
    try:
        p = anonymous.new_page()
        for path in ("/manager-nodes", "/system-information", "/alerts", "/audit-log"):
            p.goto(one.url + path)
            expect(p).to_have_url(f"{one.url}/sign-in?next={path}")
    finally:
        anonymous.close()


def test_alerts_show_manager_time_out_of_sync(
    dsm_cluster: Cluster, page: Page, artifacts: Path
) -> None:
    (one,) = start_nodes(dsm_cluster, ["node-1"])
    sign_in(page, one.url)
    nav(page, "Alerts").click()
    expect(page.locator("#alerts-table tbody tr[data-alert]")).to_have_count(0)
    expect(page.locator("#open-alerts .badge")).to_have_count(0)
    page.evaluate("window.notReloaded = true")
    # a node whose clock is two minutes ahead joins: the alert appears without a reload, and
    # so does the open-alerts badge of the menu (every live page keeps it current)
    skewed = dsm_cluster.start("node-2", DSM_CLOCK_OFFSET_SECONDS="120")
    row = page.locator('#alerts-table tr[data-alert="Manager Time Out of Sync"]')
    expect(row).to_have_attribute("data-node", "node-2")
    expect(row).to_contain_text("120")
    expect(page.locator("#open-alerts .badge")).to_have_text("1")
    assert page.evaluate("window.notReloaded === true"), "the page was reloaded"
    shot(page, artifacts, "alerts", readme=True)
    skewed.kill()


def test_usable_on_a_phone_and_by_keyboard_with_strict_headers(
    dsm_cluster: Cluster, page: Page, artifacts: Path
) -> None:
    (one,) = start_nodes(dsm_cluster, ["node-1"])
    origin = one.url
    outside: list[str] = []
    page.on("request", lambda r: outside.append(r.url) if not r.url.startswith(origin) else None)
    # keyboard only: sign in, then reach a node's properties
    page.goto(origin + "/")
    # the user name field takes the focus by itself (once the browser has rendered the page)
    expect(page.get_by_label("User name")).to_be_focused()
    page.keyboard.type("admin")
    page.keyboard.press("Tab")
    page.keyboard.type(ADMIN_PASSWORD)
    page.keyboard.press("Enter")
    expect(page.get_by_role("heading", level=1, name="Manager Nodes")).to_be_visible()
    page.keyboard.press("Tab")
    expect(page.locator(":focus")).to_have_text("Skip to content")
    page.keyboard.press("Enter")
    for _ in range(30):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.textContent") == "node-1":
            break
    page.keyboard.press("Enter")
    expect(page.get_by_role("heading", level=1)).to_have_text("Node node-1")

    pages = [
        "/manager-nodes",
        "/manager-nodes/node-1",
        "/system-information",
        "/alerts",
        "/audit-log",
        "/agents",
    ]
    for path in pages:
        response = page.goto(origin + path)
        assert response is not None and response.status == 200
        headers = response.headers
        csp = headers["content-security-policy"]
        assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert "'unsafe-inline'" not in csp and "'unsafe-eval'" not in csp
        assert headers["x-frame-options"] == "DENY"
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["referrer-policy"] == "same-origin"
        assert headers["cache-control"] == "no-store"
        # every control has a label
        unlabelled = page.evaluate(
            """[...document.querySelectorAll('input:not([type=hidden]), select, textarea')]
               .filter(e => !e.labels || e.labels.length === 0).map(e => e.name)"""
        )
        assert unlabelled == [], (path, unlabelled)
    page.set_viewport_size({"width": 390, "height": 844})
    for path in pages:
        page.goto(origin + path)
        overflow = page.evaluate(
            "document.documentElement.scrollWidth - document.documentElement.clientWidth"
        )
        wide = page.evaluate(
            """[...document.querySelectorAll('body *')]
               .filter(e => e.getBoundingClientRect().right > document.documentElement.clientWidth
                            && !e.closest('.table-wrap, .chart-frame'))
               .map(e => e.tagName + '.' + e.className + '#' + e.id).slice(0, 5)"""
        )
        assert overflow <= 0, f"{path} scrolls sideways on a phone by {overflow} px: {wide}"
    page.goto(origin + "/manager-nodes")
    shot(page, artifacts, "phone-manager-nodes", readme=True)
    assert outside == [], f"requests left the node: {outside}"


def _agents_agree(page: Page, node: NodeProcess, status: str) -> None:
    """Waits until the rows on the page (read in one go) are the agents ``GET /api/agents``
    lists, all with ``status``, with the same last node and version, and the open agent alerts
    are ``GET /api/agents/alerts``'s; the API's answers unchanged around the page read (an agent
    may change status at any moment). Judged by behaviour: the page refreshes itself and must
    catch up; a failure names the last difference."""
    last: list[str] = []

    def api() -> tuple[dict[int, tuple[str, str, str, str]], list[tuple[str, str]]]:
        code, agents_body = node.request("GET", "/api/agents")
        assert code == 200, agents_body
        code, alerts_body = node.request("GET", "/api/agents/alerts")
        assert code == 200, alerts_body
        listed = {
            a["id"]: (a["hostname"], a["status"], a["lastNode"] or "", a["version"] or "")
            for a in agents_body["agents"]
        }
        return listed, sorted((a["type"], a["hostname"]) for a in alerts_body["alerts"])

    def attempt() -> bool:
        before = api()
        rows = data(
            page.locator("#agents-table tbody tr[data-agent]"),
            "id",
            "agent",
            "status",
            "node",
            "version",
        )
        alerts = data(page.locator("#agent-alerts-table tbody tr[data-alert]"), "alert", "agent")
        after = api()
        if before != after:
            return False
        listed, open_alerts = after
        try:
            assert {
                int(r["id"]): (r["agent"], r["status"], r["node"], r["version"]) for r in rows
            } == listed
            assert sorted((a["alert"], a["agent"]) for a in alerts) == open_alerts
            assert {v[1] for v in listed.values()} == {status}, listed
        except AssertionError as e:
            last[:] = [f"last difference: {e}"]
            return False
        return True

    wait_until(
        attempt, 60, f"the Agents page to agree with the API ({status})", lambda: "".join(last)
    )


def test_agents_show_their_status_and_agree_with_the_api(
    dsm_cluster: Cluster, page: Page, artifacts: Path, tmp_path: Path
) -> None:
    # agents heartbeat every second and are Offline after three missed heartbeats
    agents.agent_settings(dsm_cluster.database_url, interval=1, missed=3)
    (one,) = start_nodes(dsm_cluster, ["node-1"])  # serves the console, not agents
    two = agents.start_node(dsm_cluster, "node-2", DSM_ADMIN_PASSWORD=ADMIN_PASSWORD)
    agents.wait_serving(two)
    sign_in(page, one.url)
    nav(page, "Agents").click()
    expect(page.get_by_role("heading", level=1, name="Agents")).to_be_visible()
    rows = page.locator("#agents-table tbody tr[data-agent]")
    expect(rows).to_have_count(0)
    page.evaluate("window.notReloaded = true")

    secret, pin = agents.token(two, uses=3)
    sim = agents.Simulator([agents.manager_of(two)], 3, 1.0, 0, tmp_path / "agents", secret, pin)
    sim.start()
    try:
        # they appear without a reload, Online, heard by node-2 (the page is node-1's)
        online = page.locator('#agents-table tbody tr[data-status="Online"][data-node="node-2"]')
        expect(online).to_have_count(3)
        assert served_by(page) == "node-1"
        _agents_agree(page, one, "Online")
        expect(page.locator('#agents-region [data-count="Online"] .n')).to_have_text("3")
        # a live heartbeat: an age by the database's clock, and a measured clock
        first = rows.first
        expect(first).to_contain_text(re.compile(r"just now| s ago"))
        expect(first).to_contain_text(re.compile(r"the database"))
        shot(page, artifacts, "agents", readme=True)
    finally:
        sim.kill()
    # the agents fall silent: Offline after three missed heartbeats, each with an open alert
    offline = page.locator('#agents-table tbody tr[data-status="Offline"][data-alerts="1"]')
    expect(offline).to_have_count(3)
    expect(page.locator("#agent-alerts-table tbody tr[data-alert]")).to_have_count(3)
    _agents_agree(page, one, "Offline")
    assert page.evaluate("window.notReloaded === true"), "the page was reloaded"
