"""The operator in its cluster-tier tests (tests/operator/test_cluster_*.py).

Offers :func:`manager_body` (a valid DeepSecurityManager), :func:`running_operator` (the operator
in-process with ``kopf.testing.KopfRunner``, one namespace), :class:`Api` (the questions tests ask
of the API: status, conditions, pods, events) and the operator's own pod deletions read from the
API server's audit log (:func:`operator_deletions`, :func:`assert_deleted_exactly`). The e2e tier's
counterpart, with the operator as a process and real nodes, is tests/support/e2e.py.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kopf.testing import KopfRunner
from kubernetes import client

from dsm_operator.reconcile import names
from tests.k8s.audit import Request
from tests.support.waiting import wait_until

GROUP, VERSION, PLURAL = names.GROUP, names.VERSION, names.PLURAL
CHART = Path(__file__).resolve().parents[2] / "helm" / "dsm-operator"


def manager_body(name: str = "mgr", **spec: Any) -> dict[str, Any]:
    """A valid DeepSecurityManager; keyword arguments replace top-level spec fields."""
    base: dict[str, Any] = {
        "version": "20.0.1",
        "nodes": 1,
        "database": {"secretRef": {"name": "dsm-db"}},
        "masterKey": {"localSecretRef": {"name": "dsm-master-key"}},
    }
    base.update(spec)
    return {
        "apiVersion": "security.dsm.dev/v1alpha1",
        "kind": "DeepSecurityManager",
        "metadata": {"name": name},
        "spec": {k: v for k, v in base.items() if v is not None},
    }


@contextlib.contextmanager
def running_operator(namespace: str) -> Iterator[KopfRunner]:
    args = ["run", "--standalone", "--namespace", namespace, "-m", "dsm_operator.main"]
    with KopfRunner(args, timeout=60) as runner:
        yield runner
    assert runner.exception is None, runner.output
    assert runner.exit_code == 0, runner.output


class Api:
    def __init__(self, api_client: Any, namespace: str) -> None:
        self.ns = namespace
        self.custom = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)
        self.apps = client.AppsV1Api(api_client)
        self.policy = client.PolicyV1Api(api_client)

    def secrets(self, **data: str) -> None:
        defaults = {"dsm-db": {"url": "postgresql://u:p@127.0.0.1:5432/dsm"}}
        defaults["dsm-master-key"] = {"localSecret": "s3cret"}
        for name, payload in defaults.items():
            self.core.create_namespaced_secret(
                self.ns,
                client.V1Secret(metadata=client.V1ObjectMeta(name=name), string_data=payload),
            )

    def create(self, body: dict[str, Any]) -> None:
        self.custom.create_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, body)

    def get(self, name: str = "mgr") -> dict[str, Any]:
        body: Any = self.custom.get_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, name)
        return dict(body)

    def patch_spec(self, spec: dict[str, Any], name: str = "mgr") -> None:
        self.custom.patch_namespaced_custom_object(
            GROUP, VERSION, self.ns, PLURAL, name, {"spec": spec}
        )

    def condition(self, type_: str, name: str = "mgr") -> dict[str, Any]:
        for cond in (self.get(name).get("status") or {}).get("conditions") or ():
            if cond["type"] == type_:
                return dict(cond)
        return {}

    def ready(self, nodes: int, version: str | None = None, name: str = "mgr") -> bool:
        status = self.get(name).get("status") or {}
        ok = (
            self.condition("Ready", name).get("status") == "True"
            and status.get("readyNodes") == nodes
        )
        return ok and (version is None or status.get("currentVersion") == version)

    def pods(self) -> list[Any]:
        return list(self.core.list_namespaced_pod(self.ns).items)

    def uids(self) -> dict[str, str]:
        """Pod name -> uid of the live pods."""
        return {str(p.metadata.name): str(p.metadata.uid) for p in self.pods()}

    def events(self) -> list[tuple[str, str]]:
        return [
            (str(e.reason), str(e.message or ""))
            for e in self.core.list_namespaced_event(self.ns).items
            if e.involved_object.kind == "DeepSecurityManager"
        ]

    def wait_events(self, *reasons: str, timeout: float = 30) -> list[str]:
        """The reasons of the events posted so far, once each of ``reasons`` is among them as
        many times as it is listed. kopf posts events from a queue of its own, after the change
        they report: a test that has seen the change must still wait for its event."""
        wanted = Counter(reasons)

        def posted() -> list[str] | None:
            got = [r for r, _ in self.events()]
            have = Counter(got)
            return got if all(have[r] >= n for r, n in wanted.items()) else None

        return wait_until(
            posted, timeout, f"events {dict(wanted)}", detail=lambda: f"events: {self.events()}"
        )


def install_namespaced_chart(cluster: Any, release: str, namespace: str) -> None:
    """The operator's chart installed into ``namespace`` with namespaced RBAC and watching only
    that namespace (the CRD is the test's business: ``--skip-crds``)."""
    cluster.helm(
        "install",
        release,
        str(CHART),
        "-n",
        namespace,
        "--skip-crds",
        "--set",
        "rbac.clusterWide=false",
        "--set",
        f"watch.namespaces={{{namespace}}}",
    )


def operator_deletions(cluster: Any, namespace: str) -> list[Request]:
    """The pods the operator deleted, in order, from the audit log."""
    return list(cluster.audit.pod_deletions(namespace, user_agent=names.USER_AGENT))


def assert_deleted_exactly(deletions: list[Request], expected: list[tuple[str, str]]) -> None:
    """The operator deleted these (name, uid) pods in this order, each with a uid precondition
    that named the pod it hit."""
    assert [(r.name, r.hit_uid) for r in deletions] == expected, deletions
    assert all(r.precondition_uid == r.hit_uid for r in deletions), deletions
