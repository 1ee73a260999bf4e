"""Throw-away PKI for the test control plane: one CA, the API server's serving certificate, an admin
client certificate and the service-account signing key, written as PEM files.

Why generate instead of letting kube-apiserver self-sign: clients (the Python client, kubectl, helm,
the controller manager, kwok) must verify the server against a CA we hold, and the admin identity is
a client certificate in group ``system:masters`` signed by the CA that ``--client-ca-file`` names --
the same arrangement controller-runtime's envtest uses. The certificates come from the test kit's
one builder (tests/support/pki.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from tests.support import pki

SERVING_NAMES = (
    "localhost",
    "kubernetes",
    "kubernetes.default",
    "kubernetes.default.svc",
    "kubernetes.default.svc.cluster.local",
)
"""DNS names in the API server's certificate: the ones in-cluster clients use for it."""
ADMIN_USER = "dsm-test-admin"
ADMIN_GROUP = "system:masters"


@dataclass(frozen=True)
class Files:
    """Paths of the PEM files written by :func:`generate`."""

    ca_cert: Path
    ca_key: Path
    serving_cert: Path
    serving_key: Path
    admin_cert: Path
    admin_key: Path
    service_account_key: Path
    service_account_pub: Path


def generate(directory: Path, *, service_ip: str, host: str = "127.0.0.1") -> Files:
    """Write a fresh CA, serving, admin and service-account key material into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    files = Files(
        ca_cert=directory / "ca.crt",
        ca_key=directory / "ca.key",
        serving_cert=directory / "apiserver.crt",
        serving_key=directory / "apiserver.key",
        admin_cert=directory / "admin.crt",
        admin_key=directory / "admin.key",
        service_account_key=directory / "sa.key",
        service_account_pub=directory / "sa.pub",
    )
    ca = pki.CertificateAuthority("dsm-test-ca")
    files.ca_cert.write_bytes(ca.cert_pem)
    pki.write_private(files.ca_key, pki.key_pem(ca.key))

    serving = ca.issue("kube-apiserver", dns=SERVING_NAMES, ips=(host, service_ip))
    serving.write(files.serving_cert, files.serving_key)

    admin = ca.issue(ADMIN_USER, usage="client", organization=ADMIN_GROUP)
    admin.write(files.admin_cert, files.admin_key)

    sa_key = pki.new_key()
    pki.write_private(files.service_account_key, pki.key_pem(sa_key))
    files.service_account_pub.write_bytes(
        sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return files
