"""The operator, run in-process with ``kopf.testing.KopfRunner``, against the real control plane:
the real StatefulSet controller, scheduler and garbage collector, with kwok standing in for
kubelets (pods turn Ready as soon as they are scheduled; no node process runs, so the operator's
node API is switched off here -- tests/e2e covers it with real nodes).

Every test has its own namespace and its own operator (``--standalone --namespace``).

The operator is judged by what *it* did: its pod deletions are read from the API server's audit
log (its requests carry the ``dsm-operator/`` user agent, each deletion a uid precondition, and
the response names the pod that was hit), never from the pod watch, which also shows deletions by
kwok and by the StatefulSet controller.
"""

from __future__ import annotations

import urllib.request
from typing import Any

import pytest
from kubernetes import client
from tests.k8s.podwatch import PodEvents
from tests.support.operator import (
    GROUP,
    PLURAL,
    VERSION,
    Api,
    assert_deleted_exactly,
    manager_body,
    operator_deletions,
    running_operator,
)
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.cluster, pytest.mark.usefixtures("collect_operator_leftovers")]


class PodLog(PodEvents):
    """The shared pod watch, with the questions these tests ask of it."""

    def __init__(self, api_client: Any, namespace: str) -> None:
        super().__init__(client.CoreV1Api(api_client), namespace)

    def starts_while_others_unready(self) -> list[str]:
        """Pods created while another live pod was not Ready (a second concurrent start)."""
        state: dict[str, bool] = {}
        violations = []
        for e in self.snapshot():
            if e.type == "ADDED":
                others = [n for n, ready in state.items() if not ready]
                if others:
                    violations.append(f"{e.name} created while {others} not ready")
            if e.type == "DELETED" or e.deleting:
                state.pop(e.name, None)
            else:
                state[e.name] = e.ready
        return violations

    def created(self) -> list[str]:
        return [e.name for e in self.snapshot() if e.type == "ADDED"]

    def deleted(self) -> list[str]:
        """Pods in the order their deletion began (an unscheduled pod goes without a mark)."""
        seen: list[str] = []
        marked: set[str] = set()
        for e in self.snapshot():
            if e.type == "ADDED":
                marked.discard(e.name)
            elif (e.deleting or e.type == "DELETED") and e.name not in marked:
                marked.add(e.name)
                seen.append(e.name)
        return seen


def _template_annotations(api: Api) -> dict[str, str]:
    sts = api.apps.read_namespaced_stateful_set("mgr", api.ns)
    return dict(sts.spec.template.metadata.annotations or {})


