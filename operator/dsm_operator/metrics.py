"""The operator's own Prometheus metrics (not the nodes'), served on ``/metrics``."""

from __future__ import annotations

import contextlib

from prometheus_client import Counter, Gauge, Histogram

RECONCILES = Counter("dsm_operator_reconciles_total", "Reconcile passes by result.", ["result"])
RECONCILE_SECONDS = Histogram(
    "dsm_operator_reconcile_duration_seconds", "Duration of one reconcile pass."
)
ACTIONS = Counter(
    "dsm_operator_actions_total",
    "Actions taken on node pods and nodes.",
    ["namespace", "name", "action"],
)
NODES = Gauge(
    "dsm_operator_nodes",
    "Manager nodes of a resource by state (desired, current, ready, updated).",
    ["namespace", "name", "state"],
)
NODE_API_ERRORS = Counter(
    "dsm_operator_node_api_errors_total", "Failed calls to the nodes' API.", ["namespace", "name"]
)
STALLED = Gauge(
    "dsm_operator_stalled",
    "1 while a launch or rollout of a resource is stalled (Degraded).",
    ["namespace", "name"],
)


def forget(namespace: str, name: str) -> None:
    """Drop the per-resource series of a deleted resource."""
    for state in ("desired", "current", "ready", "updated"):
        with contextlib.suppress(KeyError):
            NODES.remove(namespace, name, state)
    with contextlib.suppress(KeyError):
        STALLED.remove(namespace, name)
