"""kwok, our stand-in for kubelets, deletes a pod once, like a kubelet.

kwok v0.8.0's own pod-delete stage answers a graceful deletion with two DELETEs by name, 10-40 ms
apart; when a controller re-creates the pod in between, the second one deletes the new pod. Our
stage (tests/k8s/kwok/pod-delete.yaml) replaces it. Judged by the API server's audit log:
every DELETE kwok sent, and which pod each one hit.
"""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes import client

from tests.k8s.plugin import Cluster
from tests.support.waiting import wait_until

pytestmark = pytest.mark.cluster

NAME = "web"
REPLACEMENTS = 6
KWOK_USER_AGENT = "kwok"


def _statefulset() -> client.V1StatefulSet:
    labels = {"app": NAME}
    return client.V1StatefulSet(
        metadata=client.V1ObjectMeta(name=NAME),
        spec=client.V1StatefulSetSpec(
            replicas=1,
            service_name=NAME,
            pod_management_policy="Parallel",
            selector=client.V1LabelSelector(match_labels=labels),
            template=client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(labels=labels),
                spec=client.V1PodSpec(
                    # A graceful deletion (as the operator's): kwok, not the API server, ends it.
                    termination_grace_period_seconds=30,
                    containers=[client.V1Container(name="node", image="dsm-node:test")],
                ),
            ),
        ),
    )


def _ready_pod(core: Any, namespace: str) -> Any:
    for pod in core.list_namespaced_pod(namespace).items:
        ready = any(c.type == "Ready" and c.status == "True" for c in (pod.status.conditions or ()))
        if ready and pod.metadata.deletion_timestamp is None:
            return pod
    return None


def test_kwok_deletes_each_deleted_pod_once_and_no_other(
    k8s_workloads: Cluster, k8s_namespace: str
) -> None:
    core = client.CoreV1Api(k8s_workloads.api_client)
    apps = client.AppsV1Api(k8s_workloads.api_client)
    apps.create_namespaced_stateful_set(k8s_namespace, _statefulset())
    deleted: list[str] = []
    for _ in range(REPLACEMENTS):
        wait_until(
            lambda: (
                (p := _ready_pod(core, k8s_namespace)) is not None and p.metadata.uid not in deleted
            ),
            30,
            "a Ready pod that is not the one deleted last",
        )
        pod = _ready_pod(core, k8s_namespace)
        core.delete_namespaced_pod(
            pod.metadata.name,
            k8s_namespace,
            body=client.V1DeleteOptions(preconditions=client.V1Preconditions(uid=pod.metadata.uid)),
        )
        deleted.append(pod.metadata.uid)
    # Let the last deletion finish (and any second DELETE follow it): the next pod is Ready.
    wait_until(
        lambda: (
            (p := _ready_pod(core, k8s_namespace)) is not None and p.metadata.uid not in deleted
        ),
        30,
        "the pod after the last deletion to be Ready",
    )

    audit = k8s_workloads.audit
    kwok_deletes = [
        r
        for r in audit.requests(k8s_namespace)
        if r.resource == "pods" and r.verb == "delete" and r.user_agent.startswith(KWOK_USER_AGENT)
    ]
    assert kwok_deletes, "no DELETE from kwok in the audit log: is the user agent still 'kwok'?"
    hits = [r.hit_uid for r in kwok_deletes if 200 <= r.code < 300]
    # Every pod the test deleted was finished by kwok exactly once...
    assert sorted(hits) == sorted(deleted), kwok_deletes
    # ...with one request each: no second DELETE, not even one that found nothing (404).
    assert len(kwok_deletes) == len(deleted), [(r.name, r.code, r.time) for r in kwok_deletes]
