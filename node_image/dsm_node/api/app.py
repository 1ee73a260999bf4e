"""The node's HTTPS application (aiohttp).

Every error a client can cause is a 4xx with a JSON body ``{"error": "..."}`` naming the problem,
logged as one line; a 5xx means the node or its database is at fault (503 while the database is
unreachable). The route table (``ROUTES`` here and in ``admin``) is the policy: each route names the
least role it needs and the largest body it reads, and the one middleware, ``guard``, enforces
both before any handler runs. Authentication happens there and nowhere else.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
from collections import Counter
from typing import Any

import psycopg
import sqlalchemy.exc
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import Field, ValidationError, field_validator
from sqlalchemy.ext.asyncio import AsyncConnection

from dsm_node import auth, metrics, roles
from dsm_node.api import admin, inputs, listeners, paths, views
from dsm_node.api import agents as agent_routes
from dsm_node.api.common import (
    GATEWAYS_KEY,
    KIB,
    LIMITS_KEY,
    NODE_KEY,
    PRINCIPAL_KEY,
    ROUTE_KEY,
    ClientError,
    Gateways,
    Handler,
    Limits,
    Model,
    Route,
    json_body,
    principal,
    ready,
    source,
    validation_message,
)
from dsm_node.console import guarding as console_guarding
from dsm_node.console import pages as console_pages
from dsm_node.jobs.pool import EnqueueResult, NewJob
from dsm_node.jobs.registry import UnknownJobType
from dsm_node.services import NodeState

log = logging.getLogger("dsm.api")
MAX_BATCH = 10_000
MAX_PAYLOAD_BYTES = 64 * KIB  # one job's payload, serialized
MAX_JOBS_BODY = 8 * 1024 * KIB  # a batch: up to MAX_BATCH jobs with modest payloads
MALFORMED = (400, 408, 413, 415)  # statuses that mean "the request itself was malformed"


class JobRequest(Model):
    type: str = Field(min_length=1, max_length=200)
    payload: dict[str, Any] = Field(default_factory=dict)
    priority: int | None = Field(None, ge=-32768, le=32767)
    run_at: dt.datetime | None = Field(None, strict=False)
    delay_seconds: float = Field(0.0, ge=0, le=366 * 86400)
    max_attempts: int | None = Field(None, ge=1, le=1000)
    timeout_seconds: float | None = Field(None, gt=0, le=86400)
    unique_key: str | None = Field(None, min_length=1, max_length=500)

    @field_validator("run_at", mode="before")
    @classmethod
    def _run_at_is_text(cls, v: Any) -> Any:
        if v is not None and not isinstance(v, str):
            raise ValueError("must be an ISO 8601 date and time with an offset")
        return v

    @field_validator("payload")
    @classmethod
    def _payload_size(cls, v: dict[str, Any]) -> dict[str, Any]:
        if len(json.dumps(v, separators=(",", ":"))) > MAX_PAYLOAD_BYTES:
            raise ValueError(f"larger than {MAX_PAYLOAD_BYTES} bytes of JSON")
        return v

    def to_new_job(self) -> NewJob:
        if self.run_at is not None:
            if self.run_at.tzinfo is None:
                raise ClientError(
                    400, "runAt must include a time zone offset, e.g. 2026-01-01T00:00:00Z"
                )
            now = dt.datetime.now(dt.UTC)
            if not now - dt.timedelta(days=366) <= self.run_at <= now + dt.timedelta(days=366):
                raise ClientError(400, "runAt must be within a year of now")
        return NewJob(
            self.type,
            self.payload,
            self.priority,
            self.run_at,
            self.delay_seconds,
            self.max_attempts,
            self.timeout_seconds,
            self.unique_key,
        )


class JobBatchRequest(Model):
    jobs: list[JobRequest] = Field(min_length=1, max_length=MAX_BATCH)


# -- the guard: policy, authentication, errors ---------------------------------------------


@web.middleware
async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await _guarded(request, handler)
    finally:
        listeners.note_done(request)  # the connection may start its next request's deadline


async def _guarded(request: web.Request, handler: Handler) -> web.StreamResponse:
    route = _route_of(request)
    if console_guarding.serves(request, route):  # HTML pages: a session cookie, CSRF, Origin
        return await console_guarding.guarded(request, route, handler)
    try:
        _check_request_target(request)
        if route is None or route.role is not None:
            who = await authenticate(request)
            if (
                route is not None
                and route.role is not None
                and not roles.allows(who.role, route.role)
            ):
                raise ClientError(
                    403, f"{who.name} is {roles.article(who.role)}; this needs {route.role}"
                )
        if route is not None:
            request[ROUTE_KEY] = route
        return await handler(request)
    except ClientError as e:
        return _refuse(request, e.status, str(e), e.headers)
    except web.HTTPException as e:
        if e.status >= 400:
            return _refuse(request, e.status, e.reason, {})
        raise
    except (
        OSError,
        psycopg.OperationalError,
        sqlalchemy.exc.OperationalError,
        sqlalchemy.exc.InterfaceError,
        TimeoutError,
    ) as e:
        listeners.REFUSALS.log(
            logging.WARNING,
            "%s %s: database unavailable: %s",
            request.method,
            _printable(request),
            _one_line(str(e)),
        )
        return _error(503, "database unavailable; retry shortly", {"Retry-After": "2"})


async def authenticate(request: web.Request) -> auth.Principal:
    """A session token or an API key in ``Authorization: Bearer``, checked against the shared
    database; the principal is kept on the request for handlers and the audit log."""
    token = inputs.bearer_token(request.headers.get("Authorization"))
    if token is None:
        raise ClientError(
            401,
            "authentication required: send 'Authorization: Bearer <token>'"
            " with a session token or an API key",
            {"WWW-Authenticate": "Bearer"},
        )
    services = ready(request)
    who = await auth.authenticate(services.engine, token)
    if who is None:
        raise ClientError(
            401, "invalid or expired session token or API key", {"WWW-Authenticate": "Bearer"}
        )
    request[PRINCIPAL_KEY] = who
    return who


def _route_of(request: web.Request) -> Route | None:
    """The route table's entry for this request; None when no route matched (404, 405)."""
    table: dict[int, Route] = request.app[ROUTE_TABLE_KEY]
    return table.get(id(request.match_info.route))


