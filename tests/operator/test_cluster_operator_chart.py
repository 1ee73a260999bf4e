"""The operator's Helm chart with the pinned helm: lint, render every ci/ value set, install into
the real control plane and check the operator's ServiceAccount may do everything the operator does
(``kubectl auth can-i``), cluster-wide and namespace-scoped."""

from __future__ import annotations

import subprocess
from typing import Any

import pytest
import yaml
from tests.support.operator import CHART, install_namespaced_chart
from tests.support.waiting import wait_until

pytestmark = pytest.mark.cluster


# What the operator does in a namespace it serves (see gateways/kubeapi.py and driving.py).
NEEDED = [
    ("get", "deepsecuritymanagers.security.dsm.dev"),
    ("watch", "deepsecuritymanagers.security.dsm.dev"),
    ("patch", "deepsecuritymanagers.security.dsm.dev"),
    ("patch", "deepsecuritymanagers.security.dsm.dev/status"),
    ("update", "deepsecuritymanagers.security.dsm.dev/finalizers"),
    ("create", "events"),
    ("list", "pods"),
    ("delete", "pods"),
    ("get", "secrets"),
    ("create", "secrets"),
    ("patch", "services"),
    ("create", "services"),
    ("delete", "services"),
    ("patch", "serviceaccounts"),
    ("patch", "statefulsets.apps"),
    ("create", "statefulsets.apps"),
    ("patch", "poddisruptionbudgets.policy"),
    ("delete", "poddisruptionbudgets.policy"),
    ("patch", "servicemonitors.monitoring.coreos.com"),
    ("patch", "prometheusrules.monitoring.coreos.com"),
]

# What it never does: Secrets are read by name and one is created, nothing else.
NOT_NEEDED = [
    ("list", "secrets"),
    ("watch", "secrets"),
    ("patch", "secrets"),
    ("update", "secrets"),
    ("delete", "secrets"),
    ("delete", "statefulsets.apps"),
    ("delete", "serviceaccounts"),
]


def _docs(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def test_lint_and_render_every_value_set(k8s_control_plane: Any) -> None:
    k8s_control_plane.helm("lint", "--strict", str(CHART))
    for values in sorted((CHART / "ci").glob("*-values.yaml")):
        k8s_control_plane.helm("lint", "--strict", str(CHART), "-f", str(values))
        docs = _docs(k8s_control_plane.helm("template", "r", str(CHART), "-f", str(values)).stdout)
        deployments = [d for d in docs if d["kind"] == "Deployment"]
        assert len(deployments) == 1, values.name
        assert deployments[0]["spec"]["replicas"] == 1
        assert deployments[0]["spec"]["strategy"] == {"type": "Recreate"}


def test_schema_refuses_unknown_values(k8s_control_plane: Any) -> None:
    with pytest.raises(subprocess.CalledProcessError) as refused:
        k8s_control_plane.helm("template", "r", str(CHART), "--set", "replicas=2")
    assert "replicas" in refused.value.stderr


def test_namespaced_rbac_needs_namespaces(k8s_control_plane: Any) -> None:
    with pytest.raises(subprocess.CalledProcessError) as refused:
        k8s_control_plane.helm("template", "r", str(CHART), "--set", "rbac.clusterWide=false")
    assert "watch.namespaces" in refused.value.stderr


def test_namespaced_render_watches_only_its_namespaces(k8s_control_plane: Any) -> None:
    values = CHART / "ci" / "namespaced-values.yaml"
    docs = _docs(k8s_control_plane.helm("template", "r", str(CHART), "-f", str(values)).stdout)
    roles = sorted(d["metadata"]["namespace"] for d in docs if d["kind"] == "Role")
    assert roles == ["team-a", "team-b"]
    cluster_role = next(d for d in docs if d["kind"] == "ClusterRole")
    resources = {r for rule in cluster_role["rules"] for r in rule["resources"]}
    assert "secrets" not in resources
    args = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"][
        "containers"
    ][0]["args"]
    assert args == ["--namespace=team-a", "--namespace=team-b"]


def _restricted_namespace(cluster: Any, name: str) -> None:
    from kubernetes import client

    labels = {
        "pod-security.kubernetes.io/enforce": "restricted",
        "pod-security.kubernetes.io/enforce-version": "latest",
    }
    client.CoreV1Api(cluster.api_client).patch_namespace(name, {"metadata": {"labels": labels}})


