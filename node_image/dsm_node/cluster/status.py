"""Pure rules for what status an administrator sees for a node. No I/O here."""

from __future__ import annotations

import datetime as dt
from enum import StrEnum


class NodeStatus(StrEnum):
    """The specification's statuses, spelled exactly as administrators see them."""

    ONLINE = "Online"
    OFFLINE = "Offline"
    UPGRADE_REQUIRED = "Offline (Upgrade Required)"
    DECOMMISSIONED = "Decommissioned"


_STORED = {
    "online": NodeStatus.ONLINE,
    "offline": NodeStatus.OFFLINE,
    "upgrade_required": NodeStatus.UPGRADE_REQUIRED,
    "decommissioned": NodeStatus.DECOMMISSIONED,
}


def effective_status(
    stored: str, last_heartbeat: dt.datetime, db_now: dt.datetime, threshold_seconds: float
) -> NodeStatus:
    """A node recorded online whose heartbeat is older than the threshold is shown Offline even
    before a peer has marked it (there may be no peer left to do so)."""
    status = _STORED[stored]
    if (
        status is NodeStatus.ONLINE
        and (db_now - last_heartbeat).total_seconds() > threshold_seconds
    ):
        return NodeStatus.OFFLINE
    return status


def fence_after(threshold_seconds: float) -> float:
    """How long a node may go without a successful heartbeat before it stops working by itself.

    Two thirds of the offline threshold: the node abandons its jobs well before its peers may take
    them over, with a third of the threshold as margin for a slow database or a slow clock."""
    return threshold_seconds * 2 / 3
