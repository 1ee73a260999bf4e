"""The real StatefulSet controller's ordering rules, observed through the API.

With ``podManagementPolicy: OrderedReady`` the controller creates pod N+1 only after pod N is Running and
Ready, and on scale-down removes the highest ordinal first, one at a time. Our operator's upgrade and
scale logic is built on these rules (FIELD-NOTES section 3), so they are checked here against the real
controller rather than assumed.

How readiness is held back without sleeping on the controller: every pod is created with a scheduling
gate, so it stays Pending (unscheduled, not Ready) until the test removes the gate; the scheduler then
binds it to kwok's fake node and kwok marks it Ready. A watch records every pod event in the order the
API server emits them; the assertions read that log.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from ipaddress import ip_address, ip_network
from typing import Any

import pytest
from kubernetes import client, watch

from tests.cluster import controlplane
from tests.cluster.plugin import Cluster

pytestmark = pytest.mark.cluster

GATE = "cluster-tier.dsm.test/hold"
NAME = "web"


@dataclass(frozen=True)
class PodEvent:
    type: str
    name: str
    ready: bool
    deleting: bool
    pod_ip: str | None


class PodEvents:
    """Records pod watch events of one namespace in API order, on a thread, until stopped."""

    def __init__(self, core: Any, namespace: str) -> None:
        self._core = core
        self._namespace = namespace
        self._events: list[PodEvent] = []
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        rv = core.list_namespaced_pod(namespace).metadata.resource_version
        self._thread = threading.Thread(target=self._run, args=(rv,), daemon=True)
        self._thread.start()

    def _run(self, resource_version: str) -> None:
        try:
            while not self._stop.is_set():
                w = watch.Watch()
                for event in w.stream(
                    self._core.list_namespaced_pod,
                    self._namespace,
                    resource_version=resource_version,
                    timeout_seconds=1,
                ):
                    pod = event["object"]
                    resource_version = pod.metadata.resource_version
                    ready = any(
                        c.type == "Ready" and c.status == "True"
                        for c in (pod.status.conditions or [])
                    )
                    recorded = PodEvent(
                        event["type"],
                        pod.metadata.name,
                        ready,
                        pod.metadata.deletion_timestamp is not None,
                        pod.status.pod_ip,
                    )
                    with self._changed:
                        self._events.append(recorded)
                        self._changed.notify_all()
        except BaseException as exc:  # handed to the test thread by wait_for
            with self._changed:
                self._error = exc
                self._changed.notify_all()

    def snapshot(self) -> list[PodEvent]:
        with self._changed:
            if self._error is not None:
                raise self._error
            return list(self._events)

    def wait_for(self, what: str, check: Callable[[list[PodEvent]], bool], timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        with self._changed:
            while not check(self._events):
                if self._error is not None:
                    raise self._error
                left = deadline - time.monotonic()
                if left <= 0:
                    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}: {self._events}")
                self._changed.wait(left)

    def assert_no_event(self, name: str, seconds: float) -> None:
        """Fail if any event for pod ``name`` arrives within ``seconds`` (a bounded negative check)."""
        deadline = time.monotonic() + seconds
        with self._changed:
            while (left := deadline - time.monotonic()) > 0:
                if self._error is not None:
                    raise self._error
                seen = [e for e in self._events if e.name == name]
                assert not seen, f"unexpected events for {name}: {seen}"
                self._changed.wait(left)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


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


def wait_until(what: str, check: Callable[[], bool], timeout: float = 30) -> None:
    """Poll ``check`` (an API read) with backoff until it holds, or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    delay = 0.05
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.5)


def status_counts(apps: Any, namespace: str) -> tuple[int, int]:
    """(replicas, readyReplicas) from the StatefulSet's status."""
    status = apps.read_namespaced_stateful_set_status(NAME, namespace).status
    return status.replicas or 0, status.ready_replicas or 0


def created(name: str) -> Callable[[list[PodEvent]], bool]:
    return lambda evs: any(e.type == "ADDED" and e.name == name for e in evs)


def ready(name: str) -> Callable[[list[PodEvent]], bool]:
    return lambda evs: any(e.name == name and e.ready for e in evs)


def deleted(name: str) -> Callable[[list[PodEvent]], bool]:
    return lambda evs: any(e.type == "DELETED" and e.name == name for e in evs)


def first(evs: list[PodEvent], match: Callable[[PodEvent], bool]) -> int:
    return next(i for i, e in enumerate(evs) if match(e))


def test_ordered_ready_creates_one_pod_at_a_time_and_scales_down_from_the_top(
    k8s_workloads: Cluster, k8s_namespace: str, pod_events: PodEvents
) -> None:
    core = client.CoreV1Api(k8s_workloads.api_client)
    apps = client.AppsV1Api(k8s_workloads.api_client)
    apps.create_namespaced_stateful_set(k8s_namespace, statefulset(replicas=3))

    for ordinal in range(3):
        pod = f"{NAME}-{ordinal}"
        pod_events.wait_for(f"{pod} to be created", created(pod))
        # Pod N is held unready by its gate. The controller has seen it (its status counts it) and
        # gets a few seconds more to create N+1 anyway; OrderedReady says it must not.
        wait_until(
            f"StatefulSet status to count {pod} as created but not Ready",
            lambda o=ordinal: status_counts(apps, k8s_namespace) == (o + 1, o),
        )
        pod_events.assert_no_event(f"{NAME}-{ordinal + 1}", seconds=3)
        core.patch_namespaced_pod(
            pod, k8s_namespace, [{"op": "remove", "path": "/spec/schedulingGates"}]
        )
        pod_events.wait_for(f"{pod} to be Ready", ready(pod))

    events = pod_events.snapshot()
    for ordinal in (1, 2):
        prev_ready = first(events, lambda e, o=ordinal: e.name == f"{NAME}-{o - 1}" and e.ready)
        this_added = first(events, lambda e, o=ordinal: e.type == "ADDED" and e.name == f"{NAME}-{o}")
        assert prev_ready < this_added, f"{NAME}-{ordinal} created before {NAME}-{ordinal - 1} Ready"

    pod_cidr = ip_network(controlplane.POD_CIDR)
    for pod in core.list_namespaced_pod(k8s_namespace).items:
        assert pod.spec.node_name == controlplane.FAKE_NODE
        assert ip_address(pod.status.pod_ip) in pod_cidr, pod.status.pod_ip
        assert ip_address(pod.status.pod_ip).is_loopback

    # Scale down to one: web-2 goes first and is gone before web-1's deletion starts.
    apps.patch_namespaced_stateful_set_scale(NAME, k8s_namespace, {"spec": {"replicas": 1}})
    pod_events.wait_for(f"{NAME}-1 to be deleted", deleted(f"{NAME}-1"))
    events = pod_events.snapshot()
    start_2 = first(events, lambda e: e.name == f"{NAME}-2" and (e.deleting or e.type == "DELETED"))
    gone_2 = first(events, lambda e: e.name == f"{NAME}-2" and e.type == "DELETED")
    start_1 = first(events, lambda e: e.name == f"{NAME}-1" and (e.deleting or e.type == "DELETED"))
    assert start_2 < gone_2 < start_1, events
    assert not any(e.name == f"{NAME}-0" and (e.deleting or e.type == "DELETED") for e in events)
