"""Job types: the public way to add background work to the manager.

    from dsm_node.jobs.registry import job_type, JobContext

    @job_type("send_policy", max_attempts=10, timeout=120)
    async def send_policy(ctx: JobContext, payload: dict) -> None:
        ...

A *transactional* type gets ``ctx.conn``, a connection inside a transaction that also completes the
job, conditional on the job's fencing token: its database writes happen exactly once, even when a
node that was declared offline wakes up and finishes the same job late. A *local* type runs once on
every online node (cache clearing); it is pinned to its node and never taken over.

Every type names the least role allowed to enqueue it through the API (``required_role``;
``dsm_node.roles``): an administrator by default, so a new type is never open to auditors by
accident. Enqueues are checked and written to the audit log by the API.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ValidationError
from sqlalchemy.ext.asyncio import AsyncConnection

from dsm_node import roles
from dsm_node.services import JobServices

Payload = dict[str, Any]


@dataclass
class JobContext:
    """What a handler gets besides its payload."""

    job_id: int
    attempt: int
    node_name: str
    services: JobServices  # the node's caches, settings, master keys (dsm_node.services)
    conn: AsyncConnection | None = None  # only for transactional job types
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("dsm.jobs"))

    def transaction(self) -> AsyncConnection:
        """The connection of a transactional job type, inside the transaction that completes
        the job (a job type that is not transactional has none)."""
        if self.conn is None:
            raise TypeError("only a transactional job type has a transaction")
        return self.conn


Handler = Callable[[JobContext, Payload], Awaitable[None]]


@dataclass(frozen=True)
class JobType:
    name: str
    handler: Handler
    local: bool = False
    transactional: bool = False
    max_attempts: int = 5
    timeout: float = 300.0
    priority: int = 0
    payload_model: type[BaseModel] | None = None
    description: str = ""
    required_role: str = roles.ADMINISTRATOR

    def validate(self, payload: Any) -> Payload:
        """Checks a payload before it is stored; raises ValueError with a readable message."""
        if not isinstance(payload, dict):
            raise ValueError(f"payload of job type {self.name!r} must be a JSON object")
        if self.payload_model is None:
            return payload
        try:
            # strict JSON semantics: true is not a number, "5" is not 5, ISO strings are dates
            model = self.payload_model.model_validate_json(json.dumps(payload), strict=True)
            return model.model_dump(mode="json")
        except ValidationError as e:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'payload'}: {err['msg']}"
                for err in e.errors()
            )
            raise ValueError(f"invalid payload for job type {self.name!r}: {problems}") from None


@dataclass(frozen=True)
class Periodic:
    """A job enqueued once per ``every`` seconds across the whole cluster."""

    name: str
    job_type: str
    every: float
    payload: Payload = field(default_factory=dict)


class UnknownJobType(KeyError):
    def __str__(self) -> str:
        return f"unknown job type {self.args[0]!r}"


class Registry:
    def __init__(self) -> None:
        self.types: dict[str, JobType] = {}
        self.periodic: dict[str, Periodic] = {}

    def add(self, jt: JobType) -> JobType:
        if jt.name in self.types:
            raise ValueError(f"job type {jt.name!r} is registered twice")
        if jt.local and jt.transactional:
            raise ValueError("a local job type cannot be transactional")
        if jt.required_role not in roles.ROLES:
            raise ValueError(
                f"job type {jt.name!r}: required_role must be one of {', '.join(roles.ROLES)}"
            )
        self.types[jt.name] = jt
        return jt

    def get(self, name: str) -> JobType:
        try:
            return self.types[name]
        except KeyError:
            raise UnknownJobType(name) from None

    def every(self, p: Periodic) -> None:
        self.get(p.job_type)
        self.periodic[p.name] = p


REGISTRY = Registry()


def job_type(
    name: str,
    *,
    local: bool = False,
    transactional: bool = False,
    max_attempts: int = 5,
    timeout: float = 300.0,
    priority: int = 0,
    payload_model: type[BaseModel] | None = None,
    required_role: str = roles.ADMINISTRATOR,
    registry: Registry = REGISTRY,
) -> Callable[[Handler], Handler]:
    """Registers a handler as a job type (see the module docstring)."""

    def register(fn: Handler) -> Handler:
        registry.add(
            JobType(
                name,
                fn,
                local=local,
                transactional=transactional,
                max_attempts=max_attempts,
                timeout=timeout,
                priority=priority,
                payload_model=payload_model,
                required_role=required_role,
                description=(fn.__doc__ or "").strip().split("\n")[0],
            )
        )
        return fn

    return register
