"""The Grafana dashboard only uses series the node really exports, with the right suffix for each
metric's type, and the node's metrics follow the Prometheus naming conventions."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

import dsm_node.agents.channel  # noqa: F401  (registers the agent metrics, as the node does)
from dsm_node import metrics

DASHBOARD = Path(__file__).parents[2] / "monitoring" / "grafana-dashboard.json"
MONITORING_README = DASHBOARD.parent / "README.md"
COUNT_HISTOGRAMS = {"dsm_agent_batch_heartbeats"}  # a histogram of how many, not of how long
SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum"),
    "summary": ("_count", "_sum", ""),
    "info": ("_info",),
}


def series_names(registry: CollectorRegistry) -> set[str]:
    """Every series name a scrape of ``registry`` can contain, by each family's type (not every
    suffix for every family: ``dsm_queue_depth_total`` or ``dsm_jobs_bucket`` must not pass)."""
    names = set()
    for family in registry.collect():
        names |= {family.name + suffix for suffix in SUFFIXES[family.type]}
    return names


def dashboard_metrics() -> set[str]:
    dash = json.loads(DASHBOARD.read_text())
    return {
        m
        for panel in dash["panels"]
        for target in panel["targets"]
        for m in re.findall(r"\b(dsm_[a-z_]+)", target["expr"])
    }


def test_every_dashboard_metric_is_exported() -> None:
    used = dashboard_metrics()
    assert used, "the dashboard queries no dsm metric"
    missing = used - series_names(metrics.REGISTRY)
    assert not missing, f"dashboard uses series the node does not export: {sorted(missing)}"


@pytest.mark.parametrize(
    ("expr_metric", "declare"),
    [
        ("dsm_probe_total", lambda r: Gauge("dsm_probe", "a gauge", registry=r)),
        ("dsm_probe", lambda r: Counter("dsm_probe", "a counter", registry=r)),
        ("dsm_probe_bucket", lambda r: Gauge("dsm_probe", "a gauge", registry=r)),
        ("dsm_probe_seconds_total", lambda r: Histogram("dsm_probe_seconds", "h", registry=r)),
    ],
)
def test_a_wrong_suffix_for_the_metric_type_is_not_exported(expr_metric, declare) -> None:  # type: ignore[no-untyped-def]
    registry = CollectorRegistry()
    declare(registry)
    assert expr_metric not in series_names(registry)


def test_series_names_agree_with_a_real_scrape() -> None:
    registry = CollectorRegistry()
    Counter("dsm_c", "c", ["t"], registry=registry).labels("x").inc()
    Gauge("dsm_g_seconds", "g", registry=registry).set(1)
    Histogram("dsm_h_seconds", "h", registry=registry).observe(1)
    scraped = {
        line.split("{")[0].split(" ")[0]
        for line in generate_latest(registry).decode().splitlines()
        if line and not line.startswith("#")
    }
    assert scraped == series_names(registry)


def test_node_metrics_follow_the_conventions() -> None:
    scrape = generate_latest(metrics.REGISTRY).decode()
    families = {f.name: f for f in metrics.REGISTRY.collect()}
    dsm = {n: f for n, f in families.items() if n.startswith("dsm_")}
    assert "_created" not in scrape
    assert "process_resident_memory_bytes" in scrape and "process_open_fds" in scrape
    assert "python_gc_objects_collected_total" in scrape
    for name, family in dsm.items():
        if family.type == "histogram":
            assert name.endswith("_seconds") or name in COUNT_HISTOGRAMS, name
        if family.type == "gauge" and {"age", "skew", "threshold"} & set(name.split("_")):
            assert name.endswith("_seconds"), name
    assert {n for n, f in dsm.items() if f.type == "counter"} >= {"dsm_jobs", "dsm_takeovers"}
    assert 'dsm_agent_heartbeats_total{outcome="refused"} 0.0' in scrape  # at 0 from start


def test_every_node_metric_is_documented() -> None:
    documented = set(re.findall(r"`(dsm_[a-z_]+)", MONITORING_README.read_text()))
    exported = {
        f.name + ("_total" if f.type == "counter" else "")
        for f in metrics.REGISTRY.collect()
        if f.name.startswith("dsm_")
    }
    assert len(exported) > 15
    assert not exported - documented, "metrics missing from monitoring/README.md"


def test_panels_have_unique_ids_and_titles() -> None:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    assert len({p["title"] for p in panels}) == len(panels)
