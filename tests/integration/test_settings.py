"""Cluster settings a real node accepts and refuses: bounds, rules between settings, changes that
race each other, and stored values that break the rules (they must not break the cluster)."""

from __future__ import annotations

import threading
import time
from typing import Any

import psycopg
import pytest

from tests.support.nodes import Cluster, NodeProcess, query, set_settings
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

AGENT_KEYS = (
    "managerAddress",
    "managerPort",
    "heartbeatAddress",
    "heartbeatPort",
    "relayAddress",
    "relayPort",
)


def patch(node: NodeProcess, values: dict[str, Any]) -> tuple[int, Any]:
    return node.request("PATCH", "/api/settings", values)


def stored(url: str) -> dict[str, Any]:
    return dict(query(url, "SELECT key, value FROM settings"))


def test_bounds_and_rules(dsm_cluster: Cluster) -> None:
    node = dsm_cluster.start("a")
    refused = [
        ({"heartbeatIntervalSeconds": 0.4}, "heartbeatIntervalSeconds"),
        ({"heartbeatIntervalSeconds": 601}, "heartbeatIntervalSeconds"),
        ({"heartbeatIntervalSeconds": 61}, "at least 3 times"),  # 180 < 3 x 61
        ({"offlineThresholdSeconds": 29}, "at least 3 times"),  # 29 < 3 x 10
        ({"offlineThresholdSeconds": 86401}, "offlineThresholdSeconds"),
        ({"jobHistoryRetentionSeconds": 59}, "jobHistoryRetentionSeconds"),
        ({"jobCountsRetentionSeconds": 3599}, "jobCountsRetentionSeconds"),
        ({"managerPort": 443}, "need managerAddress"),
        ({"heartbeatAddress": "hb.example.com"}, "need managerAddress"),
        ({"managerAddress": "bad host.example.com"}, "managerAddress"),
        ({"managerAddress": "-lead.example.com"}, "managerAddress"),
        ({"managerAddress": "999.1.1.1"}, "managerAddress"),
        ({"managerAddress": "lb.example.com", "managerPort": 0}, "managerPort"),
        ({"managerAddress": "lb.example.com", "managerPort": 65536}, "managerPort"),
        ({"managerAddress": "lb.example.com", "relayPort": 8443.0}, "relayPort"),
    ]
    before = stored(node.database_url)
    for values, words in refused:
        status, body = patch(node, values)
        assert status == 400 and words in body["error"], (values, body)
    assert stored(node.database_url) == before
    # accepted: both sides of a rule moved together, and what the operator sends
    status, body = patch(node, {"heartbeatIntervalSeconds": 60, "offlineThresholdSeconds": 180})
    assert status == 200, body
    lb = {
        "managerAddress": "lb.example.com",
        "managerPort": 443,
        "heartbeatAddress": "2001:db8::1",
        "heartbeatPort": 4120,
        "relayAddress": "10.0.0.7",
        "relayPort": 4122,
    }
    status, body = patch(node, lb)
    assert status == 200 and body["settings"]["heartbeatAddress"] == "2001:db8::1", body
    # clearing the manager address alone would orphan the others; clearing all is fine
    status, body = patch(node, {"managerAddress": None})
    assert status == 400 and "need managerAddress" in body["error"]
    status, body = patch(node, dict.fromkeys(AGENT_KEYS))
    assert status == 200, body
    assert all(body["settings"][k] is None for k in AGENT_KEYS)


def waiting_on_locks(url: str) -> int:
    return int(
        query(
            url,
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
            "AND application_name LIKE 'dsm-node:%' AND datname = current_database()",
        )[0][0]
    )


def test_two_changes_cannot_together_break_the_rule(dsm_cluster: Cluster) -> None:
    """Interval 60 (with threshold 180) and threshold 100 (with interval 10) are each valid;
    together they break "threshold >= 3 x interval". Both requests are held at the worst moment
    (each has read the settings, neither has written) by a transaction of the test holding the
    settings rows; when it lets go, exactly one of them may win."""
    url = dsm_cluster.database_url
    set_settings(url, heartbeat_interval_seconds=10, offline_threshold_seconds=180)
    node = dsm_cluster.start("a")
    results: dict[str, int] = {}
    with psycopg.connect(url) as blocker:
        blocker.execute("SELECT * FROM settings FOR UPDATE")

        def change(name: str, values: dict[str, Any]) -> None:
            results[name] = patch(node, values)[0]

        threads = [
            threading.Thread(target=change, args=("interval", {"heartbeatIntervalSeconds": 60})),
            threading.Thread(target=change, args=("threshold", {"offlineThresholdSeconds": 100})),
        ]
        for t in threads:
            t.start()
        wait_until(lambda: waiting_on_locks(url) == 2, 30, "both changes waiting")
        blocker.rollback()
    for t in threads:
        t.join()
    assert sorted(results.values()) == [200, 400], results
    s = stored(url)
    assert s["offline_threshold_seconds"] >= 3 * s["heartbeat_interval_seconds"], s


def test_a_stored_value_that_breaks_the_rules_does_not_break_the_cluster(
    dsm_cluster: Cluster,
) -> None:
    """Issue 9: offlineThresholdSeconds 1e308 made every heartbeat fail ("timestamp out of
    range"). A value written around the API (by hand, or by an older version) is ignored with one
    warning; the default applies, and the node keeps its heartbeat."""
    url = dsm_cluster.database_url
    set_settings(url, heartbeat_interval_seconds=0.5, offline_threshold_seconds=5)
    node = dsm_cluster.start("a")
    set_settings(url, offline_threshold_seconds=1e308)

    def last_beat() -> Any:
        return query(url, "SELECT last_heartbeat FROM nodes WHERE name = 'a'")[0][0]

    first = last_beat()
    time.sleep(3)  # several heartbeats at 0.5 s
    wait_until(lambda: last_beat() > first, 30, "a heartbeat after the bad value")
    status, body = node.request("GET", "/api/settings")
    assert status == 200 and body["settings"]["offlineThresholdSeconds"] == 180, body
    log = node.log_text()
    assert "heartbeat failed" not in log and "out of range" not in log, node.log_tail()
    warnings = [line for line in log.splitlines() if "stored setting ignored" in line]
    assert len(warnings) == 1 and "offlineThresholdSeconds" in warnings[0], warnings
    assert query(url, "SELECT status FROM nodes WHERE name = 'a'")[0][0] == "online"
