"""Sign-in on any node: users, sessions and API keys, all in the shared database.

Passwords are hashed with Argon2id (memory-hard, 0.1-1 s of CPU each). That work never runs on the
event loop: ``HASHING`` runs it on a few threads (argon2 releases the GIL) at a lower CPU priority
than the loop, behind a bounded queue; a sign-in that finds the queue full is answered 503 with
Retry-After at once. So no flood of sign-ins, however large, delays the node's heartbeat.

Session tokens and API keys are 256-bit random values; only their SHA-256 is stored (a fast hash
suffices for values nobody can guess, and keeps every API request cheap).

Failed sign-ins are limited cluster-wide (``MAX_FAILURES`` per ``FAILURE_WINDOW_SECONDS`` per user
name and per source address). The limit is atomic: before any password is checked, a failure
*slot* is reserved in one transaction under advisory locks on the user name and on the source, and
the slot is kept when the password is wrong and released when it is right. Concurrent attempts
therefore never check more passwords than the limit allows, on one node or across nodes.
Personal data (full name, e-mail) is encrypted with the master key.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import json
import logging
import os
import secrets
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TypeVar

import argon2
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from dsm_node import roles
from dsm_node.crypto import Keyring
from dsm_node.db.queries import Q

log = logging.getLogger("dsm.auth")
_T = TypeVar("_T")

SESSION_TTL_SECONDS = 8 * 3600
MAX_FAILURES = 5
FAILURE_WINDOW_SECONDS = 300
ROLES = roles.ROLES
# Any constant works as long as every node uses the same: the advisory-lock namespace of sign-in
# rate limiting ("dsm-sign" in ASCII), combined with a hash of the user name or source.
SIGN_IN_LOCK_SPACE = 0x64736D2D7369676E

_hasher = argon2.PasswordHasher()  # Argon2id, 64 MiB, 3 passes: the library's recommendation


class Busy(Exception):
    """Every password-hashing slot is taken; the caller should retry shortly."""


def _lower_priority() -> None:
    """Hashing threads yield the CPU to the event loop (Linux: nice is per thread)."""
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)


class HashingPool:
    """Password hashing off the event loop: ``workers`` threads and at most ``queue`` waiting
    requests; ``admit`` refuses at once (``Busy``) when all slots are taken."""

    def __init__(self, workers: int = 2, queue: int = 8) -> None:
        self.configure(workers, queue)

    def configure(self, workers: int, queue: int) -> None:
        self.workers, self.slots, self.in_use = workers, workers + queue, 0
        self._executor = ThreadPoolExecutor(
            workers, thread_name_prefix="argon2", initializer=_lower_priority
        )

    @contextlib.contextmanager
    def admit(self) -> Iterator[None]:
        if self.in_use >= self.slots:
            raise Busy(Busy.__doc__)
        self.in_use += 1
        try:
            yield
        finally:
            self.in_use -= 1

    async def run(self, fn: Callable[..., _T], *args: Any) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)


HASHING = HashingPool()


class PrincipalKind(StrEnum):
    USER = "user"  # signed in: a session token
    API_KEY = "api-key"


@dataclass(frozen=True)
class Principal:
    """Who is calling: a user (by session) or an API key."""

    name: str
    role: str
    kind: PrincipalKind

    @property
    def is_admin(self) -> bool:
        return self.role == roles.ADMINISTRATOR


class SignInError(Exception):
    """A sign-in that did not succeed: 401 wrong credentials, 429 rate limited, 503 busy."""

    def __init__(self, status: int, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


def token_hash(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def new_token() -> str:
    return secrets.token_urlsafe(32)


async def hash_password(password: str) -> str:
    """Argon2id off the event loop (administrative paths wait for a thread; sign-in is admitted
    through ``HASHING.admit`` first)."""
    return await HASHING.run(_hasher.hash, password)


def _verify(password_hash: str | None, password: str) -> bool:
    """Checks a password; for an unknown user hashes anyway, so both cost the same."""
    if password_hash is None:
        _hasher.hash(password)
        return False
    try:
        return _hasher.verify(password_hash, password)
    except argon2.exceptions.VerificationError:
        return False
    except argon2.exceptions.InvalidHashError:
        log.warning("a stored password hash is not an Argon2 hash; sign-in refused")
        return False


def user_context(username: str, field: str) -> str:
    return f"users/{username}/{field}"


async def create_user(
    conn: AsyncConnection,
    keyring: Keyring,
    username: str,
    password_hash: str,
    role: str,
    full_name: str | None = None,
    email: str | None = None,
) -> int:
    """Inserts a user whose password was hashed beforehand (``hash_password``), so that no
    transaction stays open while Argon2 runs."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    row = (
        await conn.execute(
            Q.insert_user,
            {
                "username": username,
                "password_hash": password_hash,
                "role": role,
                "full_name": keyring.encrypt(full_name, user_context(username, "full_name"))
                if full_name
                else None,
                "email": keyring.encrypt(email, user_context(username, "email")) if email else None,
                "key_version": keyring.active,
            },
        )
    ).one()
    return int(row.id)