def _check_request_target(request: web.Request) -> None:
    """NUL characters or undecodable bytes in the path or the query never reach a handler."""
    inputs.clean_text(request.path, "the request path")
    for key, value in request.query.items():
        inputs.clean_text(key, "a query parameter name")
        inputs.clean_text(value, f"query parameter {key!r}")


def _refuse(
    request: web.Request, status: int, message: str, headers: dict[str, str]
) -> web.Response:
    resp = _error(status, message, headers)
    # a body nobody read is drained for at most listeners.LINGERING_SECONDS, then the connection
    # is closed
    level = logging.INFO if status in MALFORMED else logging.DEBUG
    listeners.REFUSALS.log(
        level,
        "%s %s from %s: %d %s",
        request.method,
        _printable(request),
        source(request),
        status,
        _one_line(message),
    )
    return resp


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


def _one_line(text: str) -> str:
    return text[:500].encode("ascii", "backslashreplace").decode().replace("\n", "\\n")


def _printable(request: web.Request) -> str:
    """The request target as sent (undecoded), safe for a one-line log."""
    return request.raw_path[:200].encode("ascii", "backslashreplace").decode()


# -- handlers -----------------------------------------------------------------------------


NODE_LOOP_ANSWER_SECONDS = 2.0


async def _nothing() -> None:
    return None


async def healthz(request: web.Request) -> web.Response:
    """Alive means the node's own event loop answers (the API runs on another one): a node whose
    loop is stuck is not healthy, even though this thread can still say so."""
    node = request.app[NODE_KEY]
    node_loop = request.app.get(NODE_LOOP_KEY)
    if node_loop is not None:
        try:
            answer = asyncio.run_coroutine_threadsafe(_nothing(), node_loop)
            await asyncio.wait_for(asyncio.wrap_future(answer), NODE_LOOP_ANSWER_SECONDS)
        except (TimeoutError, RuntimeError):
            return web.json_response(
                {
                    "status": "stuck",
                    "phase": node.phase,
                    "degraded": [
                        f"the node's event loop did not answer within "
                        f"{NODE_LOOP_ANSWER_SECONDS:g} s"
                    ],
                },
                status=503,
            )
    degraded = node.degraded_reasons()
    return web.json_response(
        {"status": "degraded" if degraded else "ok", "phase": node.phase, "degraded": degraded}
    )


async def readyz(request: web.Request) -> web.Response:
    node = request.app[NODE_KEY]
    reasons = node.not_ready_reasons()
    return web.json_response(
        {"ready": not reasons, "reasons": reasons}, status=200 if not reasons else 503
    )


