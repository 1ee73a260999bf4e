"""The agent protocol's wire format (version 1), shared by the node and the agent. Pure.

Every request body is validated strictly: unknown fields refused, ``true`` is not a number and
``"7"`` not an integer, numbers finite, text free of NUL (PostgreSQL cannot store it) and of lone
surrogates (the JSON parser refuses them), every collection bounded. A request that passes
validation can always be stored: a heartbeat never fails in the database because of its data.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Annotated, Any, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.alias_generators import to_camel

PROTOCOL_VERSION = 1
SUPPORTED_VERSIONS = (1,)

PATH_CA = "/agent/v1/ca"
PATH_ACTIVATE = "/agent/v1/activate"
PATH_HEARTBEAT = "/agent/v1/heartbeat"

MAX_EVENTS = 1000
MAX_ACTIVATION_BODY = 16 * 1024
MAX_HEARTBEAT_BODY = 1024 * 1024
MAX_SEQ = 2**63 - 1
# A clock further off than this is broken, not skewed: the heartbeat is refused.
MAX_CLOCK_OFFSET_SECONDS = 366 * 86400.0
STATUSES = ("ok", "warning", "error")


def _no_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


Text = Annotated[str, AfterValidator(_no_nul)]
Name = Annotated[str, Field(pattern=r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")]
EventType = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_.-]{0,63}$")]
Scalar = Annotated[Text, Field(max_length=1024)] | int | float | bool | None
Seq = Annotated[int, Field(ge=1, le=MAX_SEQ)]
# Agent clocks: seconds since the epoch, finite, within year 1970..9999 (the database's range).
EpochSeconds = Annotated[float, Field(ge=0, le=253402300799.0)]


class Message(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        strict=True,
        allow_inf_nan=False,
    )


class Event(Message):
    seq: Seq
    at: EpochSeconds
    type: EventType
    data: dict[Name, Scalar] = Field(default_factory=dict, max_length=32)


class Heartbeat(Message):
    protocol: int
    agent_id: Annotated[int, Field(ge=1, le=MAX_SEQ)]
    status: Literal["ok", "warning", "error"]
    status_message: Annotated[Text, Field(max_length=500)] = ""
    clock: EpochSeconds
    version: Annotated[Text, Field(max_length=64)] = ""
    config_fingerprint: Annotated[str, Field(pattern=r"^[0-9a-f]{0,64}$")] = ""
    managers_version: Annotated[str, Field(pattern=r"^[0-9a-f]{0,64}$")] = ""
    counters: dict[Name, Annotated[int, Field(ge=0, le=MAX_SEQ)]] = Field(
        default_factory=dict, max_length=32
    )
    events: list[Event] = Field(default_factory=list, max_length=MAX_EVENTS)

    @model_validator(mode="after")
    def _consecutive(self) -> Heartbeat:
        for before, after in zip(self.events, self.events[1:], strict=False):
            if after.seq != before.seq + 1:
                raise ValueError(
                    f"events: sequence numbers must be consecutive, got {before.seq} then "
                    f"{after.seq}"
                )
        return self


class Activation(Message):
    protocol: int
    token: Annotated[str, Field(min_length=1, max_length=200)]
    hostname: Annotated[str, Field(pattern=r"^[\x21-\x7e]{1,253}$")]
    csr: Annotated[str, Field(min_length=1, max_length=8192)]


_M = TypeVar("_M", bound="Message")


class ProtocolError(ValueError):
    """A request the agent got wrong: ``status`` and a ``code`` word for the answer."""

    def __init__(self, status: int, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.code, self.extra = status, code, extra


_UNION_MEMBER = re.compile(r"^(function-\w+\[.*|int|float|bool|none|str)$")


def _message(e: ValidationError) -> str:
    parts: dict[str, str] = {}
    for err in e.errors():
        # a union's members appear in the location ("function-after[...]", "int"): drop them,
        # and say the first problem of each field
        loc = [str(p) for p in err["loc"] if not _UNION_MEMBER.match(str(p))]
        where = ".".join(loc) or "body"
        parts.setdefault(where, err["msg"].removeprefix("Value error, "))
    shown = list(parts.items())[:5]
    return "invalid request: " + "; ".join(f"{where}: {msg}" for where, msg in shown)


def parse_heartbeat(body: bytes) -> Heartbeat:
    hb = _parse(Heartbeat, body)
    _check_version(hb.protocol)
    return hb


def parse_activation(body: bytes) -> Activation:
    act = _parse(Activation, body)
    _check_version(act.protocol)
    return act


def _parse(model: type[_M], body: bytes) -> _M:
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        code = "malformed_json" if e.errors()[0]["type"] == "json_invalid" else "invalid_request"
        if code == "malformed_json":
            raise ProtocolError(400, code, "the body is not valid JSON") from None
        if e.errors()[0]["type"] == "model_type":
            raise ProtocolError(400, code, "the body must be a JSON object") from None
        raise ProtocolError(400, code, _message(e)) from None


def _check_version(version: int) -> None:
    if version not in SUPPORTED_VERSIONS:
        raise ProtocolError(
            400,
            "unsupported_protocol",
            f"protocol {version} is not spoken here; supported: "
            + ", ".join(map(str, SUPPORTED_VERSIONS)),
        )


def fingerprint(document: Any) -> str:
    """SHA-256 of a document's canonical JSON (sorted keys, no spaces)."""
    raw = json.dumps(document, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(raw).hexdigest()


def dumps(document: Any) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode()
