"""Cluster-wide settings stored in the database and read by every node (cached between reads).

Every setting has bounds, and some pairs have rules, because a bad value breaks the whole cluster
at once (an offline threshold of 1e308 made every heartbeat fail; an interval of a microsecond
made every node commit thousands of times a second). Decisions:

- ``heartbeatIntervalSeconds``: 0.5 s to 10 minutes. Below half a second a node spends its time
  committing heartbeats; ten minutes is the original product's agent heartbeat.
- ``offlineThresholdSeconds``: at least 3 heartbeat intervals (a node stops claiming after two
  thirds of the threshold without a heartbeat, so the threshold must leave room for two missed
  beats before that), at most one day.
- Retention: finished jobs at least a minute, per-minute counts at least an hour (the last-hour
  views read them), both at most ten years.
- Load-balancer overrides: addresses are host names (RFC 1123, ASCII) or IP addresses, ports are
  integers 1-65535; the heartbeat and relay overrides and every port need ``managerAddress``
  (without it agents get the node list and the others would be silently ignored).
- Agents: heartbeat interval 1 s to a day (10 minutes by default, as in the original product),
  0-1000 missed heartbeats before Offline (0: never), clock-skew limit 1 s to 30 days, events
  kept 1 hour to 10 years.
- Types are strict: ``true`` is not a number and ``"0.5"`` is not 0.5.

Changes are validated against the stored values under a lock, in the transaction that writes them,
so two administrators changing the interval and the threshold at the same moment cannot together
store a pair that breaks the rule. A stored value that breaks these rules (written by hand, or by
an older version) is ignored with one warning and its default used, so a node never stops
because of one.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    model_validator,
)
from pydantic.alias_generators import to_camel
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from dsm_node.db.queries import Q

log = logging.getLogger("dsm.settings")

# Any constant works as long as every node uses the same ("dsm-sets" in ASCII).
SETTINGS_LOCK_KEY = 0x64736D2D73657473
MIN_THRESHOLD_INTERVALS = 3
TEN_YEARS = 3650 * 86400.0

_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
_DOTTED_DIGITS = re.compile(r"[0-9.]+")


class InvalidSettings(ValueError):
    """The settings sent break a bound or a rule; the message names each problem."""


def check_host(value: str) -> str:
    """A host name (RFC 1123 labels, ASCII) or an IPv4/IPv6 address; nothing else."""
    if not 1 <= len(value) <= 253:
        raise ValueError("must be a host name or an IP address of 1 to 253 characters")
    try:
        ipaddress.ip_address(value)
        return value
    except ValueError:
        pass
    name = value[:-1] if value.endswith(".") else value
    if not _DOTTED_DIGITS.fullmatch(name) and all(_LABEL.fullmatch(p) for p in name.split(".")):
        return value
    raise ValueError(f"{value[:80]!r} is not a valid host name or IP address")


Address = Annotated[str, AfterValidator(check_host)]


class ClusterSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    heartbeat_interval_seconds: float = Field(
        10.0, ge=0.5, le=600, description="How often nodes heartbeat."
    )
    offline_threshold_seconds: float = Field(
        180.0,
        ge=1.5,
        le=86400,
        description="Silence after which a node is Offline and its work taken over "
        f"(at least {MIN_THRESHOLD_INTERVALS} heartbeat intervals).",
    )
    job_history_retention_seconds: float = Field(
        7 * 86400, ge=60, le=TEN_YEARS, description="How long finished jobs stay readable."
    )
    job_counts_retention_seconds: float = Field(
        30 * 86400, ge=3600, le=TEN_YEARS, description="How long per-minute job counts are kept."
    )
    # Agents (dsm_node.agents; docs/agent-protocol.md). The original product's defaults: a
    # heartbeat every 10 minutes, Offline (with an alert) after 2 missed heartbeats.
    agent_heartbeat_interval_seconds: float = Field(
        600.0, ge=1, le=86400, description="Interval between an agent's heartbeats."
    )
    agent_missed_heartbeats_offline: int = Field(
        2, ge=0, le=1000, description="Missed heartbeats before an agent is Offline (0: never)."
    )
    agent_clock_skew_limit_seconds: float = Field(
        60.0, ge=1, le=30 * 86400, description="Agent clock skew that raises an alert."
    )
    agent_event_retention_seconds: float = Field(
        30 * 86400, ge=3600, le=TEN_YEARS, description="How long agent events are kept."
    )
    # Load-balancer overrides (the original product's three address/port pairs): when set, agents
    # are told to use these instead of the list of node addresses.
    manager_address: Address | None = Field(None, description="Manager (console/API) address.")
    manager_port: int | None = Field(None, ge=1, le=65535, description="Manager port.")
    heartbeat_address: Address | None = Field(None, description="Agent heartbeat address.")
    heartbeat_port: int | None = Field(None, ge=1, le=65535, description="Heartbeat port.")
    relay_address: Address | None = Field(None, description="Relay (updates) address.")
    relay_port: int | None = Field(None, ge=1, le=65535, description="Relay port.")

    @model_validator(mode="after")
    def _rules(self) -> ClusterSettings:
        problems = [message for message, _ in rule_problems(self.model_dump())]
        if problems:
            raise ValueError("; ".join(problems))
        return self


FIELDS = ClusterSettings.model_fields
_FIELD_ADAPTERS: dict[str, TypeAdapter[Any]] = {
    name: TypeAdapter(
        Annotated[info.annotation, info],  # type: ignore[arg-type]
        config=ConfigDict(strict=True),
    )
    for name, info in FIELDS.items()
}
_DEPENDS_ON_MANAGER = (
    "manager_port",
    "heartbeat_address",
    "heartbeat_port",
    "relay_address",
    "relay_port",
)


def rule_problems(values: dict[str, Any]) -> list[tuple[str, tuple[str, ...]]]:
    """The rules between settings that ``values`` (a complete set) breaks, each with the
    settings involved."""
    problems: list[tuple[str, tuple[str, ...]]] = []
    interval = values["heartbeat_interval_seconds"]
    threshold = values["offline_threshold_seconds"]
    if threshold < MIN_THRESHOLD_INTERVALS * interval:
        problems.append(
            (
                f"offlineThresholdSeconds ({threshold:g}) must be at least "
                f"{MIN_THRESHOLD_INTERVALS} times heartbeatIntervalSeconds ({interval:g})",
                ("heartbeat_interval_seconds", "offline_threshold_seconds"),
            )
        )
    if not values["manager_address"]:
        orphans = tuple(k for k in _DEPENDS_ON_MANAGER if values[k] is not None)
        if orphans:
            problems.append(
                (
                    f"{', '.join(map(to_camel, orphans))} need managerAddress (without it agents "
                    "get the node list and these would be ignored)",
                    orphans,
                )
            )
    return problems


def field_problem(name: str, value: Any) -> str | None:
    """Why ``value`` is not valid for setting ``name`` on its own, or None."""
    try:
        _FIELD_ADAPTERS[name].validate_python(value)
    except ValidationError as e:
        return f"{to_camel(name)}: " + "; ".join(err["msg"] for err in e.errors())
    return None


_warned: set[str] = set()


def from_stored(stored: dict[str, Any]) -> ClusterSettings:
    """The effective settings from stored rows: invalid values fall back to their defaults."""
    values: dict[str, Any] = {}
    for name, value in stored.items():
        if name not in FIELDS:
            continue
        if (problem := field_problem(name, value)) is not None:
            _warn_once(f"stored setting ignored, default used: {problem}")
            continue
        values[name] = value
    defaults = ClusterSettings().model_dump()
    for message, names in rule_problems({**defaults, **values}):
        _warn_once(f"stored settings ignored, defaults used: {message}")
        for n in names:
            values.pop(n, None)
    return ClusterSettings(**values)


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning("%s", message)


async def stored(engine: AsyncEngine) -> dict[str, Any]:
    """The settings rows as stored, unchecked."""
    async with engine.connect() as conn:
        return {r.key: r.value for r in await conn.execute(Q.get_settings)}


async def read(engine: AsyncEngine) -> ClusterSettings:
    return from_stored(await stored(engine))


# -- secret settings: stored encrypted under the master key (keys.MasterKeys) -----------------


async def secret_names(engine: AsyncEngine) -> list[str]:
    async with engine.connect() as conn:
        return [r.key for r in await conn.execute(Q.secret_settings)]


async def secret_ciphertext(engine: AsyncEngine, key: str) -> str | None:
    async with engine.connect() as conn:
        row = (await conn.execute(Q.secret_setting, {"key": key})).first()
    return None if row is None else str(row.ciphertext)


async def put_secret(conn: AsyncConnection, key: str, ciphertext: str, key_version: int) -> None:
    """Stores a secret setting's ciphertext, in the caller's transaction."""
    await conn.execute(
        Q.put_secret_setting, {"key": key, "ciphertext": ciphertext, "key_version": key_version}
    )


async def write(
    conn: AsyncConnection, values: dict[str, Any], *, only_if_absent: bool = False
) -> ClusterSettings:
    """Validates ``values`` against the stored settings and writes them, in the caller's
    transaction and under the settings lock; returns the settings in effect afterwards. With
    ``only_if_absent`` (seeding at bootstrap) values already stored are left alone.
    Raises ``InvalidSettings`` naming every problem; nothing is written then."""
    unknown = sorted(k for k in values if k not in FIELDS)
    if unknown:
        raise InvalidSettings(f"unknown setting(s): {', '.join(unknown)}")
    await conn.execute(Q.advisory_xact_lock, {"key": SETTINGS_LOCK_KEY})
    stored = {r.key: r.value for r in (await conn.execute(Q.get_settings)).all()}
    if only_if_absent:
        values = {k: v for k, v in values.items() if k not in stored}
    problems = [p for k, v in values.items() if (p := field_problem(k, v)) is not None]
    if problems:
        raise InvalidSettings("; ".join(problems))
    merged = {**from_stored(stored).model_dump(), **values}
    problems = [message for message, _ in rule_problems(merged)]
    if problems:
        raise InvalidSettings("; ".join(problems))
    q = Q.put_setting_default if only_if_absent else Q.put_setting
    for key, value in values.items():
        await conn.execute(q, {"key": key, "value": json.dumps(value)})
    return ClusterSettings(**merged)
