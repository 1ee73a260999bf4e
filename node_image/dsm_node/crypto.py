"""The master key: how it is wrapped, checked, and used to encrypt data at rest.

Every node holds the same *local secret*. A key-encryption key is derived from it with Argon2id
(memory-hard, so a stolen database cannot be brute-forced cheaply) and wraps the cluster's random
256-bit master key with AES-256-GCM. The database stores only the wrapped key and a check value.
A node with a different secret cannot unwrap it and refuses to start.

Data is encrypted with AES-256-GCM under the master key; the associated data binds each ciphertext
to where it belongs (a setting's key, a user's field), so no ciphertext can move to another row.
Ciphertext text form: ``v1.<key version>.<base64 nonce+ciphertext>``.

``KeyWrapper`` is the seam for an external key service (KMS): implement ``wrap``/``unwrap`` and
store its name in ``master_keys.wrapping``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from dataclasses import dataclass, field
from typing import Any, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

CHECK_LABEL = b"dsm master key check v1"


class WrongSecret(RuntimeError):
    """The local secret does not unlock this cluster's master key."""


class KeyWrapper(Protocol):
    name: str

    def wrap(self, key: bytes) -> tuple[bytes, dict[str, Any]]: ...

    def unwrap(self, wrapped: bytes, params: dict[str, Any]) -> bytes: ...


@dataclass
class LocalSecretWrapper:
    """Wraps with a key derived from the node's local secret by Argon2id."""

    secret: bytes
    memory_kib: int = 65536
    iterations: int = 3
    name: str = "local-secret/argon2id/aes-256-gcm"
    _kek: dict[tuple[bytes, int, int], bytes] = field(default_factory=dict, repr=False)

    def _derive(self, salt: bytes, memory_kib: int, iterations: int) -> bytes:
        cache_key = (salt, memory_kib, iterations)
        if cache_key not in self._kek:
            kdf = Argon2id(
                salt=salt, length=32, iterations=iterations, lanes=1, memory_cost=memory_kib
            )
            self._kek[cache_key] = kdf.derive(self.secret)
        return self._kek[cache_key]

    def wrap(self, key: bytes) -> tuple[bytes, dict[str, Any]]:
        salt, nonce = os.urandom(16), os.urandom(12)
        kek = self._derive(salt, self.memory_kib, self.iterations)
        params = {"salt": _b64(salt), "memoryKiB": self.memory_kib, "iterations": self.iterations}
        return nonce + AESGCM(kek).encrypt(nonce, key, b"dsm master key"), params

    def unwrap(self, wrapped: bytes, params: dict[str, Any]) -> bytes:
        kek = self._derive(
            _unb64(params["salt"]), int(params["memoryKiB"]), int(params["iterations"])
        )
        try:
            return AESGCM(kek).decrypt(wrapped[:12], wrapped[12:], b"dsm master key")
        except InvalidTag:
            raise WrongSecret(WrongSecret.__doc__) from None


def check_value(master_key: bytes) -> bytes:
    return hmac.new(master_key, CHECK_LABEL, hashlib.sha256).digest()


def new_master_key() -> bytes:
    return os.urandom(32)


class Keyring:
    """The unwrapped master keys this node can use, by version; the newest active one encrypts."""

    def __init__(self) -> None:
        self.keys: dict[int, bytes] = {}
        self.active: int | None = None

    def add(self, version: int, key: bytes, active: bool) -> None:
        self.keys[version] = key
        if active:
            self.active = version

    def encrypt(self, plaintext: str, context: str) -> str:
        if self.active is None:
            raise RuntimeError("no active master key")
        nonce = os.urandom(12)
        ct = AESGCM(self.keys[self.active]).encrypt(nonce, plaintext.encode(), context.encode())
        return f"v1.{self.active}.{_b64(nonce + ct)}"

    def decrypt(self, token: str, context: str) -> str:
        try:
            tag, version, blob = token.split(".", 2)
            key = self.keys[int(version)]
        except (ValueError, KeyError):
            raise ValueError("ciphertext is malformed or uses an unknown key version") from None
        if tag != "v1":
            raise ValueError(f"unknown ciphertext format {tag!r}")
        raw = _unb64(blob)
        try:
            return AESGCM(key).decrypt(raw[:12], raw[12:], context.encode()).decode()
        except InvalidTag:
            raise ValueError("ciphertext failed authentication (tampered or misplaced)") from None

    @staticmethod
    def version_of(token: str) -> int:
        return int(token.split(".", 2)[1])


def _b64(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).decode().rstrip("=")


def _unb64(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))
