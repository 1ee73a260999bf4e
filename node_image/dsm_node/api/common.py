"""Pieces shared by the API's handler modules: client errors, JSON bodies, request models."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic.alias_generators import to_camel

if TYPE_CHECKING:
    from dsm_node.auth import Principal
    from dsm_node.node import Node

NODE_KEY: web.AppKey[Node] = web.AppKey("node")


class ClientError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


async def json_body(request: web.Request) -> Any:
    if request.content_type not in ("application/json", "", "application/octet-stream"):
        raise ClientError(415, f"expected a JSON body, got content type {request.content_type!r}")
    raw = await request.read()
    if not raw:
        raise ClientError(400, "request body is empty; expected a JSON object")
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ClientError(400, f"request body is not valid JSON: {e}") from None


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
    p: Principal = request["principal"]
    return p


def require_admin(request: web.Request) -> Principal:
    p = principal(request)
    if not p.is_admin:
        raise ClientError(403, f"{p.name} is an {p.role}; this needs an administrator")
    return p


def ready_node(request: web.Request) -> Node:
    node = request.app[NODE_KEY]
    if node.pool is None or node.membership is None:
        raise ClientError(503, f"node is not ready yet ({node.phase})")
    return node


def source(request: web.Request) -> str:
    return request.remote or "unknown"
