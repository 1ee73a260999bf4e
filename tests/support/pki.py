"""Throw-away certificates for tests: the one certificate builder.

Offers :class:`CertificateAuthority` (a CA that issues server and client certificates with the
names and addresses a test needs), :func:`self_signed` (a certificate that is its own trust
anchor, as the node's own certificate is) and :class:`Issued` (a certificate with its key, as
PEM, written to files on request).

Keys are ECDSA P-256 (milliseconds to make); certificates are valid from five minutes ago (a
clock a little behind does not matter) for two days by default, and carry the extensions strict
verifiers expect: critical basic constraints, key usage, subject and authority key identifiers,
the extended key usage of the role, and subject alternative names.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_VALIDITY = datetime.timedelta(days=2)
Usage = Literal["server", "client"]
_USAGES = {"server": ExtendedKeyUsageOID.SERVER_AUTH, "client": ExtendedKeyUsageOID.CLIENT_AUTH}


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """The private key as unencrypted PKCS#8 PEM."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def write_private(path: Path, data: bytes) -> Path:
    """Write key material readable by its owner only."""
    path.write_bytes(data)
    path.chmod(0o600)
    return path


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key."""

    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def cert_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return key_pem(self.key)

    def write(self, cert_path: Path, key_path: Path) -> tuple[Path, Path]:
        """Write both as PEM (the key ``0600``); returns the two paths."""
        cert_path.write_bytes(self.cert_pem)
        write_private(key_path, self.key_pem)
        return cert_path, key_path


def _name(common_name: str, organization: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if organization:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    return x509.Name(attrs)


def _alternative_names(dns: Iterable[str], ips: Iterable[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = [x509.DNSName(n) for n in dns]
    names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in dict.fromkeys(ips)]
    return names


def _build(
    subject: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    is_ca: bool,
    usage: Usage | None,
    sans: list[x509.GeneralName],
    validity: datetime.timedelta,
) -> x509.Certificate:
    """The one place a certificate is built."""
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + validity)
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=is_ca,
                crl_sign=is_ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
    )
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([_USAGES[usage]]), critical=False)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


class CertificateAuthority:
    """A CA of its own; :meth:`issue` signs certificates for servers and clients."""

    def __init__(self, common_name: str, validity: datetime.timedelta = DEFAULT_VALIDITY) -> None:
        self.name = _name(common_name)
        self.key = new_key()
        self.validity = validity
        self.certificate = _build(
            self.name,
            self.key,
            self.name,
            self.key,
            is_ca=True,
            usage=None,
            sans=[],
            validity=validity,
        )

    @property
    def cert_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def issue(
        self,
        common_name: str,
        *,
        usage: Usage | None = "server",
        organization: str | None = None,
        dns: Iterable[str] = (),
        ips: Iterable[str] = (),
    ) -> Issued:
        """A certificate for ``common_name`` (group ``organization`` for Kubernetes clients)
        valid for the DNS names and IP addresses given."""
        key = new_key()
        cert = _build(
            _name(common_name, organization),
            key,
            self.name,
            self.key,
            is_ca=False,
            usage=usage,
            sans=_alternative_names(dns, ips),
            validity=self.validity,
        )
        return Issued(cert, key)


def self_signed(
    common_name: str,
    *,
    dns: Iterable[str] = (),
    ips: Iterable[str] = (),
    validity: datetime.timedelta = DEFAULT_VALIDITY,
) -> Issued:
    """A server certificate that is its own CA (a client trusts exactly this certificate)."""
    key = new_key()
    name = _name(common_name)
    cert = _build(
        name,
        key,
        name,
        key,
        is_ca=True,
        usage="server",
        sans=_alternative_names(dns, ips),
        validity=validity,
    )
    return Issued(cert, key)
