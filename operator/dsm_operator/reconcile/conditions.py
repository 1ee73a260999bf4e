"""Status conditions per the Kubernetes API conventions.

A list keyed by ``type``; ``Ready`` on top, ``Progressing`` and ``Degraded`` beside it; reasons
are one CamelCase word (typed constants below or ``planning.Reason``); every condition carries
the ``observedGeneration`` it was computed from; ``lastTransitionTime`` moves only when
``status`` changes. ``merge`` returns the previous list unchanged (equal, element for element)
when nothing changed, so the caller can skip the status write.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
from collections.abc import Iterable, Sequence
from typing import Any


class Type(enum.StrEnum):
    READY = "Ready"
    PROGRESSING = "Progressing"
    DEGRADED = "Degraded"


class Status(enum.StrEnum):
    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


class Reason(enum.StrEnum):
    """Reasons not already named by ``planning.Reason``."""

    ALL_NODES_READY = "AllNodesReady"
    NODES_NOT_READY = "NodesNotReady"
    ROLLOUT_IN_PROGRESS = "RolloutInProgress"
    SECRET_NOT_FOUND = "SecretNotFound"
    OWNERSHIP_CONFLICT = "OwnershipConflict"
    APPLY_FAILED = "ApplyFailed"
    AS_EXPECTED = "AsExpected"


@dataclasses.dataclass(frozen=True)
class Condition:
    type: str
    status: Status
    reason: str
    message: str


def _format(ts: datetime.datetime) -> str:
    return ts.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def merge(
    previous: Sequence[dict[str, Any]] | None,
    new: Iterable[Condition],
    *,
    generation: int,
    now: datetime.datetime,
) -> list[dict[str, Any]]:
    """The condition list after applying ``new``; types not in ``new`` are kept as they were."""
    by_type = {c.get("type"): dict(c) for c in previous or ()}
    order = [c.get("type") for c in previous or ()]
    for cond in new:
        old = by_type.get(cond.type)
        transition = (
            old["lastTransitionTime"]
            if old and old.get("status") == cond.status and old.get("lastTransitionTime")
            else _format(now)
        )
        by_type[cond.type] = {
            "type": cond.type,
            "status": str(cond.status),
            "reason": cond.reason,
            "message": cond.message,
            "lastTransitionTime": transition,
            "observedGeneration": generation,
        }
        if cond.type not in order:
            order.append(cond.type)
    # Ready first, then the others in their first-seen order.
    order.sort(key=lambda t: (t != Type.READY,))
    return [by_type[t] for t in order]


def find(conditions: Sequence[dict[str, Any]] | None, type_: str) -> dict[str, Any] | None:
    for cond in conditions or ():
        if cond.get("type") == type_:
            return cond
    return None


def is_already(
    conditions: Sequence[dict[str, Any]] | None, type_: str, status: Status, reason: str
) -> bool:
    """Whether the condition ``type_`` already has this status and reason (so an Event about it
    would repeat old news)."""
    found = find(conditions, type_)
    return found is not None and found.get("status") == status and found.get("reason") == reason
