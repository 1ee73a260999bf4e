"""The agents' gateway to the database: every agent statement goes through here (the SQL is in
``db/queries.sql``, section Agents).

The agent CA is created once, by whichever node needs it first, under a transaction-scoped
advisory lock (a second node waits, then finds it); its private key is stored encrypted under the
master key and decrypted into memory on every node that serves agents.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import secrets
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from dsm_node import keys
from dsm_node.agents import pki
from dsm_node.agents.protocol import Heartbeat, ProtocolError
from dsm_node.db.queries import Q

# Any constant works as long as every node uses the same ("dsm-agca" in ASCII).
CA_LOCK_KEY = 0x64736D2D61676361
TOKEN_PREFIX = "at1"


@dataclass(frozen=True)
class Pending:
    """A validated heartbeat waiting for its batch: who sent it (from the client certificate)."""

    agent_id: int
    serial: int
    heartbeat: Heartbeat


@dataclass(frozen=True)
class Accepted:
    acked: int


Outcome = Accepted | ProtocolError


@dataclass(frozen=True)
class BatchResult:
    outcomes: list[Outcome]
    events_stored: int


@dataclass(frozen=True)
class NewToken:
    id: int
    token: str
    expires_at: dt.datetime


class AgentStatus(StrEnum):
    """``agents.status``: activated (no heartbeat yet), online, offline (silent for the
    configured number of intervals; ``watching``), deactivated (its certificate revoked)."""

    ACTIVATED = "activated"
    ONLINE = "online"
    OFFLINE = "offline"
    DEACTIVATED = "deactivated"


class TokenState(StrEnum):
    USABLE = "usable"
    USED_UP = "used up"
    EXPIRED = "expired"
    REVOKED = "revoked"


@dataclass(frozen=True)
class TokenRecord:
    id: int
    description: str
    uses: int
    max_uses: int
    expires_at: dt.datetime
    created_at: dt.datetime
    created_by: str | None
    revoked_at: dt.datetime | None
    state: TokenState


@dataclass(frozen=True)
class AgentRecord:
    id: int
    hostname: str
    status: AgentStatus
    status_changed_at: dt.datetime
    activated_at: dt.datetime
    activated_on: str | None
    last_heartbeat: dt.datetime | None
    seconds_since_heartbeat: float | None  # by the database's clock
    last_node: str | None
    heartbeats: int
    acked_seq: int
    agent_status: str | None  # what the agent reports about itself
    status_message: str | None
    agent_version: str | None
    clock_skew_seconds: float | None
    config_fingerprint: str | None
    counters: Any
    cert_not_after: dt.datetime
    deactivated_at: dt.datetime | None


@dataclass(frozen=True)
class AgentEvent:
    seq: int
    type: str
    agent_time: dt.datetime  # the agent's clock
    data: Any
    received_at: dt.datetime
    node: str | None  # the node that stored it


@dataclass(frozen=True)
class AgentAlert:
    id: int
    type: str
    agent_id: int
    hostname: str
    message: str
    raised_at: dt.datetime
    cleared_at: dt.datetime | None


def token_hash(secret: str) -> bytes:
    """Tokens are 192 random bits: a plain SHA-256 suffices (no password to stretch)."""
    return hashlib.sha256(secret.encode()).digest()


def split_token(token: str) -> tuple[int, str] | None:
    parts = token.split(".")
    if len(parts) != 3 or parts[0] != TOKEN_PREFIX or not parts[1].isascii():
        return None
    if not parts[1].isdigit() or len(parts[1]) > 18 or not parts[2]:
        return None
    return int(parts[1]), parts[2]


class AgentStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    # -- the CA ----------------------------------------------------------------------------

    async def authority(self, master: keys.MasterKeys) -> pki.Authority:
        """The cluster's agent CA, created on first use under a lock. Its private key is stored
        under the master key (reloaded on this store's engine when a rotation added a version)."""
        async with self.engine.begin() as conn:
            row = (await conn.execute(Q.agent_ca)).first()
            if row is None:
                await conn.execute(Q.advisory_xact_lock, {"key": CA_LOCK_KEY})
                row = (await conn.execute(Q.agent_ca)).first()
            if row is None:
                ca = pki.new_authority()
                await conn.execute(
                    Q.insert_agent_ca,
                    {
                        "certificate": ca.certificate_pem,
                        "private_key": master.encrypt(
                            pki.key_pem(ca.key), keys.AGENT_CA_KEY_CONTEXT
                        ),
                        "key_version": master.active,
                    },
                )
                return ca
        key = await master.decrypt(self.engine, row.private_key, keys.AGENT_CA_KEY_CONTEXT)
        return pki.load_authority(row.certificate, key)

    # -- where agents connect ----------------------------------------------------------------

    async def set_heartbeat_port(self, node_id: int, port: int | None) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(Q.set_heartbeat_port, {"node_id": node_id, "port": port})

    async def online_heartbeat_addresses(self, threshold: float) -> list[tuple[str, int]]:
        async with self.engine.connect() as conn:
            rows = (await conn.execute(Q.agent_managers, {"threshold": threshold})).all()
        return [(r.address, int(r.heartbeat_port)) for r in rows]

    # -- activation tokens -----------------------------------------------------------------

    async def create_token(
        self, max_uses: int, expires_in: float, description: str, created_by: str, also: Any = None
    ) -> NewToken:
        secret = secrets.token_urlsafe(24)
        async with self.engine.begin() as conn:
            row = (
                await conn.execute(
                    Q.insert_activation_token,
                    {
                        "secret_hash": token_hash(secret),
                        "description": description,
                        "max_uses": max_uses,
                        "expires_in": expires_in,
                        "created_by": created_by,
                    },
                )
            ).one()
            if also is not None:
                await also(conn, int(row.id))
        return NewToken(int(row.id), f"{TOKEN_PREFIX}.{row.id}.{secret}", row.expires_at)

    async def list_tokens(self, limit: int) -> list[TokenRecord]:
        async with self.engine.connect() as conn:
            rows = (await conn.execute(Q.list_activation_tokens, {"limit": limit})).all()
        return [
            TokenRecord(
                int(r.id),
                r.description,
                int(r.uses),
                int(r.max_uses),
                r.expires_at,
                r.created_at,
                r.created_by,
                r.revoked_at,
                TokenState.REVOKED
                if r.revoked_at
                else TokenState.EXPIRED
                if r.expired
                else TokenState.USED_UP
                if r.uses >= r.max_uses
                else TokenState.USABLE,
            )
            for r in rows
        ]

    async def revoke_token(self, token_id: int, also: Any = None) -> bool:
        async with self.engine.begin() as conn:
            done = (await conn.execute(Q.revoke_activation_token, {"id": token_id})).first()
            if done is not None and also is not None:
                await also(conn)
        return done is not None

    # -- activation ------------------------------------------------------------------------

    async def activate(
        self, token: str, hostname: str, csr_pem: str, ca: pki.Authority, node_name: str
    ) -> tuple[int, str]:
        """Spends one use of the token and creates the agent with a certificate, in one
        transaction; returns (agent id, certificate PEM). Raises ProtocolError (403) naming why
        a token is refused, (400) for a bad CSR; nothing is stored then."""
        parsed = split_token(token)
        if parsed is None:
            raise ProtocolError(403, "invalid_token", "the activation token is not valid")
        token_id, secret = parsed
        try:
            public_key = pki.check_csr(csr_pem)
        except pki.BadRequest as e:
            raise ProtocolError(400, "invalid_csr", str(e)) from None
        async with self.engine.begin() as conn:
            used = (
                await conn.execute(
                    Q.use_activation_token, {"id": token_id, "secret_hash": token_hash(secret)}
                )
            ).first()
            if used is None:
                state = (await conn.execute(Q.activation_token_state, {"id": token_id})).first()
                raise _token_refusal(state, secret)
            agent_id = int((await conn.execute(Q.next_agent_id)).scalar_one())
            serial = pki.new_serial()
            cert = pki.agent_certificate(ca, agent_id, public_key, serial)
            await conn.execute(
                Q.insert_agent,
                {
                    "id": agent_id,
                    "hostname": hostname,
                    "cert_serial": serial,
                    "cert_not_after": cert.not_valid_after_utc,
                    "token_id": token_id,
                    "activated_on": node_name,
                },
            )
        return agent_id, pki.pem(cert)

    # -- heartbeats ------------------------------------------------------------------------

    async def record(self, batch: list[Pending], node_id: int) -> BatchResult:
        """Records a batch of heartbeats (one per agent) and their events in one transaction;
        one outcome per heartbeat, in order."""
        ids, serials, firsts, lasts = [], [], [], []
        statuses, messages, versions, counters, clocks, prints = [], [], [], [], [], []
        e_agents, e_seqs, e_types, e_ats, e_datas = [], [], [], [], []
        for p in batch:
            hb = p.heartbeat
            ids.append(p.agent_id)
            serials.append(p.serial)
            firsts.append(hb.events[0].seq if hb.events else None)
            lasts.append(hb.events[-1].seq if hb.events else None)
            statuses.append(hb.status)
            messages.append(hb.status_message)
            versions.append(hb.version)
            counters.append(json.dumps(hb.counters, separators=(",", ":")))
            clocks.append(hb.clock)
            prints.append(hb.config_fingerprint)
            for e in hb.events:
                e_agents.append(p.agent_id)
                e_seqs.append(e.seq)
                e_types.append(e.type)
                e_ats.append(e.at)
                e_datas.append(json.dumps(e.data, separators=(",", ":")))
        async with self.engine.begin() as conn:
            rows = (
                await conn.execute(
                    Q.record_heartbeats,
                    {
                        "ids": ids,
                        "serials": serials,
                        "first_seqs": firsts,
                        "last_seqs": lasts,
                        "statuses": statuses,
                        "messages": messages,
                        "versions": versions,
                        "counters": counters,
                        "clocks": clocks,
                        "fingerprints": prints,
                        "node_id": node_id,
                        "e_agents": e_agents,
                        "e_seqs": e_seqs,
                        "e_types": e_types,
                        "e_ats": e_ats,
                        "e_datas": e_datas,
                    },
                )
            ).all()
            acked = {int(r.id): int(r.acked_seq) for r in rows}
            stored = int(rows[0].stored) if rows else 0
            refused = [i for i in ids if i not in acked]
            why: dict[int, Any] = {}
            if refused:
                for r in (await conn.execute(Q.heartbeat_refusals, {"ids": refused})).all():
                    why[int(r.id)] = r
        outcomes: list[Outcome] = []
        for p in batch:
            if p.agent_id in acked:
                outcomes.append(Accepted(acked[p.agent_id]))
            else:
                outcomes.append(_heartbeat_refusal(p, why.get(p.agent_id)))
        return BatchResult(outcomes, stored)

    # -- reading and deactivating ----------------------------------------------------------

    async def list_agents(
        self, status: AgentStatus | None = None, agent_id: int | None = None, limit: int = 1000
    ) -> list[AgentRecord]:
        async with self.engine.connect() as conn:
            rows = (
                await conn.execute(
                    Q.list_agents,
                    {
                        "status": str(status) if status is not None else None,
                        "agent_id": agent_id,
                        "limit": limit,
                    },
                )
            ).all()
        return [_agent(r) for r in rows]

    async def status_counts(self) -> dict[AgentStatus, int]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(Q.agent_status_counts)
            return {AgentStatus(r.status): int(r.n) for r in rows}

    async def events(self, agent_id: int, after: int, limit: int) -> list[AgentEvent]:
        async with self.engine.connect() as conn:
            rows = (
                await conn.execute(
                    Q.agent_events, {"agent_id": agent_id, "after": after, "limit": limit}
                )
            ).all()
        return [
            AgentEvent(
                int(r.seq),
                r.type,
                dt.datetime.fromtimestamp(r.agent_time, dt.UTC),
                r.data,
                r.received_at,
                r.node,
            )
            for r in rows
        ]

    async def deactivate(self, agent_id: int, also: Any = None) -> str | None:
        """Revokes the agent's certificate everywhere; its hostname, or None when there is no
        such active agent."""
        async with self.engine.begin() as conn:
            row = (await conn.execute(Q.deactivate_agent, {"id": agent_id})).first()
            if row is not None and also is not None:
                await also(conn)
        return str(row.hostname) if row is not None else None

    async def alerts(self, include_cleared: bool, limit: int) -> list[AgentAlert]:
        async with self.engine.connect() as conn:
            rows = (
                await conn.execute(
                    Q.list_agent_alerts, {"include_cleared": include_cleared, "limit": limit}
                )
            ).all()
        return [
            AgentAlert(
                int(r.id), r.type, int(r.agent_id), r.hostname, r.message, r.raised_at, r.cleared_at
            )
            for r in rows
        ]


def _token_refusal(state: Any, secret: str) -> ProtocolError:
    if state is None or not secrets.compare_digest(bytes(state.secret_hash), token_hash(secret)):
        return ProtocolError(403, "invalid_token", "the activation token is not valid")
    if state.revoked:
        return ProtocolError(403, "token_revoked", "the activation token was revoked")
    if state.expired:
        return ProtocolError(403, "token_expired", "the activation token has expired")
    return ProtocolError(
        403,
        "token_used_up",
        f"the activation token was used {state.uses} of {state.max_uses} times",
    )


def _heartbeat_refusal(p: Pending, row: Any) -> ProtocolError:
    if row is None:
        return ProtocolError(403, "unknown_agent", f"no agent {p.agent_id}: activate again")
    if row.status == AgentStatus.DEACTIVATED or int(row.cert_serial) != p.serial:
        return ProtocolError(
            403, "deactivated", f"agent {p.agent_id} was deactivated: its certificate is revoked"
        )
    expected = int(row.acked_seq) + 1
    return ProtocolError(
        409,
        "sequence_gap",
        f"events must continue at sequence {expected}, got {p.heartbeat.events[0].seq}",
        expectedSequence=expected,
    )


def _agent(r: Any) -> AgentRecord:
    return AgentRecord(
        id=int(r.id),
        hostname=r.hostname,
        status=AgentStatus(r.status),
        status_changed_at=r.status_changed_at,
        activated_at=r.activated_at,
        activated_on=r.activated_on,
        last_heartbeat=r.last_heartbeat,
        seconds_since_heartbeat=round((r.db_now - r.last_heartbeat).total_seconds(), 3)
        if r.last_heartbeat
        else None,
        last_node=r.last_node,
        heartbeats=int(r.heartbeats),
        acked_seq=int(r.acked_seq),
        agent_status=r.agent_status,
        status_message=r.status_message,
        agent_version=r.agent_version,
        clock_skew_seconds=r.clock_skew_seconds,
        config_fingerprint=r.config_fingerprint,
        counters=r.counters,
        cert_not_after=r.cert_not_after,
        deactivated_at=r.deactivated_at,
    )
