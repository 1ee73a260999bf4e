"""What the operator creates for Prometheus, validated by the real API server against the real
``monitoring.coreos.com`` CRDs of the Prometheus Operator (pinned in hack/prometheus/versions.env).

A control plane of its own (etcd + kube-apiserver, a few seconds): installing these CRDs into the
session's shared control plane would turn on the ServiceMonitor path of every other operator test
that runs after this module.

Two questions: does the API server accept what the operator's manifest functions produce, with
strict field validation (an unknown or misplaced field is a 4xx, not silently pruned), and does
the operator really create it when the API exists -- unchanged on the way (nothing pruned)?
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from dsm_operator.reconcile import manifests, names
from dsm_operator.reconcile.specs import ManagerSpec, Owner
from tests.k8s import controlplane
from tests.k8s.kubeapi import KubeApi
from tests.support import e2e, prometheus
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]

SM = ("monitoring.coreos.com/v1", "servicemonitors")
PR = ("monitoring.coreos.com/v1", "prometheusrules")
NAMESPACE = "monitoring-test"


def crd_established(api: KubeApi, name: str) -> bool:
    crd = api.get(f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}") or {}
    conditions = (crd.get("status") or {}).get("conditions") or []
    return any(c["type"] == "Established" and c["status"] == "True" for c in conditions)


@pytest.fixture(scope="module")
def api(
    prometheus_tools: prometheus.Tools, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[KubeApi]:
    binaries = controlplane.Binaries.locate()
    if binaries.missing():
        pytest.skip("the control plane is not built (make k8s)")
    with controlplane.running(tmp_path_factory.mktemp("k8s-monitoring")) as plane:
        kube = KubeApi(plane.kubeconfig)
        e2e.install_crd(kube)
        for path in (prometheus_tools.service_monitor_crd, prometheus_tools.prometheus_rule_crd):
            body = yaml.safe_load(path.read_text())
            name = body["metadata"]["name"]
            kube.apply(f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}", body)
            wait_until(lambda name=name: crd_established(kube, name), 30, f"{name} established")
        kube.expect(
            "POST",
            "/api/v1/namespaces",
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}},
        )
        kube.kubeconfig_path = plane.kubeconfig  # type: ignore[attr-defined]
        yield kube


def resource_body(name: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{e2e.GROUP}/{e2e.VERSION}",
        "kind": "DeepSecurityManager",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "version": "0.1.0",
            "nodes": 1,
            "database": {"secretRef": {"name": "dsm-db"}},
            "masterKey": {"localSecretRef": {"name": "dsm-master-key"}},
            "monitoring": {"interval": "15s", "labels": {"release": "prometheus"}},
        },
    }


def create_resource(api: KubeApi, name: str) -> tuple[ManagerSpec, Owner]:
    body = api.expect(
        "POST",
        f"/apis/{e2e.GROUP}/{e2e.VERSION}/namespaces/{NAMESPACE}/{e2e.PLURAL}",
        resource_body(name),
    )
    owner = Owner(name=name, namespace=NAMESPACE, uid=body["metadata"]["uid"])
    return ManagerSpec.parse(body["spec"]), owner


def path_of(manifest: dict[str, Any], plural: str) -> str:
    return f"/apis/{manifest['apiVersion']}/namespaces/{manifest['metadata']['namespace']}/{plural}"


def contains(stored: Any, wanted: Any) -> bool:
    """Everything in ``wanted`` is in ``stored`` with the same value (the server may add
    defaults, it must not drop anything)."""
    if isinstance(wanted, dict):
        return isinstance(stored, dict) and all(
            k in stored and contains(stored[k], v) for k, v in wanted.items()
        )
    if isinstance(wanted, list):
        return (
            isinstance(stored, list)
            and len(stored) == len(wanted)
            and all(contains(s, w) for s, w in zip(stored, wanted, strict=True))
        )
    return bool(stored == wanted)


def test_the_service_monitor_passes_strict_validation(api: KubeApi) -> None:
    spec, owner = create_resource(api, "strict-sm")
    sm = manifests.service_monitor(spec, owner)
    assert sm is not None
    stored = api.expect("POST", path_of(sm, SM[1]), sm, query={"fieldValidation": "Strict"})
    assert contains(stored["spec"], sm["spec"]), stored["spec"]


def test_the_prometheus_rule_passes_strict_validation(api: KubeApi) -> None:
    spec, owner = create_resource(api, "strict-pr")
    rule = manifests.prometheus_rule(spec, owner)
    assert rule is not None
    stored = api.expect("POST", path_of(rule, PR[1]), rule, query={"fieldValidation": "Strict"})
    assert contains(stored["spec"], rule["spec"]), stored["spec"]
    assert len(stored["spec"]["groups"][0]["rules"]) > 0


def test_the_api_server_really_validates_against_the_crd(api: KubeApi) -> None:
    """The real schema is loaded: a misplaced field and a wrong type are refused, naming them."""
    spec, owner = create_resource(api, "invalid-sm")
    sm = manifests.service_monitor(spec, owner)
    assert sm is not None
    sm["metadata"]["name"] = "invalid-sm-1"
    sm["spec"]["endpoints"][0]["tlsConfig"]["insecureSkipVerfy"] = True  # a typo
    status, reply = api.call("POST", path_of(sm, SM[1]), sm, query={"fieldValidation": "Strict"})
    assert status == 400 and "insecureSkipVerfy" in str(reply), reply  # strict: unknown field
    sm["spec"]["endpoints"][0]["tlsConfig"].pop("insecureSkipVerfy")
    sm["spec"]["endpoints"][0]["interval"] = "every minute"
    status, reply = api.call("POST", path_of(sm, SM[1]), sm)
    assert status == 422 and "spec.endpoints[0].interval" in str(reply), reply
    rule = manifests.prometheus_rule(spec, owner)
    assert rule is not None
    rule["spec"]["groups"][0]["rules"][0]["for"] = "5 minutes"
    status, reply = api.call("POST", path_of(rule, PR[1]), rule)
    assert status == 422 and "spec.groups[0].rules[0].for" in str(reply), reply


def test_the_operator_creates_them_when_the_api_exists(api: KubeApi, tmp_path: Path) -> None:
    for name, data in (
        ("dsm-db", {"url": "postgresql://x@127.0.0.1:1/x"}),
        ("dsm-master-key", {"localSecret": "s"}),
    ):
        api.expect(
            "POST",
            f"/api/v1/namespaces/{NAMESPACE}/secrets",
            {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "stringData": data},
            ok=(201, 409),
        )
    spec, owner = create_resource(api, "mgr")
    operator = e2e.OperatorProcess(
        api.kubeconfig_path,  # type: ignore[attr-defined]
        NAMESPACE,
        tmp_path / "operator.log",
    ).start()
    try:
        sm_path = (
            f"/apis/{SM[0]}/namespaces/{NAMESPACE}/{SM[1]}/{names.service_monitor_name('mgr')}"
        )
        stored = wait_until(lambda: api.get(sm_path), 60, "the ServiceMonitor", operator.log_tail)
        pr_path = sm_path.replace(SM[1], PR[1])
        stored_rule = wait_until(
            lambda: api.get(pr_path), 60, "the PrometheusRule", operator.log_tail
        )
    finally:
        operator.stop()
    wanted_rule = manifests.prometheus_rule(spec, owner)
    assert wanted_rule is not None
    assert contains(stored_rule["spec"], wanted_rule["spec"]), stored_rule["spec"]
    assert stored_rule["metadata"]["labels"]["release"] == "prometheus"
    wanted = manifests.service_monitor(spec, owner)
    assert wanted is not None
    assert contains(stored["spec"], wanted["spec"]), stored["spec"]
    assert stored["metadata"]["labels"]["release"] == "prometheus"
    assert stored["metadata"]["ownerReferences"][0]["uid"] == owner.uid
