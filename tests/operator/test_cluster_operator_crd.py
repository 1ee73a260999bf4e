"""The DeepSecurityManager CRD on the real API server: it installs, defaults, validates (naming the
field at fault), serves the scale subresource and reads well in ``kubectl explain``."""

from __future__ import annotations

import copy
import subprocess
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client import ApiException
from tests.support.operator import manager_body

pytestmark = pytest.mark.cluster

GROUP, VERSION, PLURAL = "security.dsm.dev", "v1alpha1", "deepsecuritymanagers"


def _create(api_client: Any, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
    api = client.CustomObjectsApi(api_client)
    return dict(api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body))


def _refusal(api_client: Any, namespace: str, body: dict[str, Any]) -> str:
    with pytest.raises(ApiException) as caught:
        _create(api_client, namespace, body)
    assert caught.value.status == 422, caught.value.body
    return str(caught.value.body)


def test_minimal_resource_is_accepted_and_defaulted(
    dsm_crd: str, k8s_control_plane: Any, k8s_namespace: str
) -> None:
    created = _create(k8s_control_plane.api_client, k8s_namespace, manager_body())
    spec = created["spec"]
    assert spec["loadBalancer"] == {
        "enabled": True,
        "port": 443,
        "serviceType": "LoadBalancer",
        "externalTrafficPolicy": "Cluster",
    }
    assert spec["agentConnection"] == "nodeList"
    assert spec["timeZone"] == "UTC"
    assert spec["offlineThresholdSeconds"] == 180
    assert spec["paused"] is False
    assert spec["database"]["secretRef"]["key"] == "url"
    assert spec["masterKey"]["localSecretRef"]["key"] == "localSecret"
    assert spec["podDisruptionBudget"] == {"enabled": True, "maxUnavailable": 1}
    assert spec["monitoring"]["serviceMonitor"] is True


