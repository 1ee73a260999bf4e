"""The master key in the database: bootstrap, unlock, rotation.

Rotation adds a new active version and marks the old one ``retiring``; the ``rotate_master_key``
job re-encrypts secret settings and personal data in small batches (each its own transaction, so
an interrupted rotation resumes where it stopped, and nodes keep working throughout: they can
decrypt with every version not yet retired). When nothing uses the old version, it is retired.
"""

from __future__ import annotations

import json
from enum import StrEnum

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from dsm_node import crypto
from dsm_node.auth import user_context
from dsm_node.db.queries import Q

BATCH = 500
AGENT_CA_KEY_CONTEXT = "agent-ca/private-key"


class KeyState(StrEnum):
    """``master_keys.state``: a rotation moves the active version to retiring, then retired."""

    ACTIVE = "active"  # encrypts; one at a time
    RETIRING = "retiring"  # still decrypts what is not re-encrypted yet
    RETIRED = "retired"  # nothing uses it any more (kept readable for slow nodes)


class MasterKeys:
    """The cluster's master keys as this node holds them: the keyring its data is encrypted and
    decrypted with, and the wrapper that unlocks new versions.

    One object per node, shared by the node's event loop and the API's thread: each passes its
    own engine when it must read the database (a rotation on any node adds key versions this
    node learns of by reloading). Replacing ``keyring`` is one assignment, safe across threads."""

    def __init__(self, wrapper: crypto.KeyWrapper, keyring: crypto.Keyring) -> None:
        self.wrapper = wrapper
        self.keyring = keyring

    async def reload(self, engine: AsyncEngine) -> None:
        """Picks up master-key versions added by a rotation on any node."""
        async with engine.connect() as conn:
            ring = await unlock(conn, self.wrapper)
        if ring is not None:
            self.keyring = ring

    async def decrypt(self, engine: AsyncEngine, token: str, context: str) -> str:
        """Decrypts, reloading the keys first when the token uses a version not seen yet."""
        if crypto.Keyring.version_of(token) not in self.keyring.keys:
            await self.reload(engine)
        return self.keyring.decrypt(token, context)

    def encrypt(self, plaintext: str, context: str) -> str:
        return self.keyring.encrypt(plaintext, context)

    @property
    def active(self) -> int | None:
        return self.keyring.active


async def has_key_table(conn: AsyncConnection) -> bool:
    return bool((await conn.execute(Q.table_exists, {"table": "master_keys"})).scalar())


async def unlock(conn: AsyncConnection, wrapper: crypto.KeyWrapper) -> crypto.Keyring | None:
    """Unwraps every usable master key; None when the cluster has none yet.
    Raises crypto.WrongSecret when this node's secret does not fit."""
    if not await has_key_table(conn):
        return None
    rows = (await conn.execute(Q.master_keys)).all()
    if not rows:
        return None
    ring = crypto.Keyring()
    for r in rows:
        if r.wrapping != wrapper.name:
            raise crypto.WrongSecret(
                f"master key version {r.version} is wrapped by {r.wrapping!r}, this node uses "
                f"{wrapper.name!r}"
            )
        key = wrapper.unwrap(bytes(r.wrapped_key), r.wrap_params)
        if crypto.check_value(key) != bytes(r.check_value):
            raise crypto.WrongSecret("master key check value does not match")
        ring.add(int(r.version), key, r.state == KeyState.ACTIVE)
    return ring


async def add_key(conn: AsyncConnection, wrapper: crypto.KeyWrapper, version: int) -> bytes:
    key = crypto.new_master_key()
    wrapped, params = wrapper.wrap(key)
    await conn.execute(
        Q.insert_master_key,
        {
            "version": version,
            "wrapped_key": wrapped,
            "wrapping": wrapper.name,
            "wrap_params": json.dumps(params),
            "check_value": crypto.check_value(key),
            "state": KeyState.ACTIVE.value,
        },
    )
    return key


async def bootstrap(conn: AsyncConnection, wrapper: crypto.KeyWrapper) -> crypto.Keyring:
    ring = crypto.Keyring()
    ring.add(1, await add_key(conn, wrapper, 1), active=True)
    return ring


async def begin_rotation(engine: AsyncEngine, wrapper: crypto.KeyWrapper) -> int:
    """Adds a new active key version (the old one starts retiring); returns the new version.
    Idempotent while a rotation is under way: returns the version being rotated to."""
    async with engine.begin() as conn:
        rows = (await conn.execute(Q.master_keys)).all()
        if any(r.state == KeyState.RETIRING for r in rows):
            return max(int(r.version) for r in rows)
        await conn.execute(
            Q.retire_master_keys,
            {"from_state": KeyState.ACTIVE.value, "to_state": KeyState.RETIRING.value},
        )
        version = max((int(r.version) for r in rows), default=0) + 1
        await add_key(conn, wrapper, version)
        return version


async def reencrypt_batch(engine: AsyncEngine, ring: crypto.Keyring) -> int:
    """Re-encrypts up to BATCH rows under the active key in one transaction; returns how many."""
    assert ring.active is not None
    done = 0
    async with engine.begin() as conn:
        for r in (
            await conn.execute(Q.secrets_to_reencrypt, {"version": ring.active, "batch": BATCH})
        ).all():
            context = f"settings/{r.key}"
            await conn.execute(
                Q.put_secret_setting,
                {
                    "key": r.key,
                    "ciphertext": ring.encrypt(ring.decrypt(r.ciphertext, context), context),
                    "key_version": ring.active,
                },
            )
            done += 1
        users = (
            await conn.execute(Q.users_to_reencrypt, {"version": ring.active, "batch": BATCH})
        ).all()
        for u in users:
            username = u.username
            fields = {}
            for f in ("full_name", "email"):
                value = getattr(u, f)
                ctx = user_context(username, f)
                fields[f] = ring.encrypt(ring.decrypt(value, ctx), ctx) if value else None
            await conn.execute(
                Q.update_user_personal_data, {"id": u.id, **fields, "key_version": ring.active}
            )
            done += 1
        # The agent CA's private key (dsm_node.agents.store) is under the master key too.
        for ca in (await conn.execute(Q.agent_ca_to_reencrypt, {"version": ring.active})).all():
            ctx = AGENT_CA_KEY_CONTEXT
            await conn.execute(
                Q.update_agent_ca_key,
                {
                    "private_key": ring.encrypt(ring.decrypt(ca.private_key, ctx), ctx),
                    "key_version": ring.active,
                },
            )
            done += 1
    return done


async def finish_rotation(engine: AsyncEngine, active: int) -> list[int] | None:
    """Retires the old versions once nothing is encrypted under them; None while something is
    (a node that had not yet loaded the new key may have written meanwhile)."""
    async with engine.begin() as conn:
        await conn.execute(Q.lock_encrypted_tables)
        if (await conn.execute(Q.rows_not_under_key, {"version": active})).scalar_one():
            return None
        rows = await conn.execute(
            Q.retire_master_keys,
            {"from_state": KeyState.RETIRING.value, "to_state": KeyState.RETIRED.value},
        )
        return [int(r.version) for r in rows]
