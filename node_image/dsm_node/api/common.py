"""Pieces shared by the API's handler modules: the route table's entries, client errors, request
models, and reading a JSON body under the route's limits."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic.alias_generators import to_camel
from sqlalchemy.ext.asyncio import AsyncEngine

from dsm_node.api import inputs
from dsm_node.api.errors import ClientError as ClientError
from dsm_node.auth import Principal
from dsm_node.caches import Caches
from dsm_node.cluster.membership import Membership
from dsm_node.jobs.pool import JobPool
from dsm_node.keys import MasterKeys
from dsm_node.services import NodeState, SettingsView, Shared

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

KIB = 1024


@dataclass(frozen=True)
class Route:
    """One route and its policy: the least role it needs (None: no credentials at all), the
    largest request body it reads (0: it reads none), and its surface: ``"api"`` (JSON,
    ``Authorization: Bearer``) or ``"console"`` (HTML pages, a session cookie, CSRF-checked
    forms; ``dsm_node.console.guarding``)."""

    method: str
    path: str
    handler: Handler
    role: str | None
    max_body: int = 0
    surface: str = "api"


@dataclass(frozen=True)
class Limits:
    """How long a client may take to send a request body (headers: see ``api.listeners``)."""

    body_timeout_seconds: float = 30.0


@dataclass(frozen=True)
class Gateways:
    """The API's own gateways to the shared database. They live on the API's event loop, in its
    own thread (``api.serving``), never on the node's: no amount of request handling can delay
    the node's heartbeat or its job pool."""

    engine: AsyncEngine
    pool: JobPool
    membership: Membership


@dataclass(frozen=True)
class Services:
    """What a handler works with once the node has joined (``ready``): the API's gateways and
    what the node shares (``services.Shared``). Nothing here is ever None."""

    node_name: str
    version: str
    engine: AsyncEngine
    pool: JobPool
    membership: Membership
    settings: SettingsView
    keys: MasterKeys
    caches: Caches

    @classmethod
    def of(cls, gateways: Gateways, shared: Shared) -> Services:
        return cls(
            shared.node_name,
            shared.version,
            gateways.engine,
            gateways.pool,
            gateways.membership,
            shared.settings,
            shared.keys,
            shared.caches,
        )

    @property
    def offline_threshold(self) -> float:
        return self.settings.current().offline_threshold_seconds

    async def decrypt(self, token: str, context: str) -> str:
        """Decrypts with the node's master keys, reloading them (on the API's engine) when a
        rotation on any node added a version this node has not seen yet."""
        return await self.keys.decrypt(self.engine, token, context)


NODE_KEY: web.AppKey[NodeState] = web.AppKey("node")
GATEWAYS_KEY: web.AppKey[Gateways] = web.AppKey("gateways")
LIMITS_KEY: web.AppKey[Limits] = web.AppKey("limits")
ROUTE_KEY = "dsm.route"
PRINCIPAL_KEY = "dsm.principal"


class Model(BaseModel):
    """Request bodies: camelCase names, unknown fields refused, and strict types (``true`` is not
    a number, ``"7"`` is not an integer)."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", strict=True
    )


async def json_body(request: web.Request) -> Any:
    """The request's JSON body, read under its route's size limit and the body timeout."""
    if request.content_type not in ("application/json", "", "application/octet-stream"):
        raise ClientError(415, f"expected a JSON body, got content type {request.content_type!r}")
    if request.charset is not None and request.charset.lower() not in ("utf-8", "utf8"):
        raise ClientError(415, f"JSON bodies are UTF-8, got charset {request.charset!r}")
    route: Route = request[ROUTE_KEY]
    limits = request.app[LIMITS_KEY]
    raw = await inputs.read_body(request, route.max_body, limits.body_timeout_seconds)
    return inputs.parse_json(raw)


def validation_message(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        where = ".".join(str(p) for p in err["loc"]) or "body"
        parts.append(f"{where}: {err['msg']}")
    return "invalid request: " + "; ".join(parts)


_M = TypeVar("_M", bound=Model)


def parse(model: type[_M], body: Any) -> _M:
    if not isinstance(body, dict):
        raise ClientError(400, "request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise ClientError(400, validation_message(e)) from None


def principal(request: web.Request) -> Principal:
    p: Principal = request[PRINCIPAL_KEY]
    return p


def ready(request: web.Request) -> Services:
    """What handlers work with, once the node has joined the cluster (503 before)."""
    node = request.app[NODE_KEY]
    shared = node.shared()
    if shared is None:
        raise ClientError(503, f"node is not ready yet ({node.phase})", {"Retry-After": "5"})
    return Services.of(request.app[GATEWAYS_KEY], shared)


def source(request: web.Request) -> str:
    return request.remote or "unknown"
