"""The alert rules (monitoring/prometheus-rules.yaml): valid for promtool, unit-tested by promtool
for every alert firing and not firing, and each with a summary, a description and a runbook that
exists in docs/runbooks.md."""

from __future__ import annotations

import re
import subprocess
from typing import Any

import yaml

from tests.monitoring import tools

RUNBOOK_PREFIX = "https://github.com/dsm-dev/dsm/blob/main/docs/runbooks.md#"


def alerts() -> list[dict[str, Any]]:
    groups = yaml.safe_load(tools.RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def promtool(prometheus_tools: tools.Tools, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(prometheus_tools.promtool), *args],
        capture_output=True,
        text=True,
        cwd=tools.REPO,
        timeout=120,
    )


def test_the_rule_file_passes_promtool_check(prometheus_tools: tools.Tools) -> None:
    result = promtool(prometheus_tools, "check", "rules", "--lint=all", str(tools.RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in result.stdout


def test_the_promtool_unit_tests_pass(prometheus_tools: tools.Tools) -> None:
    result = promtool(prometheus_tools, "test", "rules", str(tools.RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_promtool_unit_tests_can_fail(prometheus_tools: tools.Tools, tmp_path: Any) -> None:
    """The same tests against rules with one threshold changed: promtool must report it."""
    broken = tmp_path / "prometheus-rules.yaml"
    text = tools.RULES.read_text()
    assert "for: 30m" in text
    broken.write_text(text.replace("for: 30m", "for: 20m"))
    tests_dir = tmp_path / "tests"
    tests_dir.mkdir()
    (tests_dir / "rules-test.yaml").write_text(tools.RULE_TESTS.read_text())
    result = promtool(prometheus_tools, "test", "rules", str(tests_dir / "rules-test.yaml"))
    assert result.returncode != 0
    assert "DsmNodeUpgradeRequired" in result.stdout + result.stderr


def test_every_alert_is_unit_tested_firing_and_not_firing() -> None:
    cases = [
        case
        for test in yaml.safe_load(tools.RULE_TESTS.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
    ]
    for rule in alerts():
        mine = [c for c in cases if c["alertname"] == rule["alert"]]
        assert any(c["exp_alerts"] for c in mine), f"{rule['alert']}: no firing case"
        assert any(not c["exp_alerts"] for c in mine), f"{rule['alert']}: no quiet case"


def runbook_anchors() -> set[str]:
    """GitHub's anchors of the runbook's headings (lowercase, spaces to dashes, no punctuation)."""
    anchors = set()
    for line in tools.RUNBOOKS.read_text().splitlines():
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
