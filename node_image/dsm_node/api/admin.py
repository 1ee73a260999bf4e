"""Administration endpoints: sign-in, decommission, settings (plain and secret), master-key
rotation, users, the audit log, alerts, and the manager list agents connect to.

Administrative actions are written to the audit log with who, when, from where and on which node.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web
from pydantic import Field, ValidationError
from pydantic.alias_generators import to_snake

from dsm_node import auth, keys, settings_store
from dsm_node.api import paths
from dsm_node.api.common import (
    NODE_KEY,
    ClientError,
    Model,
    json_body,
    parse,
    principal,
    ready_node,
    require_admin,
    source,
    validation_message,
)
from dsm_node.db.queries import Q
from dsm_node.jobs.pool import NewJob

SECRET_KEY_PATTERN = r"^[a-z][a-z0-9_]{0,62}$"


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


async def sign_in(request: web.Request) -> web.Response:
    node = ready_node(request)
    body = parse(SignIn, await json_body(request))
    assert node.engine is not None
    try:
        token, expires = await auth.sign_in(
            node.engine, body.username, body.password, source(request), node.config.node_name
        )
    except auth.SignInError as e:
        if e.retry_after is not None:
            return web.json_response(
                {"error": str(e)},
                status=429,
                headers={"Retry-After": str(max(1, int(e.retry_after)))},
            )
        raise ClientError(401, str(e)) from None
    return web.json_response({"token": token, "expiresAt": expires.isoformat()}, status=201)


async def sign_out(request: web.Request) -> web.Response:
    node = ready_node(request)
    assert node.engine is not None
    token = request.headers.get("Authorization", "").partition(" ")[2].strip()
    if principal(request).kind != "user":
        raise ClientError(400, "only a session can sign out; API keys are revoked instead")
    await auth.sign_out(node.engine, token)
    return web.json_response({"signedOut": True})


async def _audit(
    request: web.Request, action: str, target: str | None, detail: dict[str, Any] | None = None
) -> None:
    node = request.app[NODE_KEY]
    assert node.engine is not None
    async with node.engine.begin() as conn:
        await auth.audit(
            conn,
            principal(request).name,
            node.config.node_name,
            action,
            target,
            detail or {},
            source(request),
        )


async def decommission(request: web.Request) -> web.Response:
    node = ready_node(request)
    who = require_admin(request)
    assert node.membership is not None
    name = request.match_info["name"]
    nodes = {
        n["name"]: n
        for n in await node.membership.list_nodes(node.cluster_settings.offline_threshold_seconds)
    }
    if name not in nodes:
        raise ClientError(404, f"no node named {name!r} (decommissioned nodes are not listed)")
    status = nodes[name]["status"]
    if status == "Online":
        raise ClientError(
            409,
            f"node {name!r} is Online: only an Offline node can be decommissioned; "
            "stop it first and wait until it shows Offline",
        )
    done = await node.membership.decommission(
        name, node.cluster_settings.offline_threshold_seconds, who.name
    )
    if done is None:
        raise ClientError(409, f"node {name!r} came back online; it was not decommissioned")
    await _audit(request, "decommission-node", name, {"statusBefore": status})
    return web.json_response({"name": name, "status": "Decommissioned"})


async def get_settings(request: web.Request) -> web.Response:
    node = ready_node(request)
    assert node.engine is not None
    s = await settings_store.read(node.engine)
    async with node.engine.connect() as conn:
        secrets = [r.key for r in await conn.execute(Q.secret_settings)]
    return web.json_response({"settings": _camel(s.model_dump()), "secretSettings": secrets})


async def patch_settings(request: web.Request) -> web.Response:
    node = ready_node(request)
    require_admin(request)
    body = await json_body(request)
    if not isinstance(body, dict) or not body:
        raise ClientError(400, "send a JSON object of settings to change")
    values = {to_snake(k): v for k, v in body.items()}
    unknown = sorted(
        k
        for k, v in zip(values, body, strict=True)
        if k not in settings_store.ClusterSettings.model_fields
    )
    if unknown:
        raise ClientError(400, f"unknown setting(s): {', '.join(unknown)}")
    assert node.engine is not None
    current = (await settings_store.read(node.engine)).model_dump()
    try:
        settings_store.ClusterSettings(**{**current, **values})
    except ValidationError as e:
        raise ClientError(400, validation_message(e)) from None
    merged = {**current, **values}
    if merged["offline_threshold_seconds"] <= 2 * merged["heartbeat_interval_seconds"]:
        raise ClientError(400, "offlineThresholdSeconds must exceed twice heartbeatIntervalSeconds")
    async with node.engine.begin() as conn:
        await settings_store.write(conn, values)
        await auth.audit(
            conn,
            principal(request).name,
            node.config.node_name,
            "change-settings",
            None,
            {"changed": body},
            source(request),
        )
    node.caches.clear_entry("settings")
    return await get_settings(request)


def _secret_key(request: web.Request) -> str:
    import re

    key = request.match_info["key"]
    if not re.match(SECRET_KEY_PATTERN, key):
        raise ClientError(400, f"secret setting names are lower_snake_case, got {key!r}")
    return key


async def put_secret(request: web.Request) -> web.Response:
    node = ready_node(request)
    require_admin(request)
    key = _secret_key(request)
    body = parse(SecretValue, await json_body(request))
    assert node.engine is not None
    async with node.engine.begin() as conn:
        await conn.execute(
            Q.put_secret_setting,
            {
                "key": key,
                "ciphertext": node.keyring.encrypt(body.value, f"settings/{key}"),
                "key_version": node.keyring.active,
            },
        )
        await auth.audit(
            conn,
            principal(request).name,
            node.config.node_name,
            "change-secret-setting",
            key,
            {},
            source(request),
        )
    return web.json_response({"key": key, "stored": True})


async def get_secret(request: web.Request) -> web.Response:
    node = ready_node(request)
    require_admin(request)
    key = _secret_key(request)
    assert node.engine is not None
    async with node.engine.connect() as conn:
        rows = {r.key: r.ciphertext for r in await conn.execute(Q.secret_settings)}
    if key not in rows:
        raise ClientError(404, f"no secret setting {key!r}")
    value = await node.decrypt(rows[key], f"settings/{key}")
    return web.json_response({"key": key, "value": value})


async def rotate_master_key(request: web.Request) -> web.Response:
    node = ready_node(request)
    require_admin(request)
    assert node.pool is not None
    result = await node.pool.enqueue(
        [NewJob("rotate_master_key", {}, unique_key="rotate-master-key")]
    )
    await _audit(request, "rotate-master-key", None, {"jobIds": result.ids})
    return web.json_response({"jobIds": result.ids, "alreadyRunning": not result.ids}, status=202)


async def list_users(request: web.Request) -> web.Response:
    node = ready_node(request)
    require_admin(request)
    assert node.engine is not None
    async with node.engine.connect() as conn:
        rows = (await conn.execute(Q.list_users)).all()
    users = []
    for r in rows:
        users.append(
            {
                "username": r.username,
                "role": r.role,
                "disabled": r.disabled,
                "fullName": await node.decrypt(
                    r.full_name, auth.user_context(r.username, "full_name")
                )
                if r.full_name
                else None,
                "email": await node.decrypt(r.email, auth.user_context(r.username, "email"))
                if r.email
                else None,
            }
        )
    return web.json_response({"users": users})


async def create_user(request: web.Request) -> web.Response:
    node = ready_node(request)
    require_admin(request)
    body = parse(NewUser, await json_body(request))
    assert node.engine is not None
    import sqlalchemy.exc

    try:
        async with node.engine.begin() as conn:
            await auth.create_user(
                conn,
                node.keyring,
                body.username,
                body.password,
                body.role,
                body.full_name,
                body.email,
            )
            await auth.audit(
                conn,
                principal(request).name,
                node.config.node_name,
                "create-user",
                body.username,
                {"role": body.role},
                source(request),
            )
    except sqlalchemy.exc.IntegrityError:
        raise ClientError(409, f"user {body.username!r} already exists") from None
    return web.json_response({"username": body.username, "role": body.role}, status=201)


async def list_audit(request: web.Request) -> web.Response:
    node = ready_node(request)
    require_admin(request)
    assert node.engine is not None
    raw = request.query.get("limit", "100")
    if not raw.isdigit() or not 1 <= int(raw) <= 10000:
        raise ClientError(400, "limit must be an integer between 1 and 10000")
    async with node.engine.connect() as conn:
        rows = (await conn.execute(Q.list_audit, {"limit": int(raw)})).all()
    return web.json_response(
        {
            "entries": [
                {
                    "id": r.id,
                    "at": r.at.isoformat(),
                    "actor": r.actor,
                    "node": r.node,
                    "action": r.action,
                    "target": r.target,
                    "detail": r.detail,
                    "source": r.source,
                }
                for r in rows
            ]
        }
    )


async def list_alerts(request: web.Request) -> web.Response:
    node = ready_node(request)
    assert node.engine is not None
    everything = request.query.get("all", "false").lower() in ("1", "true", "yes")
    async with node.engine.connect() as conn:
        rows = (await conn.execute(Q.list_alerts, {"include_cleared": everything})).all()
    return web.json_response(
        {
            "alerts": [
                {
                    "id": r.id,
                    "type": r.type,
                    "node": r.node,
                    "message": r.message,
                    "raisedAt": r.raised_at.isoformat(),
                    "clearedAt": r.cleared_at.isoformat() if r.cleared_at else None,
                }
                for r in rows
            ]
        }
    )


async def agent_managers(request: web.Request) -> web.Response:
    """What agents are told: every online node's address (they pick one at random and try the
    next on failure), or the load balancer's addresses when the overrides are set."""
    node = ready_node(request)
    assert node.membership is not None
    s = await settings_store.read(node.engine) if node.engine else node.cluster_settings
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
    nodes = await node.membership.list_nodes(s.offline_threshold_seconds)
    return web.json_response(
        {
            "mode": "nodeList",
            "managers": [
                {"name": n["name"], "address": n["address"], "port": n["apiPort"]}
                for n in nodes
                if n["status"] == "Online"
            ],
        }
    )


def _camel(d: dict[str, Any]) -> dict[str, Any]:
    from pydantic.alias_generators import to_camel

    return {to_camel(k): v for k, v in d.items()}


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_post(paths.API_SESSIONS, sign_in)
    r.add_delete(paths.API_SESSIONS, sign_out)
    r.add_post(paths.API_DECOMMISSION, decommission)
    r.add_get(paths.API_SETTINGS, get_settings)
    r.add_patch(paths.API_SETTINGS, patch_settings)
    r.add_get(paths.API_SECRET_SETTING, get_secret)
    r.add_put(paths.API_SECRET_SETTING, put_secret)
    r.add_post(paths.API_MASTER_KEY_ROTATE, rotate_master_key)
    r.add_get(paths.API_USERS, list_users)
    r.add_post(paths.API_USERS, create_user)
    r.add_get(paths.API_AUDIT, list_audit)
    r.add_get(paths.API_ALERTS, list_alerts)
    r.add_get(paths.API_AGENT_MANAGERS, agent_managers)


__all__ = ["add_routes", "json", "keys"]
