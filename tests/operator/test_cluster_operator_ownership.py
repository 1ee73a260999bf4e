"""What the operator may touch, and how it says so, against the real control plane.

- Objects that carry a child's name but are not controlled by the resource (by owner uid) are
  never written or deleted: the resource goes ``Degraded`` (``OwnershipConflict``, naming the
  object) with an Event, and the audit log shows no write by the operator to that object.
- A write the API server refuses (here: a ValidatingAdmissionPolicy, the way a cluster policy or
  a bad value would) shows in the status with this generation, not as a silent retry loop.
- The operator works under the chart's own ServiceAccount with the OwnerReferencesPermission-
  Enforcement admission plugin on (the control plane of this tier enables it).
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from tests.support.operator import (
    Api,
    install_namespaced_chart,
    manager_body,
    running_operator,
)
from tests.support.waiting import wait_until

from dsm_operator.reconcile import names

pytestmark = [pytest.mark.cluster, pytest.mark.usefixtures("collect_operator_leftovers")]

FOREIGN_LABELS = {"app": "users-own"}


def _meta(name: str) -> client.V1ObjectMeta:
    return client.V1ObjectMeta(name=name, labels=FOREIGN_LABELS)


def _foreign_service(api: Api, name: str) -> None:
    api.core.create_namespaced_service(
        api.ns,
        client.V1Service(
            metadata=_meta(name),
            spec=client.V1ServiceSpec(
                type="ClusterIP", selector=FOREIGN_LABELS, ports=[client.V1ServicePort(port=80)]
            ),
        ),
    )


def _foreign_pdb(api: Api, name: str) -> None:
    api.policy.create_namespaced_pod_disruption_budget(
        api.ns,
        client.V1PodDisruptionBudget(
            metadata=_meta(name),
            spec=client.V1PodDisruptionBudgetSpec(
                max_unavailable=1, selector=client.V1LabelSelector(match_labels=FOREIGN_LABELS)
            ),
        ),
    )


def _foreign_service_account(api: Api, name: str) -> None:
    api.core.create_namespaced_service_account(
        api.ns, client.V1ServiceAccount(metadata=_meta(name))
    )


def _foreign_secret(api: Api, name: str) -> None:
    api.core.create_namespaced_secret(
        api.ns, client.V1Secret(metadata=_meta(name), string_data={"apiKey": "not-yours"})
    )


def _foreign_statefulset(api: Api, name: str) -> None:
    api.apps.create_namespaced_stateful_set(
        api.ns,
        client.V1StatefulSet(
            metadata=_meta(name),
            spec=client.V1StatefulSetSpec(
                replicas=0,
                service_name=name,
                selector=client.V1LabelSelector(match_labels=FOREIGN_LABELS),
                template=client.V1PodTemplateSpec(
                    metadata=client.V1ObjectMeta(labels=FOREIGN_LABELS),
                    spec=client.V1PodSpec(
                        containers=[client.V1Container(name="c", image="users-own:1")]
                    ),
                ),
            ),
        ),
    )


# (kind, child name of resource "mgr", audit resource, how the user made it)
FOREIGN = [
    ("Service", "mgr-lb", "services", _foreign_service),
    ("Service", "mgr-agents", "services", _foreign_service),
    ("Service", "mgr-nodes", "services", _foreign_service),
    ("ServiceAccount", "mgr-node", "serviceaccounts", _foreign_service_account),
    ("PodDisruptionBudget", "mgr", "poddisruptionbudgets", _foreign_pdb),
    ("StatefulSet", "mgr", "statefulsets", _foreign_statefulset),
    ("Secret", "mgr-api-key", "secrets", _foreign_secret),
]


def _operator_writes(cluster: Any, namespace: str, resource: str, name: str) -> list[Any]:
    return [
        r
        for r in cluster.audit.writes(namespace, resource, name)
        if r.user_agent.startswith(names.USER_AGENT)
    ]


def _read(api: Api, kind: str, name: str) -> Any:
    return {
        "Service": api.core.read_namespaced_service,
        "ServiceAccount": api.core.read_namespaced_service_account,
        "PodDisruptionBudget": api.policy.read_namespaced_pod_disruption_budget,
        "StatefulSet": api.apps.read_namespaced_stateful_set,
        "Secret": api.core.read_namespaced_secret,
    }[kind](name, api.ns)


def _content(obj: Any) -> Any:
    """What a takeover would change: labels, annotations, owners, spec (or data)."""
    body = obj.to_dict()
    meta = body["metadata"]
    return (
        meta.get("labels"),
        meta.get("annotations"),
        meta.get("owner_references"),
        body.get("spec"),
        body.get("data"),
        body.get("automount_service_account_token"),
    )


@pytest.mark.parametrize(
    ("kind", "name", "resource", "make"), FOREIGN, ids=[f"{k}-{n}" for k, n, _, _ in FOREIGN]
)
def test_an_object_that_is_not_ours_is_never_taken_over(
    api: Api,
    operator_env: int,
    k8s_namespace: str,
    k8s_workloads: Any,
    kind: str,
    name: str,
    resource: str,
    make: Any,
) -> None:
    api.secrets()
    make(api, name)
    before = _read(api, kind, name)
    api.create(manager_body(nodes=1))
    with running_operator(k8s_namespace):
        wait_until(
            lambda: api.condition("Degraded").get("reason") == "OwnershipConflict",
            60,
            "Degraded OwnershipConflict",
        )
        degraded = api.condition("Degraded")
        assert f"{kind} {name}" in degraded["message"], degraded
        assert api.condition("Ready")["status"] == "False"
        api.wait_events("OwnershipConflict")
        assert ("OwnershipConflict", degraded["message"]) in api.events()
        after = _read(api, kind, name)
        # Unchanged but for status (controllers update a StatefulSet's or PDB's status).
        assert _content(after) == _content(before)
        assert not after.metadata.owner_references
        assert _operator_writes(k8s_workloads, k8s_namespace, resource, name) == []
        if kind != "StatefulSet":  # nothing at all is written while a child's name is taken
            assert api.apps.list_namespaced_stateful_set(k8s_namespace).items == []
        # The user removes their object: the operator proceeds.
        delete = {
            "Service": api.core.delete_namespaced_service,
            "ServiceAccount": api.core.delete_namespaced_service_account,
            "PodDisruptionBudget": api.policy.delete_namespaced_pod_disruption_budget,
            "StatefulSet": api.apps.delete_namespaced_stateful_set,
            "Secret": api.core.delete_namespaced_secret,
        }[kind]
        delete(name, k8s_namespace)
        wait_until(lambda: api.ready(1), 90, "Ready once the name is free")
        assert api.condition("Degraded")["status"] == "False"
        owner_uid = api.get()["metadata"]["uid"]
        assert _read(api, kind, name).metadata.owner_references[0].uid == owner_uid


def test_switching_a_child_off_deletes_only_what_is_ours(
    api: Api, operator_env: int, k8s_namespace: str, k8s_workloads: Any
) -> None:
    """``podDisruptionBudget.enabled: false`` and ``loadBalancer.enabled: false`` delete the
    operator's own PDB and its two load balancer Services (console and agents) -- never a user's
    object of the same name."""
    api.secrets()
    api.create(manager_body(nodes=1))
    with running_operator(k8s_namespace):
        wait_until(lambda: api.ready(1), 60, "Ready")
        api.patch_spec(
            {"podDisruptionBudget": {"enabled": False}, "loadBalancer": {"enabled": False}}
        )
        wait_until(
            lambda: (
                not api.policy.list_namespaced_pod_disruption_budget(k8s_namespace).items
                and not {"mgr-lb", "mgr-agents"}
                & {s.metadata.name for s in api.core.list_namespaced_service(k8s_namespace).items}
            ),
            60,
            "the operator's PDB and load balancer Services deleted",
        )
        assert api.wait_events(*["ChildDeleted"] * 3).count("ChildDeleted") == 3
        # Now the names are free and a user takes them: they stay.
        _foreign_pdb(api, "mgr")
        _foreign_service(api, "mgr-lb")
        _foreign_service(api, "mgr-agents")
        api.patch_spec({"podAnnotations": {"example.com/touch": "1"}})  # a few more passes
        wait_until(
            lambda: api.ready(1) and api.get()["status"]["observedGeneration"] == 3,
            60,
            "Ready at generation 3",
        )
        for _ in range(3):
            generation = api.get()["metadata"]["generation"]
            api.patch_spec({"podAnnotations": {"example.com/touch": str(generation)}})
            wait_until(
                lambda g=generation + 1: api.get()["status"]["observedGeneration"] == g,
                60,
                f"generation {generation + 1} observed",
            )
    _read(api, "PodDisruptionBudget", "mgr")
    _read(api, "Service", "mgr-lb")
    _read(api, "Service", "mgr-agents")
    assert [r for r, _ in api.events()].count("ChildDeleted") == 3
    deletes = [
        r
        for resource, name in (
            ("poddisruptionbudgets", "mgr"),
            ("services", "mgr-lb"),
            ("services", "mgr-agents"),
        )
        for r in _operator_writes(k8s_workloads, k8s_namespace, resource, name)
        if r.verb == "delete"
    ]
    assert len(deletes) == 3, deletes  # the three deletions of its own objects, no more


@pytest.fixture
def refusing_policy(k8s_workloads: Any, k8s_namespace: str) -> Any:
    """A ValidatingAdmissionPolicy that refuses every update of StatefulSets in the namespace,
    installed when the test calls it and removed afterwards."""
    adm = client.AdmissionregistrationV1Api(k8s_workloads.api_client)
    name = f"refuse-sts-{k8s_namespace}"[:63]
    installed: list[str] = []

    def install() -> None:
        adm.create_validating_admission_policy(
            {
                "apiVersion": "admissionregistration.k8s.io/v1",
                "kind": "ValidatingAdmissionPolicy",
                "metadata": {"name": name},
                "spec": {
                    "failurePolicy": "Fail",
                    "matchConstraints": {
                        "resourceRules": [
                            {
                                "apiGroups": ["apps"],
                                "apiVersions": ["v1"],
                                "operations": ["UPDATE"],
                                "resources": ["statefulsets"],
                            }
                        ]
                    },
                    "validations": [
                        {
                            "expression": "false",
                            "message": "refused by the test's admission policy",
                            "reason": "Invalid",
                        }
                    ],
                },
            }
        )
        adm.create_validating_admission_policy_binding(
            {
                "apiVersion": "admissionregistration.k8s.io/v1",
                "kind": "ValidatingAdmissionPolicyBinding",
                "metadata": {"name": name},
                "spec": {
                    "policyName": name,
                    "validationActions": ["Deny"],
                    "matchResources": {
                        "namespaceSelector": {
                            "matchLabels": {"kubernetes.io/metadata.name": k8s_namespace}
                        }
                    },
                },
            }
        )
        installed.append(name)

    def remove() -> None:
        if installed:
            adm.delete_validating_admission_policy_binding(name)
            adm.delete_validating_admission_policy(name)
            installed.clear()

    install.remove = remove  # type: ignore[attr-defined]
    yield install
    remove()


def test_a_refused_write_shows_in_the_status(
    api: Api, operator_env: int, k8s_namespace: str, refusing_policy: Any
) -> None:
    api.secrets()
    api.create(manager_body(nodes=1))
    with running_operator(k8s_namespace):
        wait_until(lambda: api.ready(1), 60, "Ready")
        refusing_policy()
        api.patch_spec({"podAnnotations": {"example.com/new": "value"}})
        generation = api.get()["metadata"]["generation"]

        def reported() -> bool:
            status = api.get()["status"]
            degraded = api.condition("Degraded")
            return (
                status["observedGeneration"] == generation
                and degraded.get("reason") == "ApplyFailed"
                and degraded.get("observedGeneration") == generation
            )

        wait_until(reported, 60, "Degraded ApplyFailed for this generation")
        degraded = api.condition("Degraded")
        assert degraded["status"] == "True"
        assert "StatefulSet mgr" in degraded["message"]
        assert "refused by the test's admission policy" in degraded["message"]
        ready = api.condition("Ready")
        assert ready["status"] == "False" and ready["reason"] == "ApplyFailed"
        api.wait_events("ApplyFailed")
        refusing_policy.remove()
        wait_until(
            lambda: api.ready(1) and api.condition("Degraded")["status"] == "False",
            60,
            "recovered once the policy is gone",
        )
        sts = api.apps.read_namespaced_stateful_set("mgr", k8s_namespace)
        assert sts.spec.template.metadata.annotations["example.com/new"] == "value"


def _kubeconfig_for(cluster: Any, token: str, path: Path) -> Path:
    admin = yaml.safe_load(cluster.kubeconfig.read_text())
    ca = admin["clusters"][0]["cluster"]["certificate-authority-data"]
    base64.b64decode(ca)  # it is there and sane
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {
                        "name": "c",
                        "cluster": {"server": cluster.server, "certificate-authority-data": ca},
                    }
                ],
                "users": [{"name": "operator", "user": {"token": token}}],
                "contexts": [{"name": "c", "context": {"cluster": "c", "user": "operator"}}],
                "current-context": "c",
            }
        )
    )
    path.chmod(0o600)
    return path


def test_the_operator_works_under_the_charts_service_account(
    api: Api,
    operator_env: int,
    k8s_namespace: str,
    k8s_workloads: Any,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """The chart's RBAC, nothing more, with OwnerReferencesPermissionEnforcement on: children
    carry blockOwnerDeletion, which needs update on deepsecuritymanagers/finalizers."""
    release = "own"
    install_namespaced_chart(k8s_workloads, release, k8s_namespace)
    try:
        sa = f"{release}-dsm-operator"
        token = api.core.create_namespaced_service_account_token(
            sa, k8s_namespace, {"spec": {"expirationSeconds": 3600}}
        ).status.token
        kubeconfig = _kubeconfig_for(k8s_workloads, token, tmp_path / "operator.kubeconfig")
        monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
        api.secrets()
        api.create(manager_body(nodes=2))
        with running_operator(k8s_namespace):
            try:
                wait_until(lambda: api.ready(2), 90, "two nodes under the chart's account")
            except AssertionError as exc:
                raise AssertionError(f"{exc}; conditions: {api.get().get('status')}") from None
        sts = api.apps.read_namespaced_stateful_set("mgr", k8s_namespace)
        ref = sts.metadata.owner_references[0]
        assert ref.kind == "DeepSecurityManager" and ref.block_owner_deletion is True
        writes = k8s_workloads.audit.writes(k8s_namespace, "statefulsets", "mgr")
        assert writes and all(
            r.user == f"system:serviceaccount:{k8s_namespace}:{sa}"
            for r in writes
            if r.user_agent.startswith(names.USER_AGENT)
        )
    finally:
        k8s_workloads.helm("uninstall", release, "-n", k8s_namespace)