async def bootstrap(
    conn: AsyncConnection,
    keyring: Keyring,
    admin_username: str,
    admin_password: str | None,
    api_key: str | None,
) -> list[str]:
    """Creates the first administrator (when no user exists) and registers the bootstrap API key
    (when no key with its hash exists). Returns what was created, for the log."""
    created = []
    if admin_password and (await conn.execute(Q.count_users)).one().n == 0:
        if len(admin_password) < 12:
            raise ValueError("the first administrator's password must be at least 12 characters")
        await create_user(
            conn, keyring, admin_username, await hash_password(admin_password), "administrator"
        )
        created.append(f"administrator {admin_username!r}")
    if api_key:
        # Registered on every start when missing (a re-created operator brings a new key); the
        # name carries a fingerprint so that several bootstrap keys can coexist.
        digest = token_hash(api_key)
        row = (
            await conn.execute(
                Q.insert_api_key,
                {
                    "name": f"bootstrap-{digest.hex()[:8]}",
                    "key_hash": digest,
                    "role": "administrator",
                },
            )
        ).first()
        if row is not None:
            created.append(f"bootstrap API key bootstrap-{digest.hex()[:8]}")
    return created


async def authenticate(engine: AsyncEngine, bearer: str) -> Principal | None:
    h = token_hash(bearer)
    async with engine.begin() as conn:
        row = (await conn.execute(Q.session_user, {"token_hash": h})).first()
        if row is not None:
            return Principal(row.username, row.role, PrincipalKind.USER)
        row = (await conn.execute(Q.api_key_user, {"key_hash": h})).first()
        if row is not None:
            return Principal(f"api-key:{row.name}", row.role, PrincipalKind.API_KEY)
    return None


async def sign_in(
    engine: AsyncEngine, username: str, password: str, source: str, node: str
) -> tuple[str, Any]:
    """Returns (session token, expiry); raises SignInError (busy, rate limited, or wrong)."""
    try:
        with HASHING.admit():
            return await _sign_in(engine, username, password, source, node)
    except Busy:
        raise SignInError(503, "too many sign-ins in progress; retry shortly", 1.0) from None


async def _sign_in(
    engine: AsyncEngine, username: str, password: str, source: str, node: str
) -> tuple[str, Any]:
    async with engine.begin() as conn:
        # one order for every caller, so two attempts never wait on each other's second lock
        for key in sorted({_lock_key("user", username), _lock_key("source", source)}):
            await conn.execute(Q.advisory_xact_lock, {"key": key})
        slot = (
            await conn.execute(
                Q.reserve_sign_in_attempt,
                {
                    "username": username,
                    "source": source,
                    "window": FAILURE_WINDOW_SECONDS,
                    "max_failures": MAX_FAILURES,
                },
            )
        ).one()
        if slot.id is None:
            raise SignInError(
                429, "too many failed sign-ins; try again later", float(slot.retry_after or 1)
            )
        user = (await conn.execute(Q.user_by_name, {"username": username})).first()
    # The reserved slot counts as a failure from here on: it is released only on success.
    stored_hash = user.password_hash if user is not None and not user.disabled else None
    ok = await HASHING.run(_verify, stored_hash, password)
    if not ok or user is None:
        raise SignInError(401, "wrong username or password")
    new_hash = (
        await HASHING.run(_hasher.hash, password)
        if _hasher.check_needs_rehash(user.password_hash)
        else None
    )
    async with engine.begin() as conn:
        if new_hash is not None:
            await conn.execute(Q.set_password_hash, {"id": user.id, "password_hash": new_hash})
        await conn.execute(Q.clear_sign_in_failures, {"username": username})
        token = new_token()
        row = (
            await conn.execute(
                Q.insert_session,
                {
                    "token_hash": token_hash(token),
                    "user_id": user.id,
                    "node": node,
                    "ttl": SESSION_TTL_SECONDS,
                },
            )
        ).one()
        await audit(conn, username, node, "sign-in", None, {}, source)
    return token, row.expires_at


def _lock_key(kind: str, value: str) -> int:
    """A signed 64-bit advisory-lock key for one user name or source address."""
    digest = hashlib.sha256(f"{SIGN_IN_LOCK_SPACE}:{kind}:{value}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


async def sign_out(engine: AsyncEngine, token: str) -> bool:
    async with engine.begin() as conn:
        return (
            await conn.execute(Q.delete_session, {"token_hash": token_hash(token)})
        ).first() is not None


async def audit(
    conn: AsyncConnection,
    actor: str,
    node: str,
    action: str,
    target: str | None,
    detail: dict[str, Any],
    source: str | None,
) -> None:
    await conn.execute(
        Q.audit,
        {
            "actor": actor,
            "node": node,
            "action": action,
            "target": target,
            "detail": json.dumps(detail),
            "source": source,
        },
    )


@dataclass(frozen=True)
class UserRecord:
    """A user; ``full_name`` and ``email`` are ciphertexts (``user_context`` binds them)."""

    id: int
    username: str
    role: str
    full_name: str | None
    email: str | None
    disabled: bool
    created_at: dt.datetime


@dataclass(frozen=True)
class AuditEntry:
    id: int
    at: dt.datetime
    actor: str
    node: str
    action: str
    target: str | None
    detail: dict[str, Any]
    source: str | None


async def list_users(engine: AsyncEngine) -> list[UserRecord]:
    async with engine.connect() as conn:
        return [
            UserRecord(
                int(r.id), r.username, r.role, r.full_name, r.email, r.disabled, r.created_at
            )
            for r in await conn.execute(Q.list_users)
        ]


async def list_audit(engine: AsyncEngine, limit: int) -> list[AuditEntry]:
    """The newest entries first."""
    async with engine.connect() as conn:
        return [
            AuditEntry(int(r.id), r.at, r.actor, r.node, r.action, r.target, r.detail, r.source)
            for r in await conn.execute(Q.list_audit, {"limit": limit})
        ]
