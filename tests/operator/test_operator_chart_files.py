"""The Helm chart's static files (rendering is tested in test_cluster_operator_chart.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

CHART = Path(__file__).resolve().parents[2] / "helm" / "dsm-operator"


def _keys(node: Any, prefix: str = "") -> list[str]:
    if not isinstance(node, dict):
        return []
    result = []
    for key, value in node.items():
        path = f"{prefix}{key}"
        result.append(path)
        result += _keys(value, f"{path}.")
    return result


def test_every_values_key_has_a_comment_naming_it() -> None:
    lines = (CHART / "values.yaml").read_text().splitlines()
    values = yaml.safe_load("\n".join(lines))
    commented = set()
    for i, line in enumerate(lines):
        match = re.match(r"^(\s*)([A-Za-z][A-Za-z0-9]*):", line)
        if not match or i == 0:
            continue
        j = i - 1
        while j > 0 and lines[j - 1].strip().startswith("#") and lines[j].strip().startswith("#"):
            j -= 1  # to the first line of the comment block above the key
        first = lines[j].strip()
        if first.startswith("#"):
            commented.add(first.lstrip("# ").split(" ", 1)[0])
    missing = [k for k in _keys(values) if k not in commented]
    assert missing == []


def test_values_keys_are_camel_case() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for key in _keys(values):
        assert re.fullmatch(r"[a-z][A-Za-z0-9]*", key.rsplit(".", 1)[-1]), key


def test_values_schema_covers_every_top_level_key() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert schema["additionalProperties"] is False
    assert set(values) <= set(schema["properties"])


def test_chart_has_the_helper_names() -> None:
    helpers = (CHART / "templates" / "_helpers.tpl").read_text()
    for name in ("name", "fullname", "labels", "selectorLabels", "serviceAccountName"):
        assert f'define "dsm-operator.{name}"' in helpers


def test_operator_deployment_is_single_and_recreated() -> None:
    text = (CHART / "templates" / "deployment.yaml").read_text()
    assert "replicas: 1" in text
    assert "type: Recreate" in text


def test_helm_test_hook_exists() -> None:
    tests = list((CHART / "templates" / "tests").glob("*.yaml"))
    assert tests
    assert all("helm.sh/hook: test" in t.read_text() for t in tests)


def test_notes_name_no_stale_version_and_no_placeholder_url() -> None:
    notes = (CHART / "templates" / "NOTES.txt").read_text()
    assert "20.0.1" not in notes
    assert "{{ .Chart.AppVersion }}" in notes
    assert "https://" not in notes and "<this chart>" not in notes
