"""The HTTPS API of a real node process: what works, how every malformed request is refused
with a 4xx that names the problem (never a 5xx), and ``/healthz`` reporting a wedged node."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.nodes import Cluster, NodeProcess, query
from tests.support.postgres import Server
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def node(
    pg_server: Server, pg_template: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[NodeProcess]:
    """One node for the whole module: these tests only read or are refused."""
    url = pg_server.create("api_tests", template=pg_template)
    cluster = Cluster(url, Path(tmp_path_factory.mktemp("api")))
    try:
        yield cluster.start("api-node")
    finally:
        cluster.close()
        pg_server.drop("api_tests")


def test_health_ready_metrics_and_nodes(node: NodeProcess) -> None:
    assert node.request("GET", "/healthz") == (
        200,
        {"status": "ok", "phase": "online", "degraded": []},
    )
    assert node.request("GET", "/readyz") == (200, {"ready": True, "reasons": []})
    status, body = node.request("GET", "/api/nodes")
    assert status == 200
    (me,) = body["nodes"]
    assert me["name"] == "api-node" and me["status"] == "Online" and me["version"]
    status, _ = node.request("POST", "/api/jobs", {"type": "noop"})
    assert status == 201
    import ssl
    import urllib.request

    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    with urllib.request.urlopen(node.url + "/metrics", context=ctx) as r:
        text = r.read().decode()
    for metric in (
        "dsm_jobs_total",
        "dsm_job_claim_duration_seconds",
        "dsm_queue_depth",
        "dsm_node_status",
        "dsm_heartbeat_age_seconds",
    ):
        assert metric in text


def test_enqueue_get_and_stats(node: NodeProcess) -> None:
    status, body = node.request("POST", "/api/jobs", {"jobs": [{"type": "noop"}] * 3})
    assert status == 201 and len(body["ids"]) == 3
    status, job = node.request("GET", f"/api/jobs/{body['ids'][0]}")
    assert status == 200 and job["type"] == "noop"
    status, dup = node.request(
        "POST",
        "/api/jobs",
        {"type": "sleep", "payload": {"seconds": 60}, "uniqueKey": "k", "delaySeconds": 600},
    )
    assert status == 201
    status, dup = node.request(
        "POST", "/api/jobs", {"type": "sleep", "payload": {"seconds": 60}, "uniqueKey": "k"}
    )
    assert (status, dup) == (200, {"ids": [], "duplicates": 1})
    status, stats = node.request("GET", "/api/jobs/stats?windowSeconds=600")
    assert status == 200 and set(stats) == {"windowSeconds", "byNode", "byType", "byNodeAndType"}


BAD_REQUESTS = [
    # (method, path, raw body, expected status, words the message must contain)
    ("POST", "/api/jobs", b"{not json", 400, "not valid JSON"),
    ("POST", "/api/jobs", b"", 400, "empty"),
    ("POST", "/api/jobs", b"[1, 2]", 400, "JSON object"),
    ("POST", "/api/jobs", b'"noop"', 400, "JSON object"),
    ("POST", "/api/jobs", b'{"type": "no_such_type"}', 400, "unknown job type"),
    ("POST", "/api/jobs", b'{"payload": {}}', 400, "type"),
    ("POST", "/api/jobs", b'{"type": ""}', 400, "type"),
    ("POST", "/api/jobs", b'{"type": 7}', 400, "type"),
    ("POST", "/api/jobs", b'{"type": "noop", "payload": [1]}', 400, "payload"),
    ("POST", "/api/jobs", b'{"type": "noop", "priority": 99999}', 400, "priority"),
    ("POST", "/api/jobs", b'{"type": "noop", "maxAttempts": 0}', 400, "maxAttempts"),
    ("POST", "/api/jobs", b'{"type": "noop", "timeoutSeconds": -1}', 400, "timeoutSeconds"),
    ("POST", "/api/jobs", b'{"type": "noop", "delaySeconds": -5}', 400, "delaySeconds"),
    ("POST", "/api/jobs", b'{"type": "noop", "runAt": "tomorrow"}', 400, "runAt"),
    ("POST", "/api/jobs", b'{"type": "noop", "runAt": "2030-01-01T00:00:00"}', 400, "time zone"),
    ("POST", "/api/jobs", b'{"type": "noop", "color": "red"}', 400, "color"),
    ("POST", "/api/jobs", b'{"type": "sleep", "payload": {"seconds": "x"}}', 400, "seconds"),
    ("POST", "/api/jobs", b'{"type": "sleep", "payload": {}}', 400, "seconds"),
    ("POST", "/api/jobs", b'{"jobs": []}', 400, "jobs"),
    ("POST", "/api/jobs", b'{"jobs": [{"type": "noop"}, {"type": "nope"}]}', 400, "nope"),
    ("POST", "/api/jobs", b'{"jobs": "noop"}', 400, "jobs"),
    ("GET", "/api/jobs/abc", None, 400, "positive integer"),
    ("GET", "/api/jobs/-1", None, 400, "positive integer"),
    ("GET", "/api/jobs/99999999999999999999", None, 400, "positive integer"),
    ("GET", "/api/jobs/424242", None, 404, "no job"),
    ("GET", "/api/jobs/stats?windowSeconds=abc", None, 400, "windowSeconds"),
    ("GET", "/api/jobs/stats?windowSeconds=-1", None, 400, "windowSeconds"),
    ("GET", "/api/jobs/stats?windowSeconds=nan", None, 400, "windowSeconds"),
    ("GET", "/api/no/such/path", None, 404, "Not Found"),
    ("DELETE", "/api/jobs", None, 405, "Not Allowed"),
]


@pytest.mark.parametrize(
    ("method", "path", "raw", "status", "words"),
    BAD_REQUESTS,
    ids=[f"{m} {p} {r!r}"[:60] for m, p, r, _, _ in BAD_REQUESTS],
)
def test_malformed_requests_get_4xx_naming_the_problem(
    node: NodeProcess, method: str, path: str, raw: bytes | None, status: int, words: str
) -> None:
    got, body = node.request(method, path, raw=raw)
    assert got == status, body
    assert isinstance(body, dict) and words.lower() in body["error"].lower(), body


def test_malformed_requests_store_nothing(node: NodeProcess) -> None:
    from dsm_node import node as _node  # noqa: F401  (registers every built-in job type)
    from dsm_node.jobs.registry import REGISTRY

    # jobs the test did not send: the periodic ones, which run on their own schedule
    periodic = sorted({p.job_type for p in REGISTRY.periodic.values()})
    count = (
        "SELECT (SELECT count(*) FROM jobs WHERE type <> ALL(%(p)s)) + "
        "(SELECT count(*) FROM job_history WHERE type <> ALL(%(p)s))"
    )
    before = query(node.database_url, count, {"p": periodic})
    for _, path, raw, _, _ in BAD_REQUESTS:
        if path == "/api/jobs" and raw:
            node.request("POST", path, raw=raw)
    assert query(node.database_url, count, {"p": periodic}) == before


def test_healthz_says_stuck_when_the_nodes_loop_is_blocked(node: NodeProcess) -> None:
    """The API answers from its own thread; /healthz still reports whether the node's own event
    loop answers, so a liveness probe restarts a wedged node."""
    status, body = node.request(
        "POST", "/api/jobs", {"type": "block_event_loop", "payload": {"seconds": 8}}
    )
    assert status == 201, body
    stuck = wait_until(
        lambda: (r := node.request("GET", "/healthz"))[0] == 503 and r, 30, "healthz 503"
    )
    assert stuck[1]["status"] == "stuck" and "event loop" in stuck[1]["degraded"][0]
    assert node.request("GET", "/api/nodes")[0] == 200  # the API itself still answers
    wait_until(lambda: node.request("GET", "/healthz")[0] == 200, 60, "healthz 200 again")
