"""A real Prometheus scrapes three real node processes over HTTPS (verifying their certificates
against the nodes' CA), then every PromQL expression of the Grafana dashboard and every alert
rule is evaluated against what it collected; and alerts fire when their condition is produced
for real: a node SIGKILLed (DsmNodeOffline), a job type that always fails (DsmJobsDeadLettered),
a node whose clock is two minutes off (DsmManagerTimeOutOfSync).

The rules are monitoring/prometheus-rules.yaml with every ``for`` shortened to 2 s (the
expressions are unchanged); the cluster heartbeats every second with a 10 s offline threshold.
"""

from __future__ import annotations

import json
import math
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support import pki, prometheus
from tests.support.nodes import NodeProcess, set_settings
from tests.support.prometheus import PrometheusServer
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

NODES = ("mgr-0", "mgr-1", "mgr-2")
SKEWED = "mgr-1"  # its clock runs 120 s ahead: Manager Time Out of Sync


def dashboard_targets() -> list[tuple[str, str]]:
    dash = json.loads(prometheus.DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in dash["panels"] for t in p["targets"]]


def short_rules(directory: Path) -> Path:
    text = re.sub(r"(?m)^(\s+for: ).*$", r"\g<1>2s", prometheus.RULES.read_text())
    assert text != prometheus.RULES.read_text()
    path = directory / "rules.yaml"
    path.write_text(text)
    return path


@pytest.fixture
def scraped_cluster(
    prometheus_tools: prometheus.Tools,
    database_url: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> Iterator[tuple[dict[str, NodeProcess], PrometheusServer]]:
    set_settings(database_url, heartbeat_interval_seconds=1, offline_threshold_seconds=10)
    pki_dir = tmp_path / "pki"
    pki_dir.mkdir()
    ca = pki.CertificateAuthority("dsm-test-node-ca")
    ca_file = pki_dir / "ca.crt"
    ca_file.write_bytes(ca.cert_pem)
    nodes: dict[str, NodeProcess] = {}
    server = PrometheusServer(prometheus_tools.prometheus, tmp_path / "prometheus")
    try:
        for name in NODES:  # one at a time, as the product requires
            node = NodeProcess(name, database_url, tmp_path / f"{name}.log")
            issued = ca.issue(name, dns=[name], ips=[node.address])
            cert, key = issued.write(pki_dir / f"{name}.crt", pki_dir / f"{name}.key")
            node.env_extra = {
                "DSM_TLS_CERT_FILE": str(cert),
                "DSM_TLS_KEY_FILE": str(key),
                "DSM_CLOCK_OFFSET_SECONDS": "120" if name == SKEWED else "0",
            }
            nodes[name] = node.start().wait_ready()
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(short_rules(tmp_path))],
            "scrape_configs": [
                {
                    "job_name": "dsm",
                    "scheme": "https",
                    # The nodes' CA, and each target's own IP in its certificate: verified.
                    "tls_config": {"ca_file": str(ca_file)},
                    "static_configs": [
                        # `pod`: the label a ServiceMonitor gives each target (the dashboard's node)
                        {"targets": [f"{n.address}:{n.port}"], "labels": {"pod": name}}
                        for name, n in nodes.items()
                    ],
                }
            ],
        }
        server.start(config)
        yield nodes, server
    finally:
        server.stop()
        for n in nodes.values():
            if n.child is not None:
                n.kill()
        rep = getattr(request.node, "rep_call", None)
        if rep is not None and rep.failed:
            print(f"=== prometheus ===\n{server.log_tail()}")
            for name, n in nodes.items():
                print(f"=== {name} ===\n{n.log_tail(60)}")


def pods(result: list[dict[str, Any]], label: str = "pod") -> set[str]:
    return {s["metric"].get(label, "") for s in result}


def has_data_for_every_node(server: PrometheusServer, expr: str) -> bool:
    # NaN is "no data" for this check (a quantile of a type with no job in the window)
    result = [s for s in server.query(expr) if not math.isnan(float(s["value"][1]))]
    if not result:
        return False
    if re.search(r"by \([^)]*\bpod\b", expr) or not re.search(r"\bby\b", expr):
        return pods(result) == set(NODES)
    if re.search(r"by \([^)]*\bnode\b", expr):
        return pods(result, "node") == set(NODES)
    return True


