"""The operator's idea of the node, tied to the node's own definitions.

The operator must not import the node runtime (it runs in its own image), so it keeps its own
constants in ``reconcile/names.py``. This test imports the node package and checks the two agree:
every status a node reports, and every path and port the operator calls or probes.
"""

from __future__ import annotations

from dsm_node.api import paths
from dsm_node.cluster.status import NodeStatus as NodeSideStatus
from dsm_operator.reconcile import names


def test_node_statuses_are_the_nodes_own() -> None:
    assert {s.name: s.value for s in names.NodeStatus} == {s.name: s.value for s in NodeSideStatus}
    assert names.STATUS_UNKNOWN not in {s.value for s in NodeSideStatus}


def test_decommissionable_statuses_are_the_offline_ones() -> None:
    assert {NodeSideStatus.OFFLINE, NodeSideStatus.UPGRADE_REQUIRED} == set(names.OFFLINE_STATUSES)


def test_paths_and_ports_the_operator_uses_are_the_nodes() -> None:
    assert names.HEALTHZ_PATH == paths.HEALTHZ
    assert names.READYZ_PATH == paths.READYZ
    assert names.METRICS_PATH == paths.METRICS
    assert names.NODES_PATH == paths.API_NODES
    assert names.DECOMMISSION_PATH == paths.API_DECOMMISSION
    assert names.SETTINGS_PATH == paths.API_SETTINGS
    assert names.NODE_API_PORT == paths.API_PORT
    assert names.NODE_HEARTBEAT_PORT == paths.HEARTBEAT_PORT
