"""Where the monitoring tests find Prometheus, promtool and the Prometheus Operator's CRDs: built
by hack/prometheus/build.sh (``make prometheus``; ``make test`` runs it) into the cache, at the
versions pinned in hack/prometheus/versions.env. Without them the tests skip with one reason, or
fail when ``CI=true``."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VERSIONS = REPO / "hack" / "prometheus" / "versions.env"
RULES = REPO / "monitoring" / "prometheus-rules.yaml"
RULE_TESTS = REPO / "monitoring" / "tests" / "rules-test.yaml"
DASHBOARD = REPO / "monitoring" / "grafana-dashboard.json"
RUNBOOKS = REPO / "docs" / "runbooks.md"


def versions() -> dict[str, str]:
    out = {}
    for line in VERSIONS.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def cache_dir() -> Path:
    return Path(os.environ.get("DSM_CACHE_DIR") or Path.home() / ".cache" / "dsm")


@dataclass(frozen=True)
class Tools:
    prometheus: Path
    promtool: Path
    crds: Path

    @property
    def service_monitor_crd(self) -> Path:
        return self.crds / "monitoring.coreos.com_servicemonitors.yaml"

    @property
    def prometheus_rule_crd(self) -> Path:
        return self.crds / "monitoring.coreos.com_prometheusrules.yaml"


def locate() -> Tools:
    v = versions()
    prom = cache_dir() / "prometheus" / v["PROMETHEUS_MODULE_VERSION"]
    crds = cache_dir() / "prometheus-operator" / v["PROMETHEUS_OPERATOR_VERSION"] / "crds"
    return Tools(prom / "prometheus", prom / "promtool", crds)


def require() -> Tools:
    """The built tools, or skip (fail with CI=true) naming what is missing and how to build it."""
    t = locate()
    needed = (t.prometheus, t.promtool, t.service_monitor_crd, t.prometheus_rule_crd)
    missing = [p for p in needed if not p.exists()]
    if not missing:
        return t
    verdict = "FAILED (CI=true)" if os.environ.get("CI") == "true" else "SKIPPED"
    reason = (
        f"MONITORING TESTS {verdict}: missing {', '.join(str(p) for p in missing)};"
        " build them with `make prometheus` (hack/prometheus/build.sh, needs Go >= 1.26)"
    )
    if os.environ.get("CI") == "true":
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)