def test_dashboard_and_alerts_on_a_real_prometheus(
    scraped_cluster: tuple[dict[str, NodeProcess], PrometheusServer],
) -> None:
    nodes, server = scraped_cluster
    started = time.monotonic()
    wait_until(
        lambda: set(server.targets_up().values()) == {"up"} and len(server.targets_up()) == 3,
        60,
        "all three nodes scraped over verified HTTPS",
        lambda: json.dumps(server.api("/api/v1/targets")["activeTargets"], indent=1)[:3000],
    )

    # Jobs: plain ones spread over the nodes, a local one that runs on every node, and a type that
    # fails every attempt (dead-lettered after 3).
    status, body = nodes["mgr-0"].request(
        "POST",
        "/api/jobs",
        {"jobs": [{"type": "noop"}] * 300 + [{"type": "always_fails"}] * 2},
    )
    assert status == 201, body
    status, body = nodes["mgr-1"].request("POST", "/api/jobs", {"type": "clear_caches"})
    assert status == 201, body

    # Every dashboard panel shows data for the three nodes once they are scraped and ran jobs.
    targets = dashboard_targets()
    assert len(targets) >= 10
    for title, expr in targets:
        wait_until(
            lambda expr=expr: has_data_for_every_node(server, expr),  # type: ignore[misc]
            120,
            f"panel {title!r}: {expr} with data for {NODES}",
            lambda expr=expr: json.dumps(server.query(expr))[:2000],  # type: ignore[misc]
        )
    # ... and every node's own jobs show up (the local job ran on each), once scraped
    succeeded = 'sum by (pod) (increase(dsm_jobs_total{outcome="succeeded"}[1h])) > 0'
    wait_until(
        lambda: pods(server.query(succeeded)) == set(NODES),
        60,
        "succeeded jobs counted for every node",
        lambda: json.dumps(server.query(succeeded)),
    )

    # What the node exports, as scraped: process metrics of each node, no _created series.
    assert pods(server.query("process_resident_memory_bytes")) == set(NODES)
    assert server.query('count by (__name__) ({__name__=~".+_created"})') == []

    # Every alert expression evaluates against the real data; the rule engine loaded them all.
    rules = yaml.safe_load(prometheus.RULES.read_text())["groups"]
    alerts = {r["alert"]: r["expr"] for g in rules for r in g["rules"]}
    results = {name: server.query(expr) for name, expr in alerts.items()}
    wait_until(
        lambda: (
            len(server.rules()) == len(alerts) and all(r["health"] == "ok" for r in server.rules())
        ),
        30,
        "every rule loaded and evaluated without error",
        lambda: json.dumps(server.rules(), indent=1)[:3000],
    )
    for quiet in (
        "DsmNodeOffline",
        "DsmNodeUpgradeRequired",
        "DsmQueueDepthGrowing",
        "DsmOperatorRolloutStalled",  # no operator here: nothing to report
        "DsmOperatorNodeApiUnreachable",
    ):
        assert results[quiet] == [], (quiet, results[quiet])

    # Produced for real: the skewed clock and the dead letters.
    out_of_sync = wait_until(
        lambda: server.firing("DsmManagerTimeOutOfSync"), 120, "Manager Time Out of Sync fires"
    )
    assert [a["node"] for a in out_of_sync] == [SKEWED]
    dead = wait_until(lambda: server.firing("DsmJobsDeadLettered"), 120, "dead-lettered jobs alert")
    assert [a["type"] for a in dead] == ["always_fails"]

    # A node SIGKILLed: its peers declare it Offline after the threshold, the alert fires for it.
    nodes["mgr-2"].signal(signal.SIGKILL)
    offline = wait_until(
        lambda: server.firing("DsmNodeOffline"),
        120,
        "DsmNodeOffline for the killed node",
        lambda: json.dumps(server.query("dsm_node_status")),
    )
    assert [a["node"] for a in offline] == ["mgr-2"]
    statuses = server.query("max by (node, status) (dsm_node_status) == 1")
    assert {(s["metric"]["node"], s["metric"]["status"]) for s in statuses} == {
        ("mgr-0", "Online"),
        ("mgr-1", "Online"),
        ("mgr-2", "Offline"),
    }
    print(f"real-Prometheus test: {time.monotonic() - started:.1f} s after the nodes were up")