def test_applying_a_resource_creates_the_children(
    api: Api, operator_env: int, k8s_namespace: str
) -> None:
    api.secrets()
    api.create(manager_body(nodes=1))
    with running_operator(k8s_namespace):
        wait_until(lambda: api.ready(1, "20.0.1"), 60, "Ready with one node")
        sts = api.apps.read_namespaced_stateful_set("mgr", k8s_namespace)
        assert sts.spec.pod_management_policy == "Parallel"
        assert sts.spec.update_strategy.type == "OnDelete"
        assert sts.metadata.owner_references[0].kind == "DeepSecurityManager"
        template = sts.spec.template
        assert template.spec.containers[0].image == "registry.test/dsm-node:20.0.1"
        assert "operator.security.dsm.dev/config-hash" in template.metadata.annotations
        headless = api.core.read_namespaced_service("mgr-nodes", k8s_namespace)
        assert headless.spec.cluster_ip == "None"
        lb = api.core.read_namespaced_service("mgr-lb", k8s_namespace)
        assert lb.spec.type == "LoadBalancer"
        assert [(p.port, p.target_port) for p in lb.spec.ports] == [(443, "https")]
        pdb = api.policy.read_namespaced_pod_disruption_budget("mgr", k8s_namespace)
        assert pdb.spec.max_unavailable == 1
        api.core.read_namespaced_service_account("mgr-node", k8s_namespace)
        key = api.core.read_namespaced_secret("mgr-api-key", k8s_namespace)
        assert key.data["apiKey"]
        status = api.get()["status"]
        assert (
            status["selector"] == "app.kubernetes.io/instance=mgr,app.kubernetes.io/name=dsm-node"
        )
        assert status["nodes"][0]["name"] == "mgr-0"
        assert status["nodes"][0]["podReady"] is True
        # The launch of mgr-0 ended with the same write that made it Ready: its record is
        # removed (a merge patch with null), not left behind.
        assert "launch" not in status, status.get("launch")
        meta = api.get()["metadata"]
        assert meta["finalizers"] == ["operator.security.dsm.dev/finalizer"]
        # kopf stores it once the create handler is done, which may be after a timer's pass
        # (they share one lock per resource) has already made the resource Ready.
        wait_until(
            lambda: (
                "operator.security.dsm.dev/last-handled-configuration"
                in (api.get()["metadata"].get("annotations") or {})
            ),
            30,
            "kopf's last-handled-configuration annotation",
        )
        api.wait_events("ApiKeyCreated", "Created")
        metrics = (
            urllib.request.urlopen(f"http://127.0.0.1:{operator_env}/metrics", timeout=5)
            .read()
            .decode()
        )
        assert "dsm_operator_reconciles_total" in metrics
        assert (
            f'dsm_operator_nodes{{name="mgr",namespace="{k8s_namespace}",state="ready"}} 1.0'
            in metrics
        )
        # Created, then owned as if server-side apply had created it: one Apply entry of the
        # operator's field manager, no create-time Update entry that would keep fields alive.
        managers = [
            (m.manager, m.operation)
            for m in sts.metadata.managed_fields
            if m.manager == "dsm-operator" and not m.subresource
        ]
        assert managers == [("dsm-operator", "Apply")], sts.metadata.managed_fields
        # So a field the spec stops asking for goes away.
        api.patch_spec({"podAnnotations": {"example.com/temporary": "yes"}})
        wait_until(
            lambda: "example.com/temporary" in _template_annotations(api),
            30,
            "the annotation in the pod template",
        )
        api.patch_spec({"podAnnotations": None})
        wait_until(
            lambda: "example.com/temporary" not in _template_annotations(api),
            30,
            "the annotation gone from the pod template",
        )


def test_scale_up_and_down_one_node_at_a_time(
    api: Api, operator_env: int, k8s_namespace: str, k8s_workloads: Any
) -> None:
    api.secrets()
    api.create(manager_body(nodes=1))
    log = PodLog(k8s_workloads.api_client, k8s_namespace)
    try:
        with running_operator(k8s_namespace):
            wait_until(lambda: api.ready(1), 60, "one node")
            api.patch_spec({"nodes": 4})
            wait_until(lambda: api.ready(4), 90, "four nodes")
            # The watch runs on its own thread: let it catch up before reading it.
            wait_until(lambda: len(log.created()) >= 4, 30, "four creations watched")
            assert log.created() == ["mgr-0", "mgr-1", "mgr-2", "mgr-3"]
            assert log.starts_while_others_unready() == []
            api.patch_spec({"nodes": 2})
            wait_until(lambda: api.ready(2) and len(api.pods()) == 2, 90, "two nodes")
            wait_until(lambda: len(log.deleted()) >= 2, 30, "two deletions watched")
            # The StatefulSet controller removed them (replicas lowered one at a time).
            assert log.deleted() == ["mgr-3", "mgr-2"]
    finally:
        log.stop()
    assert operator_deletions(k8s_workloads, k8s_namespace) == []
    reasons = api.wait_events(*["ScalingUp"] * 3, *["ScalingDown"] * 2)
    assert reasons.count("ScalingUp") == 3
    assert reasons.count("ScalingDown") == 2


def test_version_change_replaces_one_pod_at_a_time(
    api: Api, operator_env: int, k8s_namespace: str, k8s_workloads: Any
) -> None:
    api.secrets()
    api.create(manager_body(nodes=3))
    with running_operator(k8s_namespace):
        wait_until(lambda: api.ready(3, "20.0.1"), 90, "three nodes")
        old = api.uids()
        log = PodLog(k8s_workloads.api_client, k8s_namespace)
        try:
            api.patch_spec({"version": "20.1.0"})
            wait_until(lambda: api.ready(3, "20.1.0"), 120, "upgraded")
        finally:
            log.stop()
    assert_deleted_exactly(
        operator_deletions(k8s_workloads, k8s_namespace),
        [(n, old[n]) for n in ("mgr-0", "mgr-1", "mgr-2")],
    )
    assert log.starts_while_others_unready() == []
    rollout = api.get()["status"]["rollout"]
    assert rollout["state"] == "Complete"
    assert rollout["fromVersion"] == "20.0.1"
    assert rollout["targetVersion"] == "20.1.0"
    images = {p.spec.containers[0].image for p in api.pods()}
    assert images == {"registry.test/dsm-node:20.1.0"}
    reasons = api.wait_events(*["RollingOut"] * 3, "RolloutComplete")
    assert reasons.count("RollingOut") == 3