async def metrics_endpoint(request: web.Request) -> web.Response:
    body = generate_latest(metrics.REGISTRY)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def list_nodes(request: web.Request) -> web.Response:
    services = ready(request)
    everything = inputs.flag(request.query.get("all"), "all")
    nodes = await services.membership.list_nodes(services.offline_threshold, everything)
    return web.json_response({"nodes": [views.node(n) for n in nodes]})


async def enqueue(request: web.Request) -> web.Response:
    services = ready(request)
    pool = services.pool
    body = await json_body(request)
    if not isinstance(body, dict):
        raise ClientError(400, "request body must be a JSON object")
    try:
        reqs = (
            JobBatchRequest.model_validate(body).jobs
            if "jobs" in body
            else [JobRequest.model_validate(body)]
        )
    except ValidationError as e:
        raise ClientError(400, validation_message(e)) from None
    try:
        jobs = [pool.validate(r.to_new_job()) for r in reqs]
    except UnknownJobType as e:
        known = ", ".join(sorted(pool.registry.types))
        raise ClientError(400, f"{e}; known types: {known}") from None
    except ValueError as e:
        raise ClientError(400, str(e)) from None
    who = principal(request)
    types = Counter(j.type for j in jobs)
    refused = sorted(
        t for t in types if not roles.allows(who.role, pool.registry.get(t).required_role)
    )
    if refused:
        await admin.audit(request, "enqueue-refused", None, {"types": refused, "role": who.role})
        needs = {pool.registry.get(t).required_role for t in refused}
        raise ClientError(
            403,
            f"{who.name} is {roles.article(who.role)}; job type(s) {', '.join(refused)} "
            f"need {' or '.join(sorted(needs))}",
        )

    async def record(conn: AsyncConnection, result: EnqueueResult) -> None:
        await admin.audit_in(
            conn,
            request,
            "enqueue-jobs",
            None,
            {"types": dict(types), "ids": len(result.ids), "duplicates": result.duplicates},
        )

    result = await pool.enqueue(jobs, also=record)
    return web.json_response(
        {"ids": result.ids, "duplicates": result.duplicates},
        status=201 if result.ids else 200,
    )


async def get_job(request: web.Request) -> web.Response:
    services = ready(request)
    job_id = inputs.ascii_integer(
        request.match_info["id"], "job id", 1, 10**18 - 1, "a positive integer of up to 18 digits"
    )
    job = await services.pool.get(job_id)
    if job is None:
        raise ClientError(404, f"no job with id {job_id}")
    names = await admin.node_names(services, [job.node_id, job.target_node_id])
    return web.json_response(views.job(job, names))


async def job_stats(request: web.Request) -> web.Response:
    services = ready(request)
    window = inputs.ascii_decimal(
        request.query.get("windowSeconds", "3600"), "windowSeconds", 0, 31 * 86400
    )
    return web.json_response(views.job_stats(window, await services.pool.stats(window)))


ROUTES = [
    Route("GET", paths.HEALTHZ, healthz, None),
    Route("GET", paths.READYZ, readyz, None),
    Route("GET", paths.METRICS, metrics_endpoint, None),
    Route("GET", paths.API_NODES, list_nodes, roles.AUDITOR),
    # who may enqueue which job type is the job type's own required role (jobs.registry)
    Route("POST", paths.API_JOBS, enqueue, roles.AUDITOR, MAX_JOBS_BODY),
    Route("GET", paths.API_JOB_STATS, job_stats, roles.AUDITOR),
    Route("GET", paths.API_JOB, get_job, roles.AUDITOR),
    *admin.ROUTES,
    *agent_routes.ROUTES,  # agents (issue 11): tokens, agents, events, deactivation
    *console_pages.ROUTES,
]
ROUTE_TABLE_KEY: web.AppKey[dict[int, Route]] = web.AppKey("routes")
NODE_LOOP_KEY: web.AppKey[asyncio.AbstractEventLoop] = web.AppKey("node-loop")


def build(
    node: NodeState,
    gateways: Gateways,
    limits: Limits | None = None,
    node_loop: asyncio.AbstractEventLoop | None = None,
) -> web.Application:
    app = web.Application(
        middlewares=[guard], client_max_size=max(r.max_body for r in ROUTES) or 1024
    )
    app[NODE_KEY] = node
    app[GATEWAYS_KEY] = gateways
    if node_loop is not None:
        app[NODE_LOOP_KEY] = node_loop
    app[LIMITS_KEY] = limits or Limits()
    table: dict[int, Route] = {}
    for r in ROUTES:
        table[id(app.router.add_route(r.method, r.path, r.handler))] = r
    app[ROUTE_TABLE_KEY] = table
    return app
