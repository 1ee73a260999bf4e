"""Node statuses: as stored in ``nodes.status``, and as an administrator sees them. Pure: no I/O."""

from __future__ import annotations

import datetime as dt
from enum import StrEnum


class StoredStatus(StrEnum):
    """``nodes.status`` as the database stores it (the migrations' CHECK constraint)."""

    ONLINE = "online"
    OFFLINE = "offline"
    UPGRADE_REQUIRED = "upgrade_required"
    DECOMMISSIONED = "decommissioned"


class NodeStatus(StrEnum):
    """The specification's statuses, spelled exactly as administrators see them."""

    ONLINE = "Online"
    OFFLINE = "Offline"
    UPGRADE_REQUIRED = "Offline (Upgrade Required)"
    DECOMMISSIONED = "Decommissioned"


_SHOWN = {
    StoredStatus.ONLINE: NodeStatus.ONLINE,
    StoredStatus.OFFLINE: NodeStatus.OFFLINE,
    StoredStatus.UPGRADE_REQUIRED: NodeStatus.UPGRADE_REQUIRED,
    StoredStatus.DECOMMISSIONED: NodeStatus.DECOMMISSIONED,
}


def effective_status(
    stored: StoredStatus, silent_since: dt.datetime, db_now: dt.datetime, threshold_seconds: float
) -> NodeStatus:
    """A node recorded online that has been silent for longer than the threshold is shown Offline
    even before a peer has marked it (there may be no peer left to do so). ``silent_since``: its
    last heartbeat, or the database server's start when that is later (nobody could heartbeat
    while the server was down; see ``mark_silent_nodes_offline`` in queries.sql)."""
    status = _SHOWN[StoredStatus(stored)]
    if status is NodeStatus.ONLINE and (db_now - silent_since).total_seconds() > threshold_seconds:
        return NodeStatus.OFFLINE
    return status


def fence_after(threshold_seconds: float) -> float:
    """How long a node may go without a successful heartbeat before it stops working by itself.

    Two thirds of the offline threshold: the node abandons its jobs well before its peers may take
    them over, with a third of the threshold as margin for a slow database or a slow clock."""
    return threshold_seconds * 2 / 3
