"""The alert rules (monitoring/prometheus-rules.yaml): valid for promtool, unit-tested by promtool
for every alert firing and not firing, and each with a summary, a description and a runbook that
exists in docs/runbooks.md. The operator ships the same file and narrows every selector to one
DeepSecurityManager: the narrowed rules pass promtool too and alert on their own cluster only.

No marker: promtool is a program ``make test`` builds (hack/prometheus/build.sh); without it these
tests skip with one reason (fail with ``CI=true``)."""

from __future__ import annotations

import re
import subprocess
from typing import Any

import yaml

from tests.support import prometheus

RUNBOOK_PREFIX = "https://github.com/dsm-dev/dsm/blob/main/docs/runbooks.md#"


def alerts() -> list[dict[str, Any]]:
    groups = yaml.safe_load(prometheus.RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def promtool(prometheus_tools: prometheus.Tools, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(prometheus_tools.promtool), *args],
        capture_output=True,
        text=True,
        cwd=prometheus.REPO,
        timeout=120,
    )


def test_the_rule_file_passes_promtool_check(prometheus_tools: prometheus.Tools) -> None:
    result = promtool(prometheus_tools, "check", "rules", "--lint=all", str(prometheus.RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in result.stdout


def test_the_promtool_unit_tests_pass(prometheus_tools: prometheus.Tools) -> None:
    result = promtool(prometheus_tools, "test", "rules", str(prometheus.RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_promtool_unit_tests_can_fail(
    prometheus_tools: prometheus.Tools, tmp_path: Any
) -> None:
    """The same tests against rules with one threshold changed: promtool must report it."""
    broken = tmp_path / "prometheus-rules.yaml"
    text = prometheus.RULES.read_text()
    assert "for: 30m" in text
    broken.write_text(text.replace("for: 30m", "for: 20m"))
    tests_dir = tmp_path / "tests"
    tests_dir.mkdir()
    (tests_dir / "rules-test.yaml").write_text(prometheus.RULE_TESTS.read_text())
    result = promtool(prometheus_tools, "test", "rules", str(tests_dir / "rules-test.yaml"))
    assert result.returncode != 0
    assert "DsmNodeUpgradeRequired" in result.stdout + result.stderr


def test_every_alert_is_unit_tested_firing_and_not_firing() -> None:
    cases = [
        case
        for test in yaml.safe_load(prometheus.RULE_TESTS.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
    ]
    for rule in alerts():
        mine = [c for c in cases if c["alertname"] == rule["alert"]]
        assert any(c["exp_alerts"] for c in mine), f"{rule['alert']}: no firing case"
        assert any(not c["exp_alerts"] for c in mine), f"{rule['alert']}: no quiet case"


def runbook_anchors() -> set[str]:
    """GitHub's anchors of the runbook's headings (lowercase, spaces to dashes, no punctuation)."""
    anchors = set()
    for line in prometheus.RUNBOOKS.read_text().splitlines():
        if m := re.match(r"^#{2,3} (.+)$", line):
            anchors.add(re.sub(r"[^a-z0-9 -]", "", m.group(1).lower()).replace(" ", "-"))
    return anchors


def test_every_alert_says_what_and_links_a_runbook_that_exists() -> None:
    anchors = runbook_anchors()
    names = [rule["alert"] for rule in alerts()]
    assert len(names) == len(set(names)) == 8
    for rule in alerts():
        notes = rule["annotations"]
        assert notes.get("summary") and notes.get("description"), rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        url = notes["runbook_url"]
        assert url == RUNBOOK_PREFIX + rule["alert"].lower(), url
        assert rule["alert"].lower() in anchors, f"docs/runbooks.md has no section {rule['alert']}"


def test_every_selector_is_written_with_braces() -> None:
    """The operator narrows each rule to one resource by adding matchers inside the braces of
    every dsm selector; a bare ``dsm_x`` would escape that."""
    for rule in alerts():
        for m in re.finditer(r"\b(dsm_[a-z_]+)\b(.)", rule["expr"]):
            assert m.group(2) == "{", f"{rule['alert']}: {m.group(1)} without braces"


# --- the operator's PrometheusRule: the same rules, narrowed to one resource -----------------

OPERATOR_COPY = (
    prometheus.REPO / "operator" / "dsm_operator" / "reconcile" / "prometheus-rules.yaml"
)


def test_the_operator_ships_the_same_rules() -> None:
    assert OPERATOR_COPY.read_text() == prometheus.RULES.read_text(), (
        "copy monitoring/prometheus-rules.yaml to operator/dsm_operator/reconcile/"
    )


def narrowed_rule_file(path: Any, namespace: str = "prod", name: str = "mgr") -> Any:
    from dsm_operator.reconcile import alerting

    groups = alerting.rule_groups(namespace, f"{name}-nodes", name)
    path.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    return path


def test_narrowing_puts_the_resource_in_every_selector() -> None:
    from dsm_operator.reconcile import alerting

    assert alerting.narrow(
        'max(dsm_node_status{status="Offline"}) + rate(dsm_operator_stalled{}[5m])',
        {"namespace": "prod", "service": "mgr-nodes"},
        {"namespace": "prod", "name": "mgr"},
    ) == (
        'max(dsm_node_status{namespace="prod",service="mgr-nodes",status="Offline"})'
        ' + rate(dsm_operator_stalled{name="mgr",namespace="prod"}[5m])'
    )
    for group in alerting.rule_groups("prod", "mgr-nodes", "mgr"):
        for rule in group["rules"]:
            for m in re.finditer(r"\b(dsm_[a-z_]+)\{([^}]*)\}", rule["expr"]):
                assert 'namespace="prod"' in m.group(2), (rule["alert"], m.group(0))


def test_the_narrowed_rules_pass_promtool_check(
    prometheus_tools: prometheus.Tools, tmp_path: Any
) -> None:
    rules = narrowed_rule_file(tmp_path / "narrowed.yaml")
    result = promtool(prometheus_tools, "check", "rules", "--lint=all", str(rules))
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_narrowed_rule_alerts_on_its_own_cluster_only(
    prometheus_tools: prometheus.Tools, tmp_path: Any
) -> None:
    """Two clusters (prod/mgr and test/mgr) each with a node offline; the rules of prod/mgr fire
    for prod's node only, and prod's rollout stall only."""
    narrowed_rule_file(tmp_path / "narrowed.yaml")
    test_file = tmp_path / "narrowed-test.yaml"
    node = (
        'dsm_node_status{{namespace="{ns}", service="mgr-nodes", job="mgr-nodes", node="{n}",'
        ' status="Offline"}}'
    )
    stalled = 'dsm_operator_stalled{{namespace="{ns}", name="mgr", job="dsm-operator"}}'
    test_file.write_text(
        yaml.safe_dump(
            {
                "rule_files": ["narrowed.yaml"],
                "evaluation_interval": "1m",
                "tests": [
                    {
                        "interval": "1m",
                        "input_series": [
                            {"series": node.format(ns="prod", n="mgr-2"), "values": "1x10"},
                            {"series": node.format(ns="test", n="mgr-1"), "values": "1x10"},
                            {"series": stalled.format(ns="prod"), "values": "1x10"},
                            {"series": stalled.format(ns="test"), "values": "1x10"},
                        ],
                        "alert_rule_test": [
                            {
                                "eval_time": "6m",
                                "alertname": "DsmNodeOffline",
                                "exp_alerts": [
                                    {
                                        "exp_labels": {
                                            "severity": "warning",
                                            "namespace": "prod",
                                            "job": "mgr-nodes",
                                            "node": "mgr-2",
                                        },
                                        "exp_annotations": _annotations(
                                            "DsmNodeOffline",
                                            {
                                                "namespace": "prod",
                                                "job": "mgr-nodes",
                                                "node": "mgr-2",
                                            },
                                        ),
                                    }
                                ],
                            },
                            {
                                "eval_time": "6m",
                                "alertname": "DsmOperatorRolloutStalled",
                                "exp_alerts": [
                                    {
                                        "exp_labels": {
                                            "severity": "critical",
                                            "namespace": "prod",
                                            "name": "mgr",
                                        },
                                        "exp_annotations": _annotations(
                                            "DsmOperatorRolloutStalled",
                                            {"namespace": "prod", "name": "mgr"},
                                        ),
                                    }
                                ],
                            },
                        ],
                    }
                ],
            },
            sort_keys=False,
        )
    )
    result = promtool(prometheus_tools, "test", "rules", str(test_file))
    assert result.returncode == 0, result.stdout + result.stderr


def _annotations(alert: str, labels: dict[str, str]) -> dict[str, str]:
    """The rule's annotations with ``{{ $labels.x }}`` filled in (the templates used here)."""
    rule = next(r for r in alerts() if r["alert"] == alert)
    out = {}
    for key, template in rule["annotations"].items():
        text = re.sub(
            r"\{\{\s*\$labels\.(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), template
        )
        out[key] = text
    return out
