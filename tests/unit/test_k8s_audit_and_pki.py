"""The Kubernetes simulation's file-level parts (tests/k8s), without starting anything: the audit
log read back (who deleted which pod, with which precondition), the control plane's PKI, which
kwok stages it runs, and where it looks for the programs ``make k8s`` built."""

from __future__ import annotations

import ipaddress
import json
import os
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.k8s import certificates, controlplane
from tests.k8s.audit import AuditLog


def event(verb: str, resource: str, name: str, **extra: Any) -> dict[str, Any]:
    return {
        "stage": "ResponseComplete",
        "verb": verb,
        "objectRef": {"resource": resource, "namespace": "ns", "name": name},
        "user": {"username": "system:serviceaccount:ns:dsm-operator"},
        "userAgent": "dsm-operator/0.1.0",
        "responseStatus": {"code": 200},
        "stageTimestamp": "2026-12-01T10:00:00.000000Z",
        **extra,
    }


def test_pod_deletions_name_the_client_the_precondition_and_the_pod_hit(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    lines = [
        event(
            "delete",
            "pods",
            "mgr-0",
            requestObject={"kind": "DeleteOptions", "preconditions": {"uid": "uid-a"}},
            responseObject={"kind": "Pod", "metadata": {"uid": "uid-a"}},
        ),
        {**event("delete", "pods", "mgr-1"), "stage": "RequestReceived"},  # not complete
        {**event("delete", "pods", "mgr-1"), "userAgent": "kwok/v0.8.0"},
        {**event("delete", "pods", "mgr-2"), "responseStatus": {"code": 409}},  # refused
        {
            **event("delete", "pods", "mgr-3"),
            "objectRef": {"resource": "pods", "namespace": "other", "name": "mgr-3"},
        },
        event("patch", "statefulsets", "mgr"),
    ]
    log.write_text("\n".join(json.dumps(e) for e in lines) + '\n{"stage": "Respon')  # mid-write
    audit = AuditLog(log)

    mine = audit.pod_deletions("ns", user_agent="dsm-operator/")
    assert [(r.name, r.precondition_uid, r.hit_uid) for r in mine] == [("mgr-0", "uid-a", "uid-a")]
    assert [r.name for r in audit.pod_deletions("ns")] == ["mgr-0", "mgr-1"]
    assert [(r.verb, r.user_agent) for r in audit.writes("ns", "statefulsets", "mgr")] == [
        ("patch", "dsm-operator/0.1.0")
    ]
    assert list(AuditLog(tmp_path / "none.jsonl").requests("ns")) == []


def test_the_control_planes_pki(tmp_path: Path) -> None:
    files = certificates.generate(tmp_path / "pki", service_ip="127.2.0.1")
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    serving = x509.load_pem_x509_certificate(files.serving_cert.read_bytes())
    admin = x509.load_pem_x509_certificate(files.admin_cert.read_bytes())
    assert serving.issuer == admin.issuer == ca.subject
    sans = serving.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(sans.get_values_for_type(x509.DNSName)) == set(certificates.SERVING_NAMES)
    assert set(sans.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("127.2.0.1"),
    }
    groups = admin.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    assert [g.value for g in groups] == ["system:masters"]
    usage = admin.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    for key in (files.ca_key, files.serving_key, files.admin_key, files.service_account_key):
        assert key.stat().st_mode & 0o777 == 0o600, key
    load_pem_public_key(files.service_account_pub.read_bytes())


def test_our_kwok_stage_replaces_kwoks_own_of_the_same_name(tmp_path: Path) -> None:
    for name in ("pod-ready.yaml", "pod-delete.yaml", "node-heartbeat.yaml"):
        (tmp_path / name).write_text("kind: Stage\n")
    stages = controlplane.kwok_stage_files(tmp_path)
    assert [Path(s).name for s in stages] == [
        "node-heartbeat.yaml",
        "pod-delete.yaml",
        "pod-ready.yaml",
    ]
    assert str(controlplane.OWN_KWOK_STAGES / "pod-delete.yaml") in stages
    assert str(tmp_path / "pod-delete.yaml") not in stages


def test_the_programs_are_found_where_the_pinned_versions_put_them(tmp_path: Path) -> None:
    versions = controlplane.read_versions()
    binaries = controlplane.Binaries.locate(tmp_path)
    assert binaries.k8s_version == versions["K8S_VERSION"]
    assert (
        binaries.kube_apiserver
        == tmp_path / "k8s" / versions["K8S_VERSION"] / "bin" / "kube-apiserver"
    )
    assert versions["HELM_VERSION"] in str(binaries.helm) and versions["KWOK_VERSION"] in str(
        binaries.kwok
    )
    assert len(binaries.missing()) == 7  # six programs and kwok's stages
    for program in (
        binaries.kube_apiserver,
        binaries.kube_controller_manager,
        binaries.kube_scheduler,
        binaries.etcd,
        binaries.kwok,
        binaries.helm,
    ):
        program.parent.mkdir(parents=True, exist_ok=True)
        program.write_text("#!/bin/sh\n")
        os.chmod(program, 0o755)
    binaries.kwok_stages.mkdir(parents=True)
    assert binaries.missing() == [binaries.kwok_stages]
    (binaries.kwok_stages / "pod-ready.yaml").write_text("kind: Stage\n")
    assert binaries.missing() == []
