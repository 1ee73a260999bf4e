"""What agents are told: the manager list and their configuration. Pure.

By default the list holds the heartbeat address of every Online node (the original product gives
every agent the address of every node; agents pick one at random and try another on failure).
When the cluster settings name a load balancer (``managerAddress``; ``heartbeatAddress`` and
``heartbeatPort`` override it for agents), agents are told to use only the balancer: each
heartbeat is a new TCP connection, so the balancer spreads them, and one connection stays on one
node (TCP passthrough, no TLS termination).

The version is a hash of the content: a node added or removed changes it, and every agent gets
the new list with its next answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dsm_node.agents.protocol import MAX_EVENTS, fingerprint
from dsm_node.settings_store import ClusterSettings

LOAD_BALANCER_DEFAULT_PORT = 443


@dataclass(frozen=True)
class ManagerList:
    mode: str
    addresses: tuple[tuple[str, int], ...]

    @property
    def version(self) -> str:
        return fingerprint({"mode": self.mode, "addresses": self.addresses})[:16]

    def document(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "mode": self.mode,
            "addresses": [{"address": a, "port": p} for a, p in self.addresses],
        }


def manager_list(settings: ClusterSettings, online: list[tuple[str, int]]) -> ManagerList:
    if settings.manager_address:
        address = settings.heartbeat_address or settings.manager_address
        port = settings.heartbeat_port or settings.manager_port or LOAD_BALANCER_DEFAULT_PORT
        return ManagerList("loadBalancer", ((address, port),))
    return ManagerList("nodeList", tuple(sorted(set(online))))


def agent_config(settings: ClusterSettings) -> dict[str, Any]:
    """The configuration every agent holds; agents whose fingerprint differs get it again."""
    return {
        "heartbeatIntervalSeconds": settings.agent_heartbeat_interval_seconds,
        "maxEventsPerHeartbeat": MAX_EVENTS,
    }


__all__ = ["ManagerList", "agent_config", "manager_list"]
