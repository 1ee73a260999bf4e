"""Administration endpoints: sign-in, decommission, settings (plain and secret), master-key
rotation, users, the audit log, alerts, and the manager list agents connect to.

Administrative actions are written to the audit log with who, when, from where and on which node,
in the same transaction as the action itself wherever the action is a database write.
"""

from __future__ import annotations

import re
from typing import Any

import sqlalchemy.exc
from aiohttp import web
from pydantic import Field
from pydantic.alias_generators import to_camel
from sqlalchemy.ext.asyncio import AsyncConnection

from dsm_node import auth, roles, settings_store
from dsm_node.api import inputs, paths, views
from dsm_node.api.common import (
    KIB,
    ClientError,
    Model,
    Route,
    Services,
    json_body,
    parse,
    principal,
    ready,
    source,
)
from dsm_node.cluster.status import NodeStatus
from dsm_node.jobs.pool import EnqueueResult, NewJob

SECRET_KEY_PATTERN = re.compile(r"[a-z][a-z0-9_]{0,62}")
MAX_NODE_NAME = 253


class SignIn(Model):
    username: str = Field(min_length=1, max_length=200)
    password: str = Field(min_length=1, max_length=1000)


class NewUser(Model):
    username: str = Field(pattern=r"^[a-zA-Z0-9_.@-]{1,100}$")
    password: str = Field(min_length=12, max_length=1000)
    role: str = Field(pattern="^(administrator|auditor)$")
    full_name: str | None = Field(None, max_length=500)
    email: str | None = Field(None, max_length=500)


class SecretValue(Model):
    value: str = Field(max_length=65536)


# -- the audit log ------------------------------------------------------------------------


async def audit_in(
    conn: AsyncConnection,
    request: web.Request,
    action: str,
    target: str | None,
    detail: dict[str, Any] | None = None,
) -> None:
    """Records an action inside the caller's transaction (it commits with the action)."""
    await auth.audit(
        conn,
        principal(request).name,
        ready(request).node_name,
        action,
        target,
        detail or {},
        source(request),
    )


async def audit(
    request: web.Request, action: str, target: str | None, detail: dict[str, Any] | None = None
) -> None:
    """Records an action in a transaction of its own (refusals, actions outside the database)."""
    async with ready(request).engine.begin() as conn:
        await audit_in(conn, request, action, target, detail)


async def node_names(services: Services, ids: list[int | None]) -> dict[int, str]:
    """Node names by id (decommissioned nodes included)."""
    wanted = {i for i in ids if i is not None}
    if not wanted:
        return {}
    return {
        n.id: n.name
        for n in await services.membership.list_nodes(services.offline_threshold, True)
        if n.id in wanted
    }


# -- handlers -----------------------------------------------------------------------------


async def sign_in(request: web.Request) -> web.Response:
    services = ready(request)
    body = parse(SignIn, await json_body(request))
    try:
        token, expires = await auth.sign_in(
            services.engine, body.username, body.password, source(request), services.node_name
        )
    except auth.SignInError as e:
        headers = {}
        if e.retry_after is not None:
            headers["Retry-After"] = str(max(1, round(e.retry_after)))
        raise ClientError(e.status, str(e), headers) from None
    return web.json_response({"token": token, "expiresAt": expires.isoformat()}, status=201)


async def sign_out(request: web.Request) -> web.Response:
    services = ready(request)
    if principal(request).kind is not auth.PrincipalKind.USER:
        raise ClientError(400, "only a session can sign out; API keys are revoked instead")
    token = inputs.bearer_token(request.headers.get("Authorization"))
    assert token is not None  # the guard authenticated this very token
    await auth.sign_out(services.engine, token)
    return web.json_response({"signedOut": True})


