"""The node's HTTPS application (aiohttp).

Every error a client can cause is a 4xx with a JSON body ``{"error": "..."}`` naming the problem;
a 5xx means the node or its database is at fault (503 while the database is unreachable).
Authentication happens in exactly one place, ``authenticate`` below.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import psycopg
import sqlalchemy.exc
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import Field, ValidationError

from dsm_node import metrics
from dsm_node.api import admin, paths
from dsm_node.api.common import (
    NODE_KEY,
    ClientError,
    Model,
    json_body,
    ready_node,
    validation_message,
)
from dsm_node.jobs.pool import NewJob
from dsm_node.jobs.registry import UnknownJobType

if TYPE_CHECKING:
    from dsm_node.node import Node

log = logging.getLogger("dsm.api")
PUBLIC = {
    ("GET", paths.HEALTHZ),
    ("GET", paths.READYZ),
    ("GET", paths.METRICS),
    ("POST", paths.API_SESSIONS),
}
MAX_BATCH = 10_000


class JobRequest(Model):
    type: str = Field(min_length=1, max_length=200)
    payload: dict[str, Any] = Field(default_factory=dict)
    priority: int | None = Field(None, ge=-32768, le=32767)
    run_at: dt.datetime | None = None
    delay_seconds: float = Field(0.0, ge=0, le=366 * 86400)
    max_attempts: int | None = Field(None, ge=1, le=1000)
    timeout_seconds: float | None = Field(None, gt=0, le=86400)
    unique_key: str | None = Field(None, min_length=1, max_length=500)

    def to_new_job(self) -> NewJob:
        if self.run_at is not None and self.run_at.tzinfo is None:
            raise ClientError(
                400, "runAt must include a time zone offset, e.g. 2026-01-01T00:00:00Z"
            )
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


# -- authentication: the one place --------------------------------------------------------


async def authenticate(request: web.Request) -> None:
    """Every request but health, readiness, metrics and sign-in passes through here: a session
    token or an API key in ``Authorization: Bearer``, checked against the shared database."""
    await request.app[NODE_KEY].authenticate_request(request)


@web.middleware
async def errors_and_auth(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        if (request.method, request.path) not in PUBLIC:
            await authenticate(request)
        return await handler(request)
    except ClientError as e:
        return _error(e.status, str(e))
    except web.HTTPException as e:
        if e.status >= 400:
            return _error(e.status, e.reason)
        raise
    except (
        OSError,
        psycopg.OperationalError,
        sqlalchemy.exc.OperationalError,
        sqlalchemy.exc.InterfaceError,
        TimeoutError,
    ) as e:
        log.warning("%s %s: database unavailable: %s", request.method, request.path, e)
        return _error(503, "database unavailable; retry shortly")


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


# -- handlers -----------------------------------------------------------------------------


async def healthz(request: web.Request) -> web.Response:
    node = request.app[NODE_KEY]
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
    node = ready_node(request)
    assert node.membership is not None
    threshold = node.cluster_settings.offline_threshold_seconds
    everything = request.query.get("all", "false").lower() in ("1", "true", "yes")
    return web.json_response({"nodes": await node.membership.list_nodes(threshold, everything)})


async def enqueue(request: web.Request) -> web.Response:
    node = ready_node(request)
    assert node.pool is not None
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
        jobs = [node.pool.validate(r.to_new_job()) for r in reqs]
    except UnknownJobType as e:
        known = ", ".join(sorted(node.pool.registry.types))
        raise ClientError(400, f"{e}; known types: {known}") from None
    except ValueError as e:
        raise ClientError(400, str(e)) from None
    result = await node.pool.enqueue(jobs)
    return web.json_response(
        {"ids": result.ids, "duplicates": result.duplicates},
        status=201 if result.ids else 200,
    )


async def get_job(request: web.Request) -> web.Response:
    node = ready_node(request)
    assert node.pool is not None
    raw = request.match_info["id"]
    if not raw.isdigit() or len(raw) > 18:
        raise ClientError(400, f"job id must be a positive integer, got {raw!r}")
    job = await node.pool.get(int(raw))
    if job is None:
        raise ClientError(404, f"no job with id {raw}")
    return web.json_response(job)


async def job_stats(request: web.Request) -> web.Response:
    node = ready_node(request)
    assert node.pool is not None
    raw = request.query.get("windowSeconds", "3600")
    try:
        window = float(raw)
    except ValueError:
        raise ClientError(400, f"windowSeconds must be a number, got {raw!r}") from None
    if not 0 < window <= 31 * 86400:
        raise ClientError(400, "windowSeconds must be between 0 and 2678400 (31 days)")
    rows = await node.pool.stats(window)
    by_node: dict[str, int] = {}
    by_type: dict[str, int] = {}
    for r in rows:
        by_node[r["node"]] = by_node.get(r["node"], 0) + r["count"]
        by_type[r["type"]] = by_type.get(r["type"], 0) + r["count"]
    return web.json_response(
        {"windowSeconds": window, "byNode": by_node, "byType": by_type, "byNodeAndType": rows}
    )


def build(node: Node) -> web.Application:
    app = web.Application(middlewares=[errors_and_auth], client_max_size=64 * 1024 * 1024)
    app[NODE_KEY] = node
    app.router.add_get(paths.HEALTHZ, healthz)
    app.router.add_get(paths.READYZ, readyz)
    app.router.add_get(paths.METRICS, metrics_endpoint)
    app.router.add_get(paths.API_NODES, list_nodes)
    app.router.add_post(paths.API_JOBS, enqueue)
    app.router.add_get(paths.API_JOB_STATS, job_stats)
    app.router.add_get(paths.API_JOB, get_job)
    admin.add_routes(app)
    return app
