"""Deletion as the real API server and garbage collector do it: finalizers hold an object in
``Terminating`` until removed, and owner references let the garbage collector delete children.

Operators get these wrong easily (a finalizer that hangs deletion when the operator is gone,
children without owner references that outlive their parent); mocks show neither.
"""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes import client
from kubernetes.client import ApiException

from tests.k8s.plugin import Cluster
from tests.support.waiting import wait_until

pytestmark = pytest.mark.cluster

FINALIZER = "cluster-tier.dsm.test/cleanup"


def config_map_exists(core: Any, namespace: str, name: str) -> bool:
    try:
        core.read_namespaced_config_map(name, namespace)
    except ApiException as exc:
        if exc.status == 404:
            return False
        raise
    return True


def test_finalizer_holds_deletion_until_removed(
    k8s_control_plane: Cluster, k8s_namespace: str
) -> None:
    core = client.CoreV1Api(k8s_control_plane.api_client)
    core.create_namespaced_config_map(
        k8s_namespace,
        client.V1ConfigMap(metadata=client.V1ObjectMeta(name="held", finalizers=[FINALIZER])),
    )
    core.delete_namespaced_config_map("held", k8s_namespace)

    terminating: Any = core.read_namespaced_config_map("held", k8s_namespace)
    assert terminating.metadata.deletion_timestamp is not None
    assert terminating.metadata.finalizers == [FINALIZER]

    core.patch_namespaced_config_map(
        "held", k8s_namespace, [{"op": "remove", "path": "/metadata/finalizers"}]
    )
    assert not config_map_exists(core, k8s_namespace, "held")


def test_garbage_collector_deletes_owned_children(
    k8s_workloads: Cluster, k8s_namespace: str
) -> None:
    core = client.CoreV1Api(k8s_workloads.api_client)
    owner: Any = core.create_namespaced_config_map(
        k8s_namespace, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="owner"))
    )
    ref = client.V1OwnerReference(
        api_version="v1", kind="ConfigMap", name="owner", uid=owner.metadata.uid
    )
    core.create_namespaced_config_map(
        k8s_namespace,
        client.V1ConfigMap(metadata=client.V1ObjectMeta(name="child", owner_references=[ref])),
    )
    core.delete_namespaced_config_map(
        "owner", k8s_namespace, body=client.V1DeleteOptions(propagation_policy="Background")
    )
    wait_until(
        lambda: not config_map_exists(core, k8s_namespace, "child"),
        30,
        "the garbage collector to delete the child",
    )
