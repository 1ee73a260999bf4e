"""Prometheus in tests: the files the monitoring tests check, the tools ``make prometheus``
built, and a real Prometheus server.

Offers the paths :data:`RULES`, :data:`RULE_TESTS`, :data:`DASHBOARD`, :data:`RUNBOOKS`;
:func:`require_tools` (Prometheus, promtool and the Prometheus Operator's CRDs, built by
hack/prometheus/build.sh at the versions pinned in hack/prometheus/versions.env -- or a skip
naming what is missing, a failure when ``CI=true``); and :class:`PrometheusServer` (its own
process, config and storage in a directory, listening on 127.0.0.1, queried through its HTTP
API). Certificates for scraped nodes come from tests/support/pki.py.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support import buildcache
from tests.support.loopback import free_port
from tests.support.processes import ChildProcess
from tests.support.waiting import wait_until

REPO = Path(__file__).resolve().parents[2]
VERSIONS = REPO / "hack" / "prometheus" / "versions.env"
RULES = REPO / "monitoring" / "prometheus-rules.yaml"
RULE_TESTS = REPO / "monitoring" / "tests" / "rules-test.yaml"
DASHBOARD = REPO / "monitoring" / "grafana-dashboard.json"
RUNBOOKS = REPO / "docs" / "runbooks.md"


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


def locate_tools() -> Tools:
    """Where hack/prometheus/build.sh puts the pinned versions (present or not)."""
    v = buildcache.read_versions(VERSIONS)
    cache = buildcache.cache_dir()
    prom = cache / "prometheus" / v["PROMETHEUS_MODULE_VERSION"]
    crds = cache / "prometheus-operator" / v["PROMETHEUS_OPERATOR_VERSION"] / "crds"
    return Tools(prom / "prometheus", prom / "promtool", crds)


def require_tools() -> Tools:
    """The built tools, or skip (fail with CI=true) naming what is missing and how to build it."""
    t = locate_tools()
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


class QueryError(Exception):
    """Prometheus refused or failed a query."""


class PrometheusServer:
    def __init__(self, binary: Path, workdir: Path) -> None:
        self.binary = binary
        self.workdir = workdir
        self.port = free_port("127.0.0.1")
        self.log_path = workdir / "prometheus.log"
        self.child: ChildProcess | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, config: dict[str, Any], timeout: float = 60) -> PrometheusServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config_file = self.workdir / "prometheus.yml"
        config_file.write_text(yaml.safe_dump(config, sort_keys=False))
        argv = [
            str(self.binary),
            f"--config.file={config_file}",
            f"--storage.tsdb.path={self.workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--log.level=warn",
        ]
        self.child = ChildProcess(argv, self.log_path, new_session=True).start()
        wait_until(self._ready, timeout, "Prometheus ready", self.log_tail)
        return self

    def _ready(self) -> bool:
        assert self.child is not None
        if not self.child.running:
            raise AssertionError(f"Prometheus exited {self.child.returncode}:\n{self.log_tail()}")
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
                return bool(r.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    def stop(self) -> None:
        if self.child is not None:
            self.child.stop(grace=30)

    def log_tail(self, n: int = 40) -> str:
        return self.child.log_tail(n) if self.child is not None else ""

    def api(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=30) as r:
                body = json.loads(r.read())
        except urllib.error.HTTPError as e:
            body = json.loads(e.read() or b"{}")
        if body.get("status") != "success":
            raise QueryError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query: the result's samples (``metric`` labels and ``value``)."""
        data = self.api("/api/v1/query", query=expr)
        assert data["resultType"] == "vector", data
        result: list[dict[str, Any]] = data["result"]
        return result

    def targets_up(self) -> dict[str, str]:
        """scrape URL -> health of every active target."""
        data = self.api("/api/v1/targets")
        return {t["scrapeUrl"]: t["health"] for t in data["activeTargets"]}

    def rules(self) -> list[dict[str, Any]]:
        return [r for g in self.api("/api/v1/rules")["groups"] for r in g["rules"]]

    def firing(self, alertname: str) -> list[dict[str, str]]:
        """Labels of every firing alert with that name."""
        return [
            a["labels"]
            for a in self.api("/api/v1/alerts")["alerts"]
            if a["labels"]["alertname"] == alertname and a["state"] == "firing"
        ]