def _set(body: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    body = copy.deepcopy(body)
    node = body
    parts = path.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    if value is _DELETE:
        node.pop(parts[-1], None)
    else:
        node[parts[-1]] = value
    return body


_DELETE = object()

# (what is wrong, changes as (dotted path, value), the field the refusal must name)
INVALID: list[tuple[str, list[tuple[str, Any]], str]] = [
    ("version not semver", [("spec.version", "latest")], "spec.version"),
    ("version with a v", [("spec.version", "v20.0.1")], "spec.version"),
    ("zero nodes", [("spec.nodes", 0)], "spec.nodes"),
    ("too many nodes", [("spec.nodes", 33)], "spec.nodes"),
    ("nodes as text", [("spec.nodes", "three")], "spec.nodes"),
    ("port zero", [("spec.loadBalancer.port", 0)], "spec.loadBalancer.port"),
    ("port too high", [("spec.loadBalancer.port", 70000)], "spec.loadBalancer.port"),
    (
        "agents via a disabled load balancer",
        [("spec.agentConnection", "loadBalancer"), ("spec.loadBalancer.enabled", False)],
        "spec.agentConnection",
    ),
    ("unknown agent connection", [("spec.agentConnection", "dns")], "spec.agentConnection"),
    ("unknown service type", [("spec.loadBalancer.serviceType", "Ingress")], "serviceType"),
    (
        "source ranges on a ClusterIP service",
        [
            ("spec.loadBalancer.serviceType", "ClusterIP"),
            ("spec.loadBalancer.sourceRanges", ["10.0.0.0/8"]),
        ],
        "spec.loadBalancer.sourceRanges",
    ),
    (
        "source range not a CIDR",
        [("spec.loadBalancer.sourceRanges", ["10.0.0.300/8"])],
        "spec.loadBalancer.sourceRanges[0]",
    ),
    (
        "Local traffic policy on ClusterIP",
        [
            ("spec.loadBalancer.serviceType", "ClusterIP"),
            ("spec.loadBalancer.externalTrafficPolicy", "Local"),
        ],
        "spec.loadBalancer.externalTrafficPolicy",
    ),
    ("no database", [("spec.database", _DELETE)], "spec.database"),
    ("no master key", [("spec.masterKey", _DELETE)], "spec.masterKey"),
    ("no version", [("spec.version", _DELETE)], "spec.version"),
    (
        "database secret name",
        [("spec.database.secretRef.name", "Bad_Name")],
        "spec.database.secretRef.name",
    ),
    ("time zone", [("spec.timeZone", "Mars Standard Time")], "spec.timeZone"),
    (
        "offline threshold too low",
        [("spec.offlineThresholdSeconds", 5)],
        "spec.offlineThresholdSeconds",
    ),
    (
        "ready timeout too low",
        [("spec.nodeReadyTimeoutSeconds", 10)],
        "spec.nodeReadyTimeoutSeconds",
    ),
    (
        "maxUnavailable zero",
        [("spec.podDisruptionBudget.maxUnavailable", 0)],
        "spec.podDisruptionBudget.maxUnavailable",
    ),
    (
        "maxUnavailable nonsense",
        [("spec.podDisruptionBudget.maxUnavailable", "half")],
        "spec.podDisruptionBudget.maxUnavailable",
    ),
    ("scrape interval", [("spec.monitoring.interval", "5 minutes")], "spec.monitoring.interval"),
    ("pull policy", [("spec.imagePullPolicy", "Sometimes")], "spec.imagePullPolicy"),
    ("empty image", [("spec.image", "")], "spec.image"),
    ("tls without a secret", [("spec.tls", {})], "spec.tls.secretRef"),
    ("name too long", [("metadata.name", "m" * 41)], "metadata.name"),
    # Values no Pod, Service or label could carry: refused the way Kubernetes refuses them.
    ("image with whitespace", [("spec.image", "registry.test/dsm node:1")], "spec.image"),
    ("pod label key", [("spec.podLabels", {"bad key!": "x"})], "spec.podLabels"),
    ("pod label value", [("spec.podLabels", {"team": "no spaces allowed"})], "spec.podLabels"),
    ("pod label value too long", [("spec.podLabels", {"team": "x" * 64})], "spec.podLabels"),
    ("pod annotation key", [("spec.podAnnotations", {"-leading": "x"})], "spec.podAnnotations"),
    (
        "load balancer annotation key",
        [("spec.loadBalancer.annotations", {"a/b/c": "x"})],
        "spec.loadBalancer.annotations",
    ),
    (
        "monitoring label key",
        [("spec.monitoring.labels", {"release name": "kps"})],
        "spec.monitoring.labels",
    ),
    (
        "monitoring label value",
        [("spec.monitoring.labels", {"release": "kube prometheus"})],
        "spec.monitoring.labels",
    ),
    (
        "node selector key",
        [("spec.scheduling.nodeSelector", {"UPPER.example.com/x": "y"})],
        "spec.scheduling.nodeSelector",
    ),
    (
        "node selector value",
        [("spec.scheduling.nodeSelector", {"zone": "a/b"})],
        "spec.scheduling.nodeSelector",
    ),
    (
        "resource quantity that is not one",
        [("spec.resources.requests", {"memory": "lots"})],
        "spec.resources.requests",
    ),
    (
        "negative resource quantity",
        [("spec.resources.limits", {"memory": "-1Gi"})],
        "spec.resources.limits",
    ),
    (
        "pull secret name",
        [("spec.imagePullSecrets", [{"name": "Not_A_DNS_Name"}])],
        "spec.imagePullSecrets[0].name",
    ),
    (
        "priority class name",
        [("spec.scheduling.priorityClassName", "High Priority")],
        "spec.scheduling.priorityClassName",
    ),
    (
        "toleration operator",
        [("spec.scheduling.tolerations", [{"key": "k", "operator": "Sometimes"}])],
        "spec.scheduling.tolerations[0].operator",
    ),
    (
        "toleration effect",
        [("spec.scheduling.tolerations", [{"key": "k", "effect": "Never"}])],
        "spec.scheduling.tolerations[0].effect",
    ),
    (
        "toleration with Exists and a value",
        [("spec.scheduling.tolerations", [{"key": "k", "operator": "Exists", "value": "v"}])],
        "spec.scheduling.tolerations[0].value",
    ),
    ("time zone not in the database", [("spec.timeZone", "Mars/Olympus_Mons")], "spec.timeZone"),
]

# Edge cases that are valid for Kubernetes, so they must be accepted.
VALID: list[tuple[str, list[tuple[str, Any]]]] = [
    (
        "prefixed label and annotation keys",
        [
            ("spec.podLabels", {"example.com/team": "a-b_c.d", "empty": ""}),
            ("spec.podAnnotations", {"example.com/note": "any text: even spaces"}),
        ],
    ),
    (
        "quantities in every form",
        [
            ("spec.resources.requests", {"cpu": "500m", "memory": "512Mi"}),
            ("spec.resources.limits", {"cpu": 2, "memory": "1e9", "example.com/gpu": "0"}),
        ],
    ),
    ("deep time zone", [("spec.timeZone", "America/Argentina/Buenos_Aires")]),
    (
        "tolerations of every shape",
        [
            (
                "spec.scheduling.tolerations",
                [
                    {"operator": "Exists"},
                    {"key": "node.kubernetes.io/unreachable", "operator": "Exists"},
                    {"key": "k", "value": "v", "effect": "NoExecute", "tolerationSeconds": 30},
                ],
            )
        ],
    ),
    ("dotted pull secret", [("spec.imagePullSecrets", [{"name": "registry.example.com"}])]),
]


@pytest.mark.parametrize(
    ("changes", "field"), [(c, f) for _, c, f in INVALID], ids=[w for w, _, _ in INVALID]
)
def test_invalid_resource_is_refused_naming_the_field(
    dsm_crd: str,
    k8s_control_plane: Any,
    k8s_namespace: str,
    changes: list[tuple[str, Any]],
    field: str,
) -> None:
    body = manager_body()
    for path, value in changes:
        body = _set(body, path, value)
    message = _refusal(k8s_control_plane.api_client, k8s_namespace, body)
    assert field in message, message


@pytest.mark.parametrize("changes", [c for _, c in VALID], ids=[w for w, _ in VALID])
def test_valid_edge_cases_are_accepted(
    dsm_crd: str, k8s_control_plane: Any, k8s_namespace: str, changes: list[tuple[str, Any]]
) -> None:
    body = manager_body()
    for path, value in changes:
        body = _set(body, path, value)
    created = _create(k8s_control_plane.api_client, k8s_namespace, body)
    for path, value in changes:
        node: Any = created
        for part in path.split("."):
            node = node[part]
        assert node == value, path


def test_the_local_secret_reference_cannot_change(
    dsm_crd: str, k8s_control_plane: Any, k8s_namespace: str
) -> None:
    """The master key in the database is wrapped with the local secret: a running cluster must
    not be pointed at another Secret (every replaced pod would fail to unwrap it)."""
    api = client.CustomObjectsApi(k8s_control_plane.api_client)
    _create(k8s_control_plane.api_client, k8s_namespace, manager_body())
    for change in ({"name": "other-secret"}, {"key": "otherKey"}):
        with pytest.raises(ApiException) as refused:
            api.patch_namespaced_custom_object(
                GROUP,
                VERSION,
                k8s_namespace,
                PLURAL,
                "mgr",
                {"spec": {"masterKey": {"localSecretRef": change}}},
            )
        assert refused.value.status == 422, refused.value.body
        assert "spec.masterKey.localSecretRef" in str(refused.value.body)
        assert "cannot be changed" in str(refused.value.body)
    # Everything else stays editable.
    api.patch_namespaced_custom_object(
        GROUP, VERSION, k8s_namespace, PLURAL, "mgr", {"spec": {"nodes": 2}}
    )


def test_status_is_a_subresource(dsm_crd: str, k8s_control_plane: Any, k8s_namespace: str) -> None:
    api = client.CustomObjectsApi(k8s_control_plane.api_client)
    _create(k8s_control_plane.api_client, k8s_namespace, manager_body())
    patched = api.patch_namespaced_custom_object(
        GROUP, VERSION, k8s_namespace, PLURAL, "mgr", {"status": {"readyNodes": 5}}
    )
    assert "status" not in patched or patched["status"].get("readyNodes") != 5
    api.patch_namespaced_custom_object_status(
        GROUP,
        VERSION,
        k8s_namespace,
        PLURAL,
        "mgr",
        {"status": {"readyNodes": 1, "selector": "a=b", "undeclared": "pruned"}},
    )
    got = api.get_namespaced_custom_object(GROUP, VERSION, k8s_namespace, PLURAL, "mgr")
    assert got["status"]["readyNodes"] == 1
    assert "undeclared" not in got["status"]


def test_kubectl_scale_sets_spec_nodes(
    dsm_crd: str, k8s_control_plane: Any, k8s_namespace: str
) -> None:
    _create(k8s_control_plane.api_client, k8s_namespace, manager_body())
    k8s_control_plane.kubectl("-n", k8s_namespace, "scale", "dsm/mgr", "--replicas=3")
    api = client.CustomObjectsApi(k8s_control_plane.api_client)
    got = api.get_namespaced_custom_object(GROUP, VERSION, k8s_namespace, PLURAL, "mgr")
    assert got["spec"]["nodes"] == 3
    with pytest.raises(subprocess.CalledProcessError) as refused:
        k8s_control_plane.kubectl("-n", k8s_namespace, "scale", "dsm/mgr", "--replicas=0")
    assert "spec.nodes" in refused.value.stderr


def test_kubectl_get_shows_the_printer_columns(
    dsm_crd: str, k8s_control_plane: Any, k8s_namespace: str
) -> None:
    _create(k8s_control_plane.api_client, k8s_namespace, manager_body())
    out = k8s_control_plane.kubectl("-n", k8s_namespace, "get", "dsm").stdout
    header = out.splitlines()[0].split()
    assert header[:6] == ["NAME", "READY", "DESIRED", "VERSION", "STATUS", "AGE"]


def test_kubectl_explain_reads_the_descriptions(dsm_crd: str, k8s_control_plane: Any) -> None:
    out = k8s_control_plane.kubectl("explain", "deepsecuritymanagers.spec.loadBalancer").stdout
    assert "TCP passthrough" in out
    assert "sourceRanges" in out
