"""The administration API for agents (on the API port, like every administrative route):
activation tokens, agents with their status and events, deactivation, agent alerts.

Agents themselves never talk to this port: their protocol is on the heartbeat port
(``dsm_node.agents.channel``). Statements are in ``dsm_node.agents.store``.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from pydantic import Field
from sqlalchemy.ext.asyncio import AsyncConnection

from dsm_node import roles
from dsm_node.agents import store as agent_store
from dsm_node.api import admin, inputs, views
from dsm_node.api.common import ClientError, Model, Route, json_body, parse, principal, ready

API_AGENTS = "/api/agents"
API_AGENT = "/api/agents/{id}"
API_AGENT_EVENTS = "/api/agents/{id}/events"
API_AGENT_DEACTIVATE = "/api/agents/{id}/deactivate"
API_AGENT_ALERTS = "/api/agents/alerts"
API_TOKENS = "/api/agents/tokens"
API_TOKEN = "/api/agents/tokens/{id}"
MAX_ID = 10**18 - 1


class NewToken(Model):
    max_uses: int = Field(1, ge=1, le=1_000_000)
    expires_in_seconds: float = Field(86400.0, ge=60, le=366 * 86400)
    description: str = Field("", max_length=500)


def _store(request: web.Request) -> agent_store.AgentStore:
    return agent_store.AgentStore(ready(request).engine)


def _id(request: web.Request, what: str) -> int:
    return inputs.ascii_integer(request.match_info["id"], what, 1, MAX_ID)


async def create_token(request: web.Request) -> web.Response:
    body = parse(NewToken, await json_body(request))
    inputs.clean_text(body.description, "description")
    store = _store(request)
    ca = await store.authority(ready(request).keys)

    async def record(conn: AsyncConnection, token_id: int) -> None:
        detail = {"maxUses": body.max_uses, "expiresInSeconds": body.expires_in_seconds}
        await admin.audit_in(conn, request, "create-activation-token", str(token_id), detail)

    token = await store.create_token(
        body.max_uses,
        body.expires_in_seconds,
        body.description,
        principal(request).name,
        also=record,
    )
    return web.json_response(
        {
            "id": token.id,
            "token": token.token,
            "caPin": ca.pin,
            "maxUses": body.max_uses,
            "expiresAt": token.expires_at.isoformat(),
        },
        status=201,
    )


async def list_tokens(request: web.Request) -> web.Response:
    limit = inputs.ascii_integer(request.query.get("limit", "100"), "limit", 1, 10_000)
    tokens = await _store(request).list_tokens(limit)
    return web.json_response({"tokens": [views.activation_token(t) for t in tokens]})


async def revoke_token(request: web.Request) -> web.Response:
    token_id = _id(request, "token id")

    async def record(conn: AsyncConnection) -> None:
        await admin.audit_in(conn, request, "revoke-activation-token", str(token_id))

    if not await _store(request).revoke_token(token_id, also=record):
        raise ClientError(404, f"no usable token {token_id} (unknown, or already revoked)")
    return web.json_response({"id": token_id, "revoked": True})


async def list_agents(request: web.Request) -> web.Response:
    word = request.query.get("status")
    try:
        status = agent_store.AgentStatus(word.lower()) if word is not None else None
    except ValueError:
        known = ", ".join(agent_store.AgentStatus)
        raise ClientError(400, f"status is one of {known}") from None
    limit = inputs.ascii_integer(request.query.get("limit", "1000"), "limit", 1, 100_000)
    store = _store(request)
    return web.json_response(
        {
            "counts": views.agent_counts(await store.status_counts()),
            "agents": [views.agent(a) for a in await store.list_agents(status, limit=limit)],
        }
    )


async def get_agent(request: web.Request) -> web.Response:
    agent_id = _id(request, "agent id")
    found = await _store(request).list_agents(agent_id=agent_id, limit=1)
    if not found:
        raise ClientError(404, f"no agent {agent_id}")
    return web.json_response(views.agent(found[0]))


async def agent_events(request: web.Request) -> web.Response:
    agent_id = _id(request, "agent id")
    after = inputs.ascii_integer(request.query.get("after", "0"), "after", 0, 2**63 - 1)
    limit = inputs.ascii_integer(request.query.get("limit", "100"), "limit", 1, 10_000)
    store = _store(request)
    if not await store.list_agents(agent_id=agent_id, limit=1):
        raise ClientError(404, f"no agent {agent_id}")
    events = await store.events(agent_id, after, limit)
    return web.json_response(
        {"agentId": agent_id, "events": [views.agent_event(e) for e in events]}
    )


async def deactivate(request: web.Request) -> web.Response:
    agent_id = _id(request, "agent id")

    async def record(conn: AsyncConnection) -> None:
        await admin.audit_in(conn, request, "deactivate-agent", str(agent_id))

    hostname = await _store(request).deactivate(agent_id, also=record)
    if hostname is None:
        raise ClientError(404, f"no active agent {agent_id} (unknown, or already deactivated)")
    return web.json_response(
        {
            "id": agent_id,
            "hostname": hostname,
            "status": views.agent_status(agent_store.AgentStatus.DEACTIVATED),
        }
    )


async def agent_alerts(request: web.Request) -> web.Response:
    everything = inputs.flag(request.query.get("all"), "all")
    limit = inputs.ascii_integer(request.query.get("limit", "1000"), "limit", 1, 100_000)
    alerts = await _store(request).alerts(everything, limit)
    return web.json_response({"alerts": [views.agent_alert(a) for a in alerts]})


def _routes() -> list[Route]:
    admin_, auditor = roles.ADMINISTRATOR, roles.AUDITOR
    return [
        # fixed paths before the ones with an id
        Route("GET", API_TOKENS, list_tokens, auditor),
        Route("POST", API_TOKENS, create_token, admin_, 4096),
        Route("DELETE", API_TOKEN, revoke_token, admin_),
        Route("GET", API_AGENT_ALERTS, agent_alerts, auditor),
        Route("GET", API_AGENTS, list_agents, auditor),
        Route("GET", API_AGENT, get_agent, auditor),
        Route("GET", API_AGENT_EVENTS, agent_events, auditor),
        Route("POST", API_AGENT_DEACTIVATE, deactivate, admin_),
    ]


ROUTES: list[Route] = _routes()
__all__: list[Any] = ["ROUTES"]
