"""Node lifecycle with real node processes: upgrade takeover (and an old node that was paused
through it learning it needs an upgrade), a migrating node healthy but not ready, refusals that
change nothing, a restarted node reusing its name, decommission, sign-in on any node, secret
settings and master-key rotation, and the clock check."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from dsm_node.db import migrating
from tests.support.jobtypes import CREATE_EFFECTS
from tests.support.nodes import API_KEY, Cluster, NodeProcess, query, set_settings
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

V2_MIGRATIONS = str(Path(__file__).parents[1] / "support" / "migrations_v2")
# The schema version the test-only "next version" reaches.
V2_SCHEMA = migrating.load_migrations([Path(V2_MIGRATIONS)])[-1].version
V2 = {"DSM_SOFTWARE_VERSION": "0.2.0", "DSM_EXTRA_MIGRATIONS_DIR": V2_MIGRATIONS}
ADMIN_PASSWORD = "correct horse battery staple"


def prepare(url: str, threshold: float = 5.0) -> None:
    query(url, CREATE_EFFECTS)
    set_settings(url, heartbeat_interval_seconds=0.5, offline_threshold_seconds=threshold)


def statuses(node: NodeProcess) -> dict[str, str]:
    status, body = node.request("GET", "/api/nodes")
    assert status == 200, body
    return {n["name"]: n["status"] for n in body["nodes"]}


def state_of(url: str) -> Any:
    """What a refused node must not change (heartbeat times aside)."""
    return (
        query(url, "SELECT name, status, epoch, version FROM nodes ORDER BY name"),
        query(url, "SELECT version, state, wrapped_key FROM master_keys ORDER BY version"),
        query(url, "SELECT schema_version, software_version FROM dsm_schema"),
        query(url, "SELECT count(*) FROM users"),
        query(url, "SELECT count(*) FROM api_keys"),
    )


def rows_id(url: str) -> int:
    return int(query(url, "SELECT min(id) FROM nodes WHERE name LIKE 'b%'")[0][0])


def refused(node: NodeProcess, timeout: float = 60) -> str:
    assert node.proc is not None
    code = node.proc.wait(timeout)
    assert code == 2, node.log_tail()
    return node.log_text()


class Producer(threading.Thread):
    """Submits jobs through whichever node answers, all through an upgrade."""

    def __init__(self, nodes: list[NodeProcess]) -> None:
        super().__init__(daemon=True)
        self.nodes = nodes
        self.ids: list[int] = []
        self.stop = threading.Event()

    def run(self) -> None:
        i = 0
        while not self.stop.is_set():
            node = self.nodes[i % len(self.nodes)]
            i += 1
            try:
                status, body = node.request(
                    "POST", "/api/jobs", {"jobs": [{"type": "record_effect"}] * 20}
                )
            except OSError:
                continue
            if status == 201:
                self.ids += body["ids"]
            time.sleep(0.1)


def test_upgrade_takes_over_and_loses_no_job(dsm_cluster: Cluster) -> None:
    url = dsm_cluster.database_url
    prepare(url)
    a, b, c = (dsm_cluster.start(n) for n in "abc")
    producer = Producer([a, b, c])
    producer.start()
    time.sleep(1.5)
    # upgrade a: stop it, start it with the next version (which carries a schema change)
    assert a.stop() == 0
    a = dsm_cluster.start("a", **V2)
    producer.nodes = [a, b, c]
    assert query(url, "SELECT schema_version, software_version FROM dsm_schema") == [
        (V2_SCHEMA, "0.2.0")
    ]
    assert statuses(a) == {
        "a": "Online",
        "b": "Offline (Upgrade Required)",
        "c": "Offline (Upgrade Required)",
    }
    for old in (b, c):
        # Unready first for a lost lease, then for the upgrade once its next attempt reads why.
        def upgrade_required(old: NodeProcess = old) -> bool:
            code, body = old.request("GET", "/readyz")
            return code == 503 and "Upgrade Required" in body["reasons"][0]

        wait_until(upgrade_required, 30, "old node unready: Upgrade Required")
        assert old.proc is not None and old.proc.poll() is None  # alive, working on nothing
        assert old.request("GET", "/healthz")[0] == 200
        assert "Offline (Upgrade Required)" in old.log_text()
    time.sleep(1.5)  # a alone does all the work meanwhile
    for name in ("b", "c"):
        assert dsm_cluster.nodes[name].stop() == 0
        dsm_cluster.start(name, **V2)
    assert statuses(a) == {"a": "Online", "b": "Online", "c": "Online"}
    time.sleep(1)
    producer.stop.set()
    producer.join()
    wait_until(
        lambda: query(url, "SELECT count(*) FROM jobs WHERE type = 'record_effect'") == [(0,)],
        60,
        "all jobs done",
        dsm_cluster.logs,
    )
    effects = dict(query(url, "SELECT job_id, count(*) FROM test_effects GROUP BY job_id"))
    assert len(producer.ids) > 100
    assert set(effects) == set(producer.ids), "a job was lost"
    assert set(effects.values()) == {1}, "a job ran twice"
    assert query(url, "SELECT DISTINCT version FROM nodes") == [("0.2.0",)]
    # an old node started now refuses, stays alive, and changes nothing
    before = state_of(url)
    old = dsm_cluster.start("d", wait=False)
    wait_until(lambda: "Upgrade Required" in old.log_text(), 60, "d refuses", old.log_tail)
    assert old.request("GET", "/readyz")[0] == 503
    assert old.proc is not None and old.proc.poll() is None
    assert state_of(url) == before


def test_refusals_change_nothing(dsm_cluster: Cluster, tmp_path: Path) -> None:
    url = dsm_cluster.database_url
    prepare(url)
    a = dsm_cluster.start("a")
    before = state_of(url)
    # wrong local secret
    wrong = dsm_cluster.start("x", wait=False, DSM_LOCAL_SECRET="not-the-cluster-secret")
    assert "local secret does not unlock" in refused(wrong)
    # no local secret at all
    none = dsm_cluster.start("y", wait=False, DSM_LOCAL_SECRET="")
    assert "no local secret" in refused(none)
    # a name already used by a live node
    twin = dsm_cluster.start("a", wait=False)
    assert "another node named 'a' is online" in refused(twin)
    # an unreachable database
    gone = dsm_cluster.start("z", wait=False, database_url="postgresql://dsm:dsm@127.0.0.1:1/x")
    assert "cannot reach the database" in refused(gone)
    # an invalid version string
    bad = dsm_cluster.start("v", wait=False, DSM_SOFTWARE_VERSION="latest")
    assert "not a valid version" in refused(bad)
    assert state_of(url) == before
    assert a.proc is not None and a.proc.poll() is None


def test_a_restarted_node_reuses_its_name(dsm_cluster: Cluster) -> None:
    url = dsm_cluster.database_url
    prepare(url)
    a = dsm_cluster.start("a")
    a.kill()
    again = dsm_cluster.start("a")  # its old heartbeat stops advancing: the name is free
    assert statuses(again) == {"a": "Online"}
    assert query(url, "SELECT epoch FROM nodes WHERE name = 'a'") == [(2,)]


def test_decommission_only_offline_nodes(dsm_cluster: Cluster) -> None:
    url = dsm_cluster.database_url
    prepare(url)
    a, b = dsm_cluster.start("a"), dsm_cluster.start("b")
    status, body = a.request("POST", "/api/nodes/b/decommission")
    assert status == 409 and "only an Offline node" in body["error"]
    assert a.request("POST", "/api/nodes/nope/decommission")[0] == 404
    # a local job: it surely runs on b (plain jobs might all be claimed by a)
    status, _ = b.request("POST", "/api/jobs", {"type": "clear_caches"})
    assert status == 201
    wait_until(
        lambda: (
            query(
                url,
                "SELECT count(*) FROM job_history h JOIN nodes n "
                "ON n.id = h.node_id WHERE n.name = 'b'",
            )[0][0]
            > 0
        ),
        30,
        "b ran some jobs",
    )
    assert b.stop() == 0
    assert statuses(a)["b"] == "Offline"
    status, body = a.request("POST", "/api/nodes/b/decommission")
    assert (status, body) == (200, {"name": "b", "status": "Decommissioned"})
    assert "b" not in statuses(a)
    _, everything = a.request("GET", "/api/nodes?all=true")
    assert {n["name"]: n["status"] for n in everything["nodes"]}["b"] == "Decommissioned"
    # its history stays
    assert (
        query(
            url,
            "SELECT count(*) FROM job_history h JOIN nodes n ON n.id = h.node_id "
            "WHERE n.name = 'b'",
        )[0][0]
        > 0
    )
    # the audit log says who, where and from which node
    _, audit = a.request("GET", "/api/audit")
    entry = next(e for e in audit["entries"] if e["action"] == "decommission-node")
    assert entry["actor"].startswith("api-key:bootstrap-")
    assert (entry["node"], entry["target"]) == ("a", "b")
    # started again, it refuses to rejoin under the same identity
    before = state_of(url)
    again = dsm_cluster.start("b", wait=False)
    assert "decommissioned" in refused(again)
    assert state_of(url) == before
    # unless told that a node with this name is a new node (a new pod for a scaled-down ordinal)
    new_b = dsm_cluster.start("b", DSM_REUSE_DECOMMISSIONED_NAME="true")
    assert statuses(new_b)["b"] == "Online"
    rows = query(url, "SELECT name, status FROM nodes WHERE name LIKE 'b%' ORDER BY id")
    assert rows == [(f"b~decommissioned-{rows_id(url)}", "decommissioned"), ("b", "online")]
    assert (
        query(
            url,
            "SELECT count(*) FROM job_history h JOIN nodes n ON n.id = h.node_id "
            "WHERE n.name LIKE 'b~decommissioned-%'",
        )[0][0]
        > 0
    )


def test_sign_in_on_one_node_works_on_another(dsm_cluster: Cluster) -> None:
    url = dsm_cluster.database_url
    prepare(url)
    a = dsm_cluster.start("a", DSM_ADMIN_PASSWORD=ADMIN_PASSWORD)
    b = dsm_cluster.start("b")
    no_auth = {"Authorization": None}
    status, body = a.request("GET", "/api/nodes", headers=no_auth)
    assert status == 401 and "authentication required" in body["error"]
    assert a.request("GET", "/api/nodes", headers={"Authorization": "Bearer nope"})[0] == 401
    assert a.request("GET", "/healthz", headers=no_auth)[0] == 200
    status, session = a.request(
        "POST", "/api/sessions", {"username": "admin", "password": ADMIN_PASSWORD}, headers=no_auth
    )
    assert status == 201, session
    bearer = {"Authorization": f"Bearer {session['token']}"}
    assert b.request("GET", "/api/nodes", headers=bearer)[0] == 200
    # an auditor may look but not act
    status, _ = a.request(
        "POST",
        "/api/users",
        {"username": "ann", "password": "x" * 12, "role": "auditor", "email": "ann@example.org"},
    )
    assert status == 201
    _, s2 = b.request(
        "POST", "/api/sessions", {"username": "ann", "password": "x" * 12}, headers=no_auth
    )
    ann = {"Authorization": f"Bearer {s2['token']}"}
    status, body = a.request("POST", "/api/nodes/a/decommission", headers=ann)
    assert status == 403 and "administrator" in body["error"]
    # personal data is encrypted at rest and readable on every node
    assert "ann@example.org" not in json.dumps(query(url, "SELECT * FROM users", None), default=str)
    _, users = b.request("GET", "/api/users", headers=bearer)
    assert {u["username"]: u["email"] for u in users["users"]}["ann"] == "ann@example.org"
    # failed sign-ins are limited across nodes
    for node in (a, b, a, b, a):
        status, _ = node.request(
            "POST", "/api/sessions", {"username": "admin", "password": "wrong"}, headers=no_auth
        )
        assert status == 401
    status, body = b.request(
        "POST", "/api/sessions", {"username": "admin", "password": ADMIN_PASSWORD}, headers=no_auth
    )
    assert status == 429 and "too many" in body["error"]
    # signing out on b ends the session everywhere
    assert b.request("DELETE", "/api/sessions", headers=bearer)[0] == 200
    assert a.request("GET", "/api/nodes", headers=bearer)[0] == 401


def test_secret_settings_and_key_rotation(dsm_cluster: Cluster) -> None:
    url = dsm_cluster.database_url
    prepare(url)
    a, b = dsm_cluster.start("a"), dsm_cluster.start("b")
    assert (
        a.request("PUT", "/api/settings/secrets/smtp_password", {"value": "hunter2-smtp"})[0] == 200
    )
    assert b.request("GET", "/api/settings/secrets/smtp_password")[1]["value"] == "hunter2-smtp"
    (before,) = query(url, "SELECT ciphertext, key_version FROM secret_settings")
    assert "hunter2" not in before[0] and before[1] == 1
    status, body = b.request("POST", "/api/master-key/rotate")
    assert status == 202
    wait_until(
        lambda: (
            query(url, "SELECT state FROM master_keys ORDER BY version")
            == [("retired",), ("active",)]
        ),
        60,
        "rotation done",
        dsm_cluster.logs,
    )
    (after,) = query(url, "SELECT ciphertext, key_version FROM secret_settings")
    assert after[1] == 2 and after[0] != before[0]
    for node in (a, b):
        assert (
            node.request("GET", "/api/settings/secrets/smtp_password")[1]["value"] == "hunter2-smtp"
        )
    # plain settings: validated, shared by every node, audited
    status, body = a.request("PATCH", "/api/settings", {"offlineThresholdSeconds": 0.5})
    assert status == 400
    status, body = a.request(
        "PATCH", "/api/settings", {"managerAddress": "dsm.example.org", "managerPort": 443}
    )
    assert status == 200, body
    _, managers = b.request("GET", "/api/agents/managers")
    assert managers["mode"] == "loadBalancer"
    assert managers["heartbeat"] == {"address": "dsm.example.org", "port": 443}
    assert a.request("PATCH", "/api/settings", {"bogus": 1})[0] == 400


def test_clock_skew_raises_the_alert_without_false_takeover(dsm_cluster: Cluster) -> None:
    url = dsm_cluster.database_url
    prepare(url, threshold=4)
    a = dsm_cluster.start("a")
    skewed = dsm_cluster.start("skewed", DSM_CLOCK_OFFSET_SECONDS="3600")
    other_tz = dsm_cluster.start("tokyo", TZ="Asia/Tokyo")
    wait_until(lambda: len(a.request("GET", "/api/alerts")[1]["alerts"]) == 2, 30, "alerts")
    alerts = {x["node"]: x for x in a.request("GET", "/api/alerts")[1]["alerts"]}
    assert alerts["skewed"]["type"] == "Manager Time Out of Sync"
    assert "+3600" in alerts["skewed"]["message"]
    assert "time zone" in alerts["tokyo"]["message"]
    health = skewed.request("GET", "/healthz")[1]
    assert health["status"] == "degraded" and "Time Out of Sync" in health["degraded"][0]
    # liveness uses the database's clock: well past the threshold, nobody was declared offline
    time.sleep(6)
    assert set(statuses(a).values()) == {"Online"}
    for n in (a, skewed, other_tz):
        assert "declared" not in n.log_text()


def test_paused_old_node_learns_it_needs_an_upgrade(dsm_cluster: Cluster) -> None:
    """A node paused across an upgrade does not rejoin when it wakes: it needs the new version."""
    url = dsm_cluster.database_url
    prepare(url)
    a, b = dsm_cluster.start("a"), dsm_cluster.start("b")
    b.signal(signal.SIGSTOP)
    assert a.stop() == 0
    dsm_cluster.start("a", **V2)
    b.signal(signal.SIGCONT)
    wait_until(lambda: "Offline (Upgrade Required)" in b.log_text(), 30, "b notices", b.log_tail)
    assert query(url, "SELECT status FROM nodes WHERE name = 'b'") == [("upgrade_required",)]
    assert "rejoining" not in b.log_text()
    assert API_KEY  # the helper authenticates every call with it


def test_a_migrating_node_stays_healthy_but_not_ready(dsm_cluster: Cluster, tmp_path: Path) -> None:
    url = dsm_cluster.database_url
    prepare(url)
    latest = migrating.load_migrations()[-1].version
    (tmp_path / f"{latest + 1:04d}_slow.sql").write_text(
        "SELECT pg_sleep(4);\nCREATE TABLE slow_done (x int);\n"
    )
    node = dsm_cluster.start(
        "m", wait=False, DSM_SOFTWARE_VERSION="0.2.0", DSM_EXTRA_MIGRATIONS_DIR=str(tmp_path)
    )

    def answering() -> bool:
        try:
            return node.request("GET", "/healthz")[0] == 200
        except OSError:
            return False

    wait_until(answering, 30, "healthz answers")
    seen = []
    while node.request("GET", "/readyz")[0] != 200:
        status, body = node.request("GET", "/healthz")
        seen.append((status, body["phase"]))
        time.sleep(0.2)
    assert (200, "joining") in seen, seen  # probes see a healthy node during the migration
    assert all(status == 200 for status, _ in seen)
    assert query(url, "SELECT schema_version FROM dsm_schema") == [(latest + 1,)]
