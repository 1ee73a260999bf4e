"""The real StatefulSet controller's ordering rules, observed through the API.

With ``podManagementPolicy: OrderedReady`` the controller creates pod N+1 only after pod N is
Running and Ready, and on scale-down removes the highest ordinal first, one at a time. The operator
does *not* rely on ``OrderedReady``: an upgrade leaves the old nodes unready (``Offline (Upgrade
Required)``), and ``OrderedReady`` would then refuse to re-create a deleted higher ordinal, so the
rollout would deadlock. It uses ``Parallel`` with ``OnDelete`` and orders launches itself
(docs/operator-design.md). What it relies on, and what is checked here against the real
controller rather than assumed: a scale-down removes the highest ordinal first, and a pod is made
Ready only after scheduling. The ``OrderedReady`` behaviour is kept under test because it is the
reason the operator cannot use it.

How readiness is held back without sleeping on the controller: every pod is created with a
scheduling gate, so it stays Pending (unscheduled, not Ready) until the test removes the gate; the
scheduler then binds it to kwok's fake node and kwok marks it Ready. A watch records every pod event
in the order the API server emits them; the assertions read that log.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from ipaddress import ip_address, ip_network
from typing import Any

import pytest
from kubernetes import client
from kubernetes import watch as watching

from tests.k8s import controlplane
from tests.k8s.plugin import Cluster
from tests.k8s.podwatch import PodEvent, PodEvents
from tests.support.waiting import wait_until

pytestmark = pytest.mark.cluster

watch: Any = watching  # its annotations differ between client releases

GATE = "cluster-tier.dsm.test/hold"
NAME = "web"


@pytest.fixture
def pod_events(k8s_workloads: Cluster, k8s_namespace: str) -> Iterator[PodEvents]:
    events = PodEvents(client.CoreV1Api(k8s_workloads.api_client), k8s_namespace)
    yield events
    events.stop()


def statefulset(replicas: int) -> client.V1StatefulSet:
    labels = {"app": NAME}
    return client.V1StatefulSet(
        metadata=client.V1ObjectMeta(name=NAME),
        spec=client.V1StatefulSetSpec(
            replicas=replicas,
            service_name=NAME,
            pod_management_policy="OrderedReady",
            selector=client.V1LabelSelector(match_labels=labels),
            template=client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(labels=labels),
                spec=client.V1PodSpec(
                    scheduling_gates=[client.V1PodSchedulingGate(name=GATE)],
                    termination_grace_period_seconds=0,
                    containers=[client.V1Container(name="node", image="dsm-node:test")],
                ),
            ),
        ),
    )


def status_counts(apps: Any, namespace: str) -> tuple[int, int]:
    """(replicas, readyReplicas) from the StatefulSet's status."""
    status = apps.read_namespaced_stateful_set_status(NAME, namespace).status
    return status.replicas or 0, status.ready_replicas or 0


def is_(what: str, e: PodEvent) -> bool:
    """Whether event ``e`` shows the pod ``what``: added, ready, deleting (or deleted), deleted."""
    return {
        "added": e.type == "ADDED",
        "ready": e.ready,
        "deleting": e.deleting or e.type == "DELETED",
        "deleted": e.type == "DELETED",
    }[what]


def happened(name: str, what: str) -> Callable[[list[PodEvent]], bool]:
    """A check for :meth:`PodEvents.wait_for`: pod ``name`` was seen ``what``."""

    def check(events: list[PodEvent]) -> bool:
        return any(e.name == name and is_(what, e) for e in events)

    return check


def first(events: list[PodEvent], name: str, what: str) -> int:
    """Position in the watch log of the first event that shows pod ``name`` ``what``."""
    return next(i for i, e in enumerate(events) if e.name == name and is_(what, e))


def test_ordered_ready_creates_one_pod_at_a_time_and_scales_down_from_the_top(
    k8s_workloads: Cluster, k8s_namespace: str, pod_events: PodEvents
) -> None:
    core = client.CoreV1Api(k8s_workloads.api_client)
    apps = client.AppsV1Api(k8s_workloads.api_client)
    apps.create_namespaced_stateful_set(k8s_namespace, statefulset(replicas=3))

    for ordinal in range(3):
        pod = f"{NAME}-{ordinal}"
        pod_events.wait_for(f"{pod} to be created", happened(pod, "added"))
        # Pod N is held unready by its gate. The controller has seen it (its status counts it) and
        # gets a few seconds more to create N+1 anyway; OrderedReady says it must not.
        wait_until(
            lambda: status_counts(apps, k8s_namespace) == (ordinal + 1, ordinal),  # noqa: B023
            30,
            f"StatefulSet status to count {pod} as created but not Ready",
        )
        pod_events.assert_no_event(f"{NAME}-{ordinal + 1}", seconds=2)
        core.patch_namespaced_pod(
            pod, k8s_namespace, [{"op": "remove", "path": "/spec/schedulingGates"}]
        )
        pod_events.wait_for(f"{pod} to be Ready", happened(pod, "ready"))

    events = pod_events.snapshot()
    for ordinal in (1, 2):
        before, pod = f"{NAME}-{ordinal - 1}", f"{NAME}-{ordinal}"
        assert first(events, before, "ready") < first(events, pod, "added"), (
            f"{pod} created before {before} was Ready: {events}"
        )

    pod_cidr = ip_network(controlplane.POD_CIDR)
    node = core.read_node(controlplane.FAKE_NODE)
    assert node.status is not None and node.status.addresses
    assert all(
        ip_address(a.address).is_loopback for a in node.status.addresses if a.type.endswith("IP")
    )
    pods: list[Any] = core.list_namespaced_pod(k8s_namespace).items
    for item in pods:
        assert item.spec.node_name == controlplane.FAKE_NODE
        assert ip_address(item.status.pod_ip) in pod_cidr, item.status.pod_ip
        assert ip_address(item.status.pod_ip).is_loopback

    # Scale down to one: web-2 goes first and is gone before web-1's deletion starts.
    apps.patch_namespaced_stateful_set_scale(NAME, k8s_namespace, {"spec": {"replicas": 1}})
    pod_events.wait_for(f"{NAME}-1 to be deleted", happened(f"{NAME}-1", "deleted"))
    events = pod_events.snapshot()
    top, middle = f"{NAME}-2", f"{NAME}-1"
    assert first(events, top, "deleting") < first(events, top, "deleted"), events
    assert first(events, top, "deleted") < first(events, middle, "deleting"), events
    assert not happened(f"{NAME}-0", "deleting")(events), events