def test_every_pod_of_the_chart_is_admitted_under_restricted(
    k8s_control_plane: Any, k8s_namespace: str
) -> None:
    """The operator's pod and the `helm test` pod, created (server-side dry run) in a namespace
    that enforces Pod Security "restricted": the API server's own PodSecurity admission judges."""
    from kubernetes import client

    _restricted_namespace(k8s_control_plane, k8s_namespace)
    docs = _docs(k8s_control_plane.helm("template", "r", str(CHART), "-n", k8s_namespace).stdout)
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    test_pods = [d for d in docs if d["kind"] == "Pod"]
    assert test_pods, "the chart has a helm test pod"
    pods = [
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "operator"},
            "spec": deployment["spec"]["template"]["spec"],
        },
        *test_pods,
    ]
    core = client.CoreV1Api(k8s_control_plane.api_client)
    # The pods' ServiceAccounts must exist (the service-account controller makes "default" only
    # when the workloads tier runs).
    accounts = ("default", *(d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount"))
    for account in accounts:
        try:
            core.create_namespaced_service_account(k8s_namespace, {"metadata": {"name": account}})
        except client.ApiException as exc:
            if exc.status != 409:
                raise
    refused = []
    for pod in pods:
        pod["metadata"]["namespace"] = k8s_namespace
        try:
            core.create_namespaced_pod(k8s_namespace, pod, dry_run="All")
        except client.ApiException as exc:
            refused.append(f"{pod['metadata']['name']}: {exc.status} {exc.body}")
    assert refused == []


def _can_i(cluster: Any, sa: str, namespace: str, verb: str, resource: str) -> bool:
    """A SubjectAccessReview (works for APIs not served here, unlike ``kubectl auth can-i``)."""
    from kubernetes import client

    name, _, sub = resource.partition("/")
    plural, _, group = name.partition(".")
    sa_namespace = sa.split(":")[2]
    review = client.V1SubjectAccessReview(
        spec=client.V1SubjectAccessReviewSpec(
            user=sa,
            groups=["system:serviceaccounts", f"system:serviceaccounts:{sa_namespace}"],
            resource_attributes=client.V1ResourceAttributes(
                namespace=namespace or None,
                verb=verb,
                group=group,
                resource=plural,
                subresource=sub or None,
            ),
        )
    )
    result = client.AuthorizationV1Api(cluster.api_client).create_subject_access_review(review)
    return bool(result.status.allowed)


def _wait_granted(cluster: Any, sa: str, namespace: str) -> None:
    """Wait until the API server's authorizer grants every permission in NEEDED (it reads roles
    and bindings from caches that catch up after ``helm install`` returns); fail naming those
    still missing."""

    def missing() -> list[str]:
        return [
            f"{verb} {res}" for verb, res in NEEDED if not _can_i(cluster, sa, namespace, verb, res)
        ]

    wait_until(lambda: not missing(), 30, "the chart's RBAC granted", lambda: str(missing()))


def test_installed_cluster_wide_operator_may_do_its_work(
    k8s_control_plane: Any, k8s_namespace: str, dsm_crd: str
) -> None:
    release = "op"
    installed = k8s_control_plane.helm(
        "install", release, str(CHART), "-n", k8s_namespace, "--skip-crds", "--wait=false"
    )
    try:
        notes = installed.stdout
        chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
        assert f'version: "{chart["appVersion"]}"' in notes, notes
        assert "helm show crds" in notes
        assert "<this chart>" not in notes and "https://" not in notes
        sa = f"system:serviceaccount:{k8s_namespace}:{release}-dsm-operator"
        _wait_granted(k8s_control_plane, sa, "some-other-namespace")
        excess = [
            f"{verb} {res}"
            for verb, res in NOT_NEEDED
            if _can_i(k8s_control_plane, sa, "some-other-namespace", verb, res)
        ]
        assert excess == []
        assert _can_i(
            k8s_control_plane, sa, "", "list", "customresourcedefinitions.apiextensions.k8s.io"
        )
    finally:
        k8s_control_plane.helm("uninstall", release, "-n", k8s_namespace)


def test_installed_namespaced_operator_is_confined(
    k8s_control_plane: Any, k8s_namespace: str, dsm_crd: str
) -> None:
    release = "opns"
    install_namespaced_chart(k8s_control_plane, release, k8s_namespace)
    try:
        sa = f"system:serviceaccount:{k8s_namespace}:{release}-dsm-operator"
        _wait_granted(k8s_control_plane, sa, k8s_namespace)
        assert not _can_i(k8s_control_plane, sa, "default", "get", "secrets")
        assert not _can_i(k8s_control_plane, sa, "default", "patch", "statefulsets.apps")
    finally:
        k8s_control_plane.helm("uninstall", release, "-n", k8s_namespace)
