"""How agents are told to connect: the decision to ``PATCH /api/settings`` on the managers.

Pure. The settings themselves come from ``manifests.agent_settings`` (node list: every override
cleared; load balancer: manager, heartbeat and relay at its address and published port). They are
written once per change: the status remembers what was written (``status.agentSettings``), and a
pass writes only when the wanted settings differ from that record.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from dsm_operator.reconcile import manifests
from dsm_operator.reconcile.specs import ManagerSpec


@dataclasses.dataclass(frozen=True)
class Change:
    """Settings to write to the managers, and what the status records once they are written."""

    values: dict[str, Any]
    """The ``PATCH /api/settings`` body (camelCase keys; ``None`` clears an override)."""
    record: dict[str, Any]
    """``status.agentSettings`` afterwards: the mode and the values, without nulls (a merge
    patch drops them anyway, so an unchanged record compares equal)."""
    message: str
    """The Event that says so."""


def change(
    spec: ManagerSpec,
    load_balancer_address: str | None,
    recorded: Mapping[str, Any] | None,
    agent_address: str | None = None,
) -> Change | None:
    """What to write, or ``None`` when the managers already have it (or a load balancer has
    no address yet). ``agent_address``: the heartbeat channel's Service."""
    values = manifests.agent_settings(spec, load_balancer_address, agent_address)
    if values is None:
        return None
    wanted = {"mode": spec.agent_connection, **values}
    # The record has no null values: compare with absent keys as None.
    have = {k: (recorded or {}).get(k) for k in wanted}
    if wanted == have:
        return None
    where = (
        f" (console {values['managerAddress']}:{values['managerPort']}, heartbeats "
        f"{values['heartbeatAddress']}:{values['heartbeatPort']})"
        if values.get("managerAddress")
        else ""
    )
    return Change(
        values=values,
        record={k: v for k, v in wanted.items() if v is not None},
        message=f"agents connect via {spec.agent_connection}{where}",
    )