def test_operator_restart_in_the_middle_of_an_upgrade_resumes(
    api: Api, operator_env: int, k8s_namespace: str, k8s_workloads: Any
) -> None:
    api.secrets()
    api.create(manager_body(nodes=3))
    with running_operator(k8s_namespace):
        wait_until(lambda: api.ready(3, "20.0.1"), 90, "three nodes")
        old = api.uids()
        api.patch_spec({"version": "20.1.0"})
        wait_until(
            lambda: (api.get()["status"].get("rollout") or {}).get("lastReplacedPod"),
            60,
            "the first replacement",
        )
    # The operator is gone mid-rollout.
    started = api.get()["status"]["rollout"]["startedAt"]
    assert api.get()["status"]["rollout"]["state"] == "InProgress"
    with running_operator(k8s_namespace):
        wait_until(lambda: api.ready(3, "20.1.0"), 120, "upgrade resumed and completed")
    rollout = api.get()["status"]["rollout"]
    assert rollout["startedAt"] == started
    assert rollout["state"] == "Complete"
    # Each old pod replaced once, across both operators.
    assert_deleted_exactly(
        operator_deletions(k8s_workloads, k8s_namespace),
        [(n, old[n]) for n in ("mgr-0", "mgr-1", "mgr-2")],
    )


def test_secret_change_rolls_the_pods_and_nothing_else_does(
    api: Api, operator_env: int, k8s_namespace: str, k8s_workloads: Any
) -> None:
    api.secrets()
    api.create(manager_body(nodes=2))
    with running_operator(k8s_namespace):
        wait_until(lambda: api.ready(2), 90, "two nodes")
        uids = {p.metadata.uid for p in api.pods()}
        # Unrelated key in the same Secret: no roll.
        api.core.patch_namespaced_secret(
            "dsm-db", k8s_namespace, {"stringData": {"comment": "not read by the pods"}}
        )
        api.patch_spec({"paused": False, "podAnnotations": None})
        generation = api.get()["metadata"]["generation"]
        wait_until(
            lambda: api.ready(2) and api.get()["status"].get("observedGeneration") == generation,
            30,
            "a pass over the new generation, two nodes still Ready",
        )
        assert {p.metadata.uid for p in api.pods()} == uids
        api.core.patch_namespaced_secret(
            "dsm-db", k8s_namespace, {"stringData": {"url": "postgresql://u:p@127.0.0.1:5433/dsm"}}
        )
        wait_until(
            lambda: api.ready(2) and not ({p.metadata.uid for p in api.pods()} & uids),
            90,
            "both pods replaced",
        )


def test_missing_secret_is_reported_then_recovers(
    api: Api, operator_env: int, k8s_namespace: str
) -> None:
    api.create(manager_body(nodes=1))
    with running_operator(k8s_namespace):
        wait_until(
            lambda: api.condition("Degraded").get("reason") == "SecretNotFound",
            60,
            "Degraded SecretNotFound",
        )
        assert "dsm-db" in api.condition("Degraded")["message"]
        assert api.condition("Ready")["status"] == "False"
        api.secrets()
        wait_until(lambda: api.ready(1), 60, "recovered")
        assert api.condition("Degraded")["status"] == "False"


def test_paused_takes_no_action(api: Api, operator_env: int, k8s_namespace: str) -> None:
    api.secrets()
    api.create(manager_body(nodes=1))
    with running_operator(k8s_namespace):
        wait_until(lambda: api.ready(1), 60, "one node")
        api.patch_spec({"paused": True, "nodes": 3})
        wait_until(
            lambda: api.condition("Progressing").get("reason") == "Paused", 30, "Progressing Paused"
        )
        assert len(api.pods()) == 1
        api.patch_spec({"paused": False})
        wait_until(lambda: api.ready(3), 90, "three nodes after unpausing")


