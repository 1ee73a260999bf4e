"""Sign-in on any node: users, sessions and API keys, all in the shared database.

Passwords are hashed with Argon2id (memory-hard). Session tokens and API keys are 256-bit random
values; only their SHA-256 is stored (a fast hash suffices for values nobody can guess, and keeps
every API request cheap). Failed sign-ins are counted in the database, so the limit holds across
all nodes. Personal data (full name, e-mail) is encrypted with the master key.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass
from typing import Any

import argon2
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from dsm_node.crypto import Keyring
from dsm_node.db.queries import Q

SESSION_TTL_SECONDS = 8 * 3600
MAX_FAILURES = 5
FAILURE_WINDOW_SECONDS = 300
ROLES = ("administrator", "auditor")

_hasher = argon2.PasswordHasher()  # Argon2id, 64 MiB, 3 passes: the library's recommendation


@dataclass(frozen=True)
class Principal:
    """Who is calling: a user (by session) or an API key."""

    name: str
    role: str
    kind: str  # "user" or "api-key"

    @property
    def is_admin(self) -> bool:
        return self.role == "administrator"


class SignInError(Exception):
    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def token_hash(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def new_token() -> str:
    return secrets.token_urlsafe(32)


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def user_context(username: str, field: str) -> str:
    return f"users/{username}/{field}"


async def create_user(
    conn: AsyncConnection,
    keyring: Keyring,
    username: str,
    password: str,
    role: str,
    full_name: str | None = None,
    email: str | None = None,
) -> int:
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    if len(password) < 12:
        raise ValueError("password must be at least 12 characters")
    row = (
        await conn.execute(
            Q.insert_user,
            {
                "username": username,
                "password_hash": hash_password(password),
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
        await create_user(conn, keyring, admin_username, admin_password, "administrator")
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
            return Principal(row.username, row.role, "user")
        row = (await conn.execute(Q.api_key_user, {"key_hash": h})).first()
        if row is not None:
            return Principal(f"api-key:{row.name}", row.role, "api-key")
    return None


async def sign_in(
    engine: AsyncEngine, username: str, password: str, source: str, node: str
) -> tuple[str, Any]:
    """Returns (session token, expiry); raises SignInError (rate limited or wrong credentials)."""
    async with engine.begin() as conn:
        recent = (
            await conn.execute(
                Q.recent_sign_in_failures,
                {"username": username, "source": source, "window": FAILURE_WINDOW_SECONDS},
            )
        ).one()
        if recent.n >= MAX_FAILURES:
            raise SignInError(
                "too many failed sign-ins; try again later", float(recent.retry_after or 1)
            )
        user = (await conn.execute(Q.user_by_name, {"username": username})).first()
    ok = False
    if user is not None and not user.disabled:
        try:
            ok = _hasher.verify(user.password_hash, password)
        except argon2.exceptions.VerificationError:
            ok = False
    else:
        _hasher.hash(password)  # same cost whether or not the user exists
    if not ok or user is None:
        async with engine.begin() as conn:  # committed before the error is raised
            await conn.execute(Q.record_sign_in_failure, {"username": username, "source": source})
        raise SignInError("wrong username or password")
    async with engine.begin() as conn:
        if _hasher.check_needs_rehash(user.password_hash):
            await conn.execute(
                Q.set_password_hash, {"id": user.id, "password_hash": hash_password(password)}
            )
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
