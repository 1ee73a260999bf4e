"""The CRD file itself: structural sanity, descriptions everywhere, chart copy, model defaults."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from dsm_operator.reconcile import names, planning, statuses
from dsm_operator.reconcile.specs import ManagerSpec

ROOT = Path(__file__).resolve().parents[2]
CRD_PATH = ROOT / "crds" / "deepsecuritymanagers.yaml"
CHART_CRD_PATH = ROOT / "helm" / "dsm-operator" / "crds" / "deepsecuritymanagers.yaml"


@pytest.fixture(scope="module")
def crd() -> dict[str, Any]:
    return dict(yaml.safe_load(CRD_PATH.read_text()))


@pytest.fixture(scope="module")
def schema(crd: dict[str, Any]) -> dict[str, Any]:
    return dict(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"])


def _walk(node: dict[str, Any], path: str) -> list[tuple[str, dict[str, Any]]]:
    found = [(path, node)]
    for key, child in (node.get("properties") or {}).items():
        found += _walk(child, f"{path}.{key}")
    if isinstance(node.get("items"), dict):
        found += _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        found += _walk(node["additionalProperties"], f"{path}{{}}")
    return found


def _at(schema: dict[str, Any], dotted: str) -> dict[str, Any]:
    node = schema
    for part in dotted.strip(".").split("."):
        node = node["properties"][part]
    return node


def test_identity(crd: dict[str, Any]) -> None:
    assert crd["metadata"]["name"] == f"{names.PLURAL}.{names.GROUP}"
    assert crd["spec"]["group"] == names.GROUP
    assert crd["spec"]["names"]["kind"] == names.KIND
    assert crd["spec"]["names"]["shortNames"] == ["dsm"]
    assert [v["name"] for v in crd["spec"]["versions"]] == [names.VERSION]


def test_every_field_has_a_description(schema: dict[str, Any]) -> None:
    missing = [
        path
        for path, node in _walk(schema, "")
        if path not in ("", ".metadata") and not path.endswith("{}") and not node.get("description")
    ]
    assert missing == []


def test_every_object_is_structural(schema: dict[str, Any]) -> None:
    for path, node in _walk(schema, ""):
        if path == ".metadata":
            continue
        assert "type" in node or node.get("x-kubernetes-int-or-string"), path
        if node.get("type") == "object":
            assert (
                "properties" in node
                or "additionalProperties" in node
                or node.get("x-kubernetes-preserve-unknown-fields")
            ), path


def test_scale_subresource_paths_exist(crd: dict[str, Any], schema: dict[str, Any]) -> None:
    sub = crd["spec"]["versions"][0]["subresources"]
    assert sub["status"] == {}
    scale = sub["scale"]
    for key in ("specReplicasPath", "statusReplicasPath", "labelSelectorPath"):
        _at(schema, scale[key])
    assert scale["specReplicasPath"] == ".spec.nodes"


def test_printer_columns(crd: dict[str, Any]) -> None:
    columns = {c["name"]: c for c in crd["spec"]["versions"][0]["additionalPrinterColumns"]}
    assert {"Ready", "Desired", "Version", "Status", "Age"} <= set(columns)
    assert columns["Status"]["jsonPath"] == '.status.conditions[?(@.type=="Ready")].status'


def test_cel_rules_have_messages(schema: dict[str, Any]) -> None:
    rules = [
        (path, rule)
        for path, node in _walk(schema, "")
        for rule in node.get("x-kubernetes-validations") or ()
    ]
    assert len(rules) >= 5
    for path, rule in rules:
        assert rule.get("message"), path


def test_conditions_are_a_map_list(schema: dict[str, Any]) -> None:
    conds = _at(schema, "status.conditions")
    assert conds["x-kubernetes-list-type"] == "map"
    assert conds["x-kubernetes-list-map-keys"] == ["type"]


@pytest.mark.parametrize(
    ("crd_path", "attribute"),
    [
        ("spec.nodes", "nodes"),
        ("spec.timeZone", "time_zone"),
        ("spec.offlineThresholdSeconds", "offline_threshold_seconds"),
        ("spec.nodeReadyTimeoutSeconds", "node_ready_timeout_seconds"),
        ("spec.paused", "paused"),
        ("spec.agentConnection", "agent_connection"),
        ("spec.imagePullPolicy", "image_pull_policy"),
        ("spec.loadBalancer.enabled", "load_balancer.enabled"),
        ("spec.loadBalancer.port", "load_balancer.port"),
        ("spec.loadBalancer.serviceType", "load_balancer.service_type"),
        ("spec.loadBalancer.externalTrafficPolicy", "load_balancer.external_traffic_policy"),
        ("spec.podDisruptionBudget.enabled", "pod_disruption_budget.enabled"),
        ("spec.podDisruptionBudget.maxUnavailable", "pod_disruption_budget.max_unavailable"),
        ("spec.monitoring.serviceMonitor", "monitoring.service_monitor"),
        ("spec.monitoring.interval", "monitoring.interval"),
        ("spec.database.secretRef.key", "database.secret_ref.key"),
        ("spec.masterKey.localSecretRef.key", "master_key.local_secret_ref.key"),
    ],
)
def test_model_defaults_equal_crd_defaults(
    schema: dict[str, Any], crd_path: str, attribute: str
) -> None:
    spec = ManagerSpec.parse(
        {
            "version": "1.0.0",
            "database": {"secretRef": {"name": "db"}},
            "masterKey": {"localSecretRef": {"name": "mk"}},
        }
    )
    value: Any = spec
    for part in attribute.split("."):
        value = getattr(value, part)
    assert _at(schema, crd_path)["default"] == value


def test_status_written_by_the_operator_is_declared(schema: dict[str, Any]) -> None:
    """The API server silently prunes undeclared status fields: every key we write must exist."""
    now = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    spec = ManagerSpec.parse(
        {
            "version": "2.0.0",
            "database": {"secretRef": {"name": "db"}},
            "masterKey": {"localSecretRef": {"name": "mk"}},
            "nodes": 2,
        }
    )
    pods = [
        planning.PodState("m-0", 0, "new", True, created_at=now, version="2.0.0"),
        planning.PodState("m-1", 1, "old", False, created_at=now, version="1.0.0"),
    ]
    world = planning.World(
        desired=2,
        paused=False,
        ready_timeout=datetime.timedelta(minutes=5),
        now=now,
        statefulset=planning.SetState(2, "new"),
        pods=pods,
        node_statuses={"m-0": "Online", "m-1": "Offline (Upgrade Required)"},
    )
    plan = planning.plan(world, "m")
    obs = statuses.Observation(
        cr_name="m",
        generation=3,
        spec=spec,
        world=world,
        plan=plan,
        reports=[statuses.NodeReport("m-0", "Online", "2.0.0", "10.0.0.1")],
        replaced_pod="m-1",
        decommissioned=["m-7"],
        load_balancer_address="lb.example",
        node_api_error="boom",
    )
    status = statuses.build(obs, {"currentVersion": "1.0.0"})
    status_schema = _at(schema, "status")

    def check(value: Any, node: dict[str, Any], path: str) -> None:
        if isinstance(value, dict):
            for key, child in value.items():
                assert key in node.get("properties", {}), f"{path}.{key} is not in the CRD"
                check(child, node["properties"][key], f"{path}.{key}")
        elif isinstance(value, list):
            for item in value:
                check(item, node["items"], f"{path}[]")

    check(status, status_schema, "status")
    assert status["rollout"]["lastReplacedPod"] == "m-1"


def test_chart_crds_equal_the_source_of_truth() -> None:
    assert CHART_CRD_PATH.read_bytes() == CRD_PATH.read_bytes(), (
        "helm/dsm-operator/crds/ must be a byte-equal copy of crds/: "
        "cp crds/deepsecuritymanagers.yaml helm/dsm-operator/crds/"
    )
    chart_crds = sorted(p.name for p in CHART_CRD_PATH.parent.iterdir())
    assert chart_crds == sorted(p.name for p in CRD_PATH.parent.iterdir())