def test_deleting_the_resource_removes_children_and_keeps_secrets(
    api: Api, operator_env: int, k8s_namespace: str
) -> None:
    api.secrets()
    api.create(manager_body(nodes=2))
    with running_operator(k8s_namespace):
        wait_until(lambda: api.ready(2), 90, "two nodes")
        api.custom.delete_namespaced_custom_object(GROUP, VERSION, k8s_namespace, PLURAL, "mgr")

        def gone() -> bool:
            return not (
                api.apps.list_namespaced_stateful_set(k8s_namespace).items
                or [
                    s
                    for s in api.core.list_namespaced_service(k8s_namespace).items
                    if s.metadata.name.startswith("mgr")
                ]
                or api.policy.list_namespaced_pod_disruption_budget(k8s_namespace).items
            )

        wait_until(gone, 60, "children garbage-collected")
        wait_until(lambda: not api.pods(), 60, "pods gone")
    names = {s.metadata.name for s in api.core.list_namespaced_secret(k8s_namespace).items}
    assert {"dsm-db", "dsm-master-key"} <= names
    wait_until(
        lambda: (
            "mgr-api-key"
            not in {s.metadata.name for s in api.core.list_namespaced_secret(k8s_namespace).items}
        ),
        30,
        "the operator-managed API key Secret garbage-collected",
    )


def test_a_version_that_never_gets_ready_stops_the_rollout(
    api: Api, operator_env: int, k8s_namespace: str, k8s_workloads: Any
) -> None:
    """The new version cannot come up (here: its pods cannot be scheduled). After the ready
    timeout the rollout stops with Degraded and an Event, touching no further pod; a scale-down
    asked for meanwhile waits rather than take a healthy node out too; reverting the spec
    replaces the broken pod, recovers, and then scales down."""
    api.secrets()
    api.create(manager_body(nodes=3, nodeReadyTimeoutSeconds=60))
    with running_operator(k8s_namespace):
        wait_until(lambda: api.ready(3, "20.0.1"), 90, "three nodes")
        old = api.uids()
        api.patch_spec(
            {"version": "20.1.0", "scheduling": {"nodeSelector": {"dsm.test/none": "x"}}}
        )
        wait_until(
            lambda: api.condition("Degraded").get("reason") == "RolloutStalled",
            150,
            "Degraded RolloutStalled",
        )
        # The operator replaced mgr-0 and touched nothing else.
        assert_deleted_exactly(
            operator_deletions(k8s_workloads, k8s_namespace), [("mgr-0", old["mgr-0"])]
        )
        broken = api.uids()["mgr-0"]
        status = api.get()["status"]
        assert status["rollout"]["state"] == "Stalled"
        assert status["rollout"]["pending"] == ["mgr-1", "mgr-2"]
        assert api.condition("Progressing")["status"] == "False"
        api.wait_events("RolloutStalled")
        # nodes 3 -> 2 while mgr-0 is broken: removing mgr-2 would put a second node out.
        api.patch_spec({"nodes": 2})
        generation = api.get()["metadata"]["generation"]
        # The pass that records this generation is the one that planned with nodes: 2 (the
        # status is written after the action), so what it did is visible once it is recorded.
        wait_until(
            lambda: api.get()["status"]["observedGeneration"] == generation,
            60,
            f"generation {generation} observed",
        )
        assert api.apps.read_namespaced_stateful_set("mgr", k8s_namespace).spec.replicas == 3
        assert api.condition("Degraded")["reason"] == "RolloutStalled"
        assert sorted(api.uids()) == ["mgr-0", "mgr-1", "mgr-2"]
        # Revert: the broken pod is the outdated one now and is replaced first; then the
        # scale-down proceeds.
        api.patch_spec({"version": "20.0.1", "scheduling": None})  # merge patch: null removes
        wait_until(
            lambda: api.ready(2, "20.0.1") and len(api.pods()) == 2,
            120,
            "recovered after the revert, then scaled down",
        )
        assert api.condition("Degraded")["status"] == "False"
        # The revert replaced the broken mgr-0 once more, and still nothing else.
        assert_deleted_exactly(
            operator_deletions(k8s_workloads, k8s_namespace),
            [("mgr-0", old["mgr-0"]), ("mgr-0", broken)],
        )
