"""The Grafana dashboard only uses metrics the node really exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

from dsm_node import metrics

DASHBOARD = Path(__file__).parents[2] / "monitoring" / "grafana-dashboard.json"


def exported_names() -> set[str]:
    names = set()
    for family in metrics.REGISTRY.collect():
        for sample in family.samples:
            names.add(sample.name)
        names.add(family.name)
        names |= {family.name + s for s in ("_total", "_bucket", "_count", "_sum")}
    return names


def test_every_dashboard_metric_is_exported() -> None:
    dash = json.loads(DASHBOARD.read_text())
    used = {
        m
        for panel in dash["panels"]
        for target in panel["targets"]
        for m in re.findall(r"\b(dsm_[a-z_]+)", target["expr"])
    }
    assert used, "the dashboard queries no dsm metric"
    missing = used - exported_names()
    assert not missing, f"dashboard uses metrics the node does not export: {sorted(missing)}"


def test_panels_have_unique_ids_and_titles() -> None:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    assert len({p["title"] for p in panels}) == len(panels)