async def decommission(request: web.Request) -> web.Response:
    services = ready(request)
    who = principal(request)
    name = request.match_info["name"]
    if not 1 <= len(name) <= MAX_NODE_NAME:
        raise ClientError(400, f"a node name has 1 to {MAX_NODE_NAME} characters")
    threshold = services.offline_threshold
    nodes = {n.name: n for n in await services.membership.list_nodes(threshold)}
    if name not in nodes:
        raise ClientError(404, f"no node named {name!r} (decommissioned nodes are not listed)")
    status = nodes[name].status
    if status is NodeStatus.ONLINE:
        raise ClientError(
            409,
            f"node {name!r} is Online: only an Offline node can be decommissioned; "
            "stop it first and wait until it shows Offline",
        )
    done = await services.membership.decommission(name, threshold, who.name)
    if done is None:
        raise ClientError(409, f"node {name!r} came back online; it was not decommissioned")
    await audit(request, "decommission-node", name, {"statusBefore": str(status)})
    return web.json_response({"name": name, "status": str(NodeStatus.DECOMMISSIONED)})


async def get_settings(request: web.Request) -> web.Response:
    services = ready(request)
    s = await settings_store.read(services.engine)
    secrets = await settings_store.secret_names(services.engine)
    return web.json_response({"settings": _camel(s.model_dump()), "secretSettings": secrets})


async def patch_settings(request: web.Request) -> web.Response:
    services = ready(request)
    body = await json_body(request)
    if not isinstance(body, dict) or not body:
        raise ClientError(400, "send a JSON object of settings to change")
    names = {to_camel(f): f for f in settings_store.ClusterSettings.model_fields}
    unknown = sorted(k for k in body if k not in names)
    if unknown:
        raise ClientError(
            400,
            f"unknown setting(s): {', '.join(map(repr, unknown))}; "
            f"known: {', '.join(sorted(names))}",
        )
    values = {names[k]: v for k, v in body.items()}
    try:
        async with services.engine.begin() as conn:
            await settings_store.write(conn, values)
            await audit_in(conn, request, "change-settings", None, {"changed": body})
    except settings_store.InvalidSettings as e:
        raise ClientError(400, str(e)) from None
    services.caches.clear_entry("settings")
    return await get_settings(request)


def _secret_key(request: web.Request) -> str:
    key = request.match_info["key"]
    if not SECRET_KEY_PATTERN.fullmatch(key):
        raise ClientError(400, f"secret setting names are lower_snake_case, got {key!r}")
    return key


async def put_secret(request: web.Request) -> web.Response:
    services = ready(request)
    key = _secret_key(request)
    body = parse(SecretValue, await json_body(request))
    ring = services.keys.keyring  # one version for the ciphertext and the row
    if ring.active is None:
        raise RuntimeError("no active master key")
    async with services.engine.begin() as conn:
        await settings_store.put_secret(
            conn, key, ring.encrypt(body.value, f"settings/{key}"), ring.active
        )
        await audit_in(conn, request, "change-secret-setting", key)
    return web.json_response({"key": key, "stored": True})


async def get_secret(request: web.Request) -> web.Response:
    services = ready(request)
    key = _secret_key(request)
    ciphertext = await settings_store.secret_ciphertext(services.engine, key)
    if ciphertext is None:
        raise ClientError(404, f"no secret setting {key!r}")
    value = await services.decrypt(ciphertext, f"settings/{key}")
    return web.json_response({"key": key, "value": value})


async def rotate_master_key(request: web.Request) -> web.Response:
    services = ready(request)

    async def record(conn: AsyncConnection, result: EnqueueResult) -> None:
        await audit_in(conn, request, "rotate-master-key", None, {"jobIds": result.ids})

    result = await services.pool.enqueue(
        [NewJob("rotate_master_key", {}, unique_key="rotate-master-key")], also=record
    )
    return web.json_response({"jobIds": result.ids, "alreadyRunning": not result.ids}, status=202)


async def list_users(request: web.Request) -> web.Response:
    services = ready(request)
    users = []
    for u in await auth.list_users(services.engine):
        full_name = (
            await services.decrypt(u.full_name, auth.user_context(u.username, "full_name"))
            if u.full_name
            else None
        )
        email = (
            await services.decrypt(u.email, auth.user_context(u.username, "email"))
            if u.email
            else None
        )
        users.append(views.user(u, full_name, email))
    return web.json_response({"users": users})


