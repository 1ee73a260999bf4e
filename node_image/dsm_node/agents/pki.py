"""The cluster's agent CA and the certificates it signs. Pure (no I/O): keys and certificates in,
PEM out.

Keys are ECDSA P-256: on this machine's OpenSSL it signs and verifies faster than Ed25519 (measured
with ``openssl speed``: Ed25519 verification was about twice as slow), and every TLS stack speaks
it. The CA signs two kinds of leaf: a node's server certificate (``serverAuth``; every node issues
its own at start) and an agent's client certificate (``clientAuth``, ``CN=agent-<id>``). Agents
trust the CA, not host names (see docs/agent-protocol.md).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import secrets
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_DAYS = 3650
AGENT_CERT_DAYS = 365
NODE_CERT_DAYS = 365
AGENT_CN_PREFIX = "agent-"


class BadRequest(ValueError):
    """A certificate signing request that cannot be signed; the message says why."""


@dataclass(frozen=True)
class Authority:
    """The CA: its certificate and its private key (held only in memory, decrypted)."""

    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def certificate_pem(self) -> str:
        return self.certificate.public_bytes(serialization.Encoding.PEM).decode()

    @property
    def pin(self) -> str:
        return pin_of(self.certificate)


def pin_of(certificate: x509.Certificate) -> str:
    """``sha256:<hex>`` of the certificate's DER: what an activation token's holder checks."""
    der = certificate.public_bytes(serialization.Encoding.DER)
    return "sha256:" + hashlib.sha256(der).hexdigest()


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def load_authority(certificate_pem: str, key_pem_text: str) -> Authority:
    cert = x509.load_pem_x509_certificate(certificate_pem.encode())
    key = serialization.load_pem_private_key(key_pem_text.encode(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError("the agent CA key is not an EC key")
    return Authority(cert, key)


def new_authority(cluster: str = "dsm") -> Authority:
    key = new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{cluster} agent CA")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Authority(cert, key)


def new_serial() -> int:
    """A random positive 63-bit serial: unique in practice, and it fits a bigint column."""
    return secrets.randbits(63) | 1


def _leaf(
    ca: Authority,
    subject: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    serial: int,
    days: float,
    usage: x509.ObjectIdentifier,
    sans: list[x509.GeneralName] | None = None,
    not_before: dt.datetime | None = None,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    start = not_before or now - dt.timedelta(minutes=5)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.certificate.subject)
        .public_key(public_key)
        .serial_number(serial)
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(ca.key, hashes.SHA256())


def node_certificate(ca: Authority, node_name: str, addresses: list[str]) -> tuple[str, str]:
    """A server certificate for a node's heartbeat port: (certificate PEM + CA PEM, key PEM)."""
    key = new_key()
    sans: list[x509.GeneralName] = []
    for a in dict.fromkeys(addresses):
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(a)))
        except ValueError:
            sans.append(x509.DNSName(a))
    cert = _leaf(
        ca,
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_name[:64])]),
        key.public_key(),
        new_serial(),
        NODE_CERT_DAYS,
        ExtendedKeyUsageOID.SERVER_AUTH,
        sans,
    )
    chain = cert.public_bytes(serialization.Encoding.PEM) + ca.certificate.public_bytes(
        serialization.Encoding.PEM
    )
    return chain.decode(), key_pem(key)


def check_csr(csr_pem: str) -> ec.EllipticCurvePublicKey:
    """The public key of a valid CSR; raises BadRequest naming what is wrong."""
    try:
        csr = x509.load_pem_x509_csr(csr_pem.encode())
    except ValueError:
        raise BadRequest("csr: not a PEM certificate signing request") from None
    key = csr.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise BadRequest("csr: the key must be ECDSA P-256")
    if not csr.is_signature_valid:
        raise BadRequest("csr: the signature does not match its key")
    return key


def agent_certificate(
    ca: Authority,
    agent_id: int,
    public_key: ec.EllipticCurvePublicKey,
    serial: int,
    days: float = AGENT_CERT_DAYS,
    not_before: dt.datetime | None = None,
) -> x509.Certificate:
    return _leaf(
        ca,
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{AGENT_CN_PREFIX}{agent_id}")]),
        public_key,
        serial,
        days,
        ExtendedKeyUsageOID.CLIENT_AUTH,
        not_before=not_before,
    )


def pem(certificate: x509.Certificate) -> str:
    return certificate.public_bytes(serialization.Encoding.PEM).decode()


def csr_for(key: ec.EllipticCurvePrivateKey, hostname: str) -> str:
    """The agent's CSR (its key never leaves it)."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname[:64])]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def identity_of(peercert: dict[str, object] | None) -> tuple[int, int] | None:
    """(agent id, certificate serial) from the peer certificate as Python's ssl module decodes
    it after verification; None without a certificate or for one that names no agent."""
    if not peercert:
        return None
    cn = None
    for rdn in peercert.get("subject", ()):  # type: ignore[attr-defined]
        for key, value in rdn:
            if key == "commonName":
                cn = value
    serial = peercert.get("serialNumber")
    if not isinstance(cn, str) or not cn.startswith(AGENT_CN_PREFIX) or not isinstance(serial, str):
        return None
    try:
        return int(cn[len(AGENT_CN_PREFIX) :]), int(serial, 16)
    except ValueError:
        return None
