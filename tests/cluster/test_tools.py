"""helm and kubectl work against the fixture's control plane with nothing but its kubeconfig.

Charts are linted, rendered and installed by the same helm the project pins, built with version
ldflags: without them helm assumes Kubernetes 1.20 in ``helm template`` and ``kubeVersion`` checks
misfire. The install waits for a Deployment to become ready, which needs the controller manager, the
scheduler and kwok, so it also proves the workloads tier end to end. kubectl is whatever the machine
has, if any.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from tests.k8s import controlplane
from tests.k8s.plugin import Cluster

pytestmark = pytest.mark.cluster

CHART = Path(__file__).parent / "charts" / "probe"


def test_helm_lint(k8s_control_plane: Cluster) -> None:
    out = k8s_control_plane.helm("lint", "--strict", str(CHART)).stdout
    assert "1 chart(s) linted, 0 chart(s) failed" in out, out


def test_helm_template_renders_offline_with_a_current_kube_version(
    k8s_control_plane: Cluster,
) -> None:
    out = k8s_control_plane.helm("template", "demo", str(CHART), "--set", "message=rendered").stdout
    docs: list[dict[str, Any]] = [d for d in yaml.safe_load_all(out) if d]
    kinds = {d["kind"]: d for d in docs}
    assert set(kinds) == {"ConfigMap", "Deployment"}
    assert kinds["ConfigMap"]["data"]["message"] == "rendered"
    assumed = kinds["ConfigMap"]["data"]["kubeVersion"]
    assert assumed.startswith("v1.") and assumed != "v1.20.0", (
        f"helm built without ldflags: {assumed}"
    )


def test_helm_template_refuses_values_the_schema_forbids(k8s_control_plane: Cluster) -> None:
    with pytest.raises(Exception) as refused:
        k8s_control_plane.helm("template", "demo", str(CHART), "--set", "replicaCount=-1")
    assert "replicaCount" in str(getattr(refused.value, "stderr", refused.value))


def test_helm_install_into_the_control_plane(k8s_workloads: Cluster, k8s_namespace: str) -> None:
    cluster = k8s_workloads
    cluster.helm(
        "install", "demo", str(CHART),
        "--namespace", k8s_namespace,
        "--set", "message=installed",
        "--wait", "--timeout", "90s",
    )  # fmt: skip
    releases = json.loads(cluster.helm("list", "--namespace", k8s_namespace, "-o", "json").stdout)
    assert [(r["name"], r["status"]) for r in releases] == [("demo", "deployed")]

    core = client.CoreV1Api(cluster.api_client)
    cm = core.read_namespaced_config_map("demo-probe", k8s_namespace)
    assert cm.data == {
        "message": "installed",
        "kubeVersion": cluster.control_plane.binaries.k8s_version,
    }
    deployment = client.AppsV1Api(cluster.api_client).read_namespaced_deployment(
        "demo-probe", k8s_namespace
    )
    assert deployment.status is not None
    assert deployment.status.ready_replicas == 1

    cluster.helm("uninstall", "demo", "--namespace", k8s_namespace, "--wait")
    assert (
        core.list_namespaced_config_map(
            k8s_namespace, label_selector="app.kubernetes.io/instance=demo"
        ).items
        == []
    )


def test_kubeconfig_works_with_kubectl(k8s_control_plane: Cluster, k8s_namespace: str) -> None:
    version = json.loads(k8s_control_plane.kubectl("version", "-o", "json").stdout)
    assert (
        version["serverVersion"]["gitVersion"]
        == k8s_control_plane.control_plane.binaries.k8s_version
    )
    k8s_control_plane.kubectl(
        "create", "configmap", "from-kubectl", "-n", k8s_namespace, "--from-literal=key=value"
    )
    got = k8s_control_plane.kubectl(
        "get", "configmap", "from-kubectl", "-n", k8s_namespace, "-o", "jsonpath={.data.key}"
    ).stdout
    assert got == "value"


def test_python_client_sees_the_pinned_server_version_on_loopback(
    k8s_control_plane: Cluster,
) -> None:
    info = client.VersionApi(k8s_control_plane.api_client).get_code()
    pinned = k8s_control_plane.control_plane.binaries.k8s_version
    assert info.git_version == pinned
    assert (info.major, info.minor) == ("1", pinned.split(".")[1])
    kubeconfig = yaml.safe_load(k8s_control_plane.kubeconfig.read_text())
    assert kubeconfig["clusters"][0]["cluster"]["server"].startswith(
        f"https://{controlplane.HOST}:"
    )