async def create_user(request: web.Request) -> web.Response:
    services = ready(request)
    body = parse(NewUser, await json_body(request))
    password_hash = await auth.hash_password(body.password)
    try:
        async with services.engine.begin() as conn:
            await auth.create_user(
                conn,
                services.keys.keyring,
                body.username,
                password_hash,
                body.role,
                body.full_name,
                body.email,
            )
            await audit_in(conn, request, "create-user", body.username, {"role": body.role})
    except sqlalchemy.exc.IntegrityError:
        raise ClientError(409, f"user {body.username!r} already exists") from None
    return web.json_response({"username": body.username, "role": body.role}, status=201)


async def list_audit(request: web.Request) -> web.Response:
    services = ready(request)
    limit = inputs.ascii_integer(request.query.get("limit", "100"), "limit", 1, 10_000)
    entries = await auth.list_audit(services.engine, limit)
    return web.json_response({"entries": [views.audit_entry(e) for e in entries]})


async def list_alerts(request: web.Request) -> web.Response:
    services = ready(request)
    everything = inputs.flag(request.query.get("all"), "all")
    alerts = await services.membership.list_alerts(everything)
    return web.json_response({"alerts": [views.alert(a) for a in alerts]})


async def agent_managers(request: web.Request) -> web.Response:
    """What agents are told: every online node's address (they pick one at random and try the
    next on failure), or the load balancer's addresses when the overrides are set."""
    services = ready(request)
    s = await settings_store.read(services.engine)
    if s.manager_address:
        return web.json_response(
            {
                "mode": "loadBalancer",
                "manager": {"address": s.manager_address, "port": s.manager_port or 443},
                "heartbeat": {
                    "address": s.heartbeat_address or s.manager_address,
                    "port": s.heartbeat_port or s.manager_port or 443,
                },
                "relay": {
                    "address": s.relay_address or s.manager_address,
                    "port": s.relay_port or s.manager_port or 443,
                },
            }
        )
    nodes = await services.membership.list_nodes(s.offline_threshold_seconds)
    return web.json_response(
        {
            "mode": "nodeList",
            "managers": [
                {"name": n.name, "address": n.address, "port": n.api_port}
                for n in nodes
                if n.status is NodeStatus.ONLINE
            ],
        }
    )


def _camel(d: dict[str, Any]) -> dict[str, Any]:
    return {to_camel(k): v for k, v in d.items()}


ADMIN, AUDITOR = roles.ADMINISTRATOR, roles.AUDITOR
ROUTES = [
    # sign-in is the one route that reads a body from anyone: keep it small
    Route("POST", paths.API_SESSIONS, sign_in, None, 4 * KIB),
    Route("DELETE", paths.API_SESSIONS, sign_out, AUDITOR),
    Route("POST", paths.API_DECOMMISSION, decommission, ADMIN),
    Route("GET", paths.API_SETTINGS, get_settings, AUDITOR),
    Route("PATCH", paths.API_SETTINGS, patch_settings, ADMIN, 16 * KIB),
    Route("GET", paths.API_SECRET_SETTING, get_secret, ADMIN),
    Route("PUT", paths.API_SECRET_SETTING, put_secret, ADMIN, 400 * KIB),
    Route("POST", paths.API_MASTER_KEY_ROTATE, rotate_master_key, ADMIN),
    Route("GET", paths.API_USERS, list_users, ADMIN),  # personal data
    Route("POST", paths.API_USERS, create_user, ADMIN, 16 * KIB),
    Route("GET", paths.API_AUDIT, list_audit, AUDITOR),  # what an auditor is for
    Route("GET", paths.API_ALERTS, list_alerts, AUDITOR),
    Route("GET", paths.API_AGENT_MANAGERS, agent_managers, AUDITOR),
]
