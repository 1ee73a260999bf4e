"""Names the operator and its children agree on: API coordinates, labels, ports, child names.

Everything that appears in more than one module (or in the CRD, the chart and the tests) is a
constant here, in the manner of CloudNativePG's in-pod paths and ports.
"""

from __future__ import annotations

import enum
from typing import Final

GROUP: Final = "security.dsm.dev"
VERSION: Final = "v1alpha1"
API_VERSION: Final = f"{GROUP}/{VERSION}"
KIND: Final = "DeepSecurityManager"
PLURAL: Final = "deepsecuritymanagers"

#: The operator's own marker and annotation prefix, chosen once (changing them re-handles
#: every object): kopf's defaults would be shared with every other kopf operator.
OPERATOR_DOMAIN: Final = f"operator.{GROUP}"
FINALIZER: Final = f"{OPERATOR_DOMAIN}/finalizer"
ANNOTATION_PREFIX: Final = OPERATOR_DOMAIN
CONFIG_HASH_ANNOTATION: Final = f"{OPERATOR_DOMAIN}/config-hash"
FIELD_MANAGER: Final = "dsm-operator"
#: Prefix of the User-Agent of every request the operator's gateway sends, so that an audit log
#: (and the tests, which read one) can tell the operator's own requests from everyone else's.
USER_AGENT: Final = "dsm-operator"

# Labels (the recommended app.kubernetes.io set).
LABEL_NAME: Final = "app.kubernetes.io/name"
LABEL_INSTANCE: Final = "app.kubernetes.io/instance"
LABEL_COMPONENT: Final = "app.kubernetes.io/component"
LABEL_MANAGED_BY: Final = "app.kubernetes.io/managed-by"
LABEL_PART_OF: Final = "app.kubernetes.io/part-of"
LABEL_VERSION: Final = "app.kubernetes.io/version"
APP_NAME: Final = "dsm-node"
MANAGED_BY: Final = "dsm-operator"
#: The label the StatefulSet controller stamps on every pod with the revision it was made from.
REVISION_LABEL: Final = "controller-revision-hash"

# The node contract (docs/node-contract.md).
NODE_API_PORT: Final = 4119
NODE_HEARTBEAT_PORT: Final = 4120
NODE_API_PORT_NAME: Final = "https"
NODE_HEARTBEAT_PORT_NAME: Final = "heartbeat"
HEALTHZ_PATH: Final = "/healthz"
READYZ_PATH: Final = "/readyz"
METRICS_PATH: Final = "/metrics"
NODES_PATH: Final = "/api/nodes"
DECOMMISSION_PATH: Final = "/api/nodes/{name}/decommission"
SETTINGS_PATH: Final = "/api/settings"


class NodeStatus(enum.StrEnum):
    """A node's status as the managers report it (``GET /api/nodes``), spelled as administrators
    see it. tests/operator/test_operator_node_contract.py ties it to the node's own enum."""

    ONLINE = "Online"
    OFFLINE = "Offline"
    UPGRADE_REQUIRED = "Offline (Upgrade Required)"
    DECOMMISSIONED = "Decommissioned"


#: What ``status.nodes[].status`` says when no manager answered (the operator's, not a node's).
STATUS_UNKNOWN: Final = "Unknown"
#: Statuses in which a node may be decommissioned (the node answers 409 otherwise).
OFFLINE_STATUSES: Final = frozenset({NodeStatus.OFFLINE, NodeStatus.UPGRADE_REQUIRED})

# Mount points inside the node container.
LOCAL_SECRET_DIR: Final = "/etc/dsm/local-secret"
API_KEY_DIR: Final = "/etc/dsm/api-key"
TLS_DIR: Final = "/etc/dsm/tls"

#: Key of the bootstrap API key in the operator-managed Secret.
API_KEY_SECRET_KEY: Final = "apiKey"


def statefulset_name(cr_name: str) -> str:
    """The StatefulSet (and pod name prefix) of a resource."""
    return cr_name


def pod_name(cr_name: str, ordinal: int) -> str:
    return f"{statefulset_name(cr_name)}-{ordinal}"


def headless_service_name(cr_name: str) -> str:
    return f"{cr_name}-nodes"


def load_balancer_service_name(cr_name: str) -> str:
    return f"{cr_name}-lb"


def agent_load_balancer_service_name(cr_name: str) -> str:
    """The heartbeat channel's own Service (agents; TCP passthrough to the heartbeat port)."""
    return f"{cr_name}-agents"


def pdb_name(cr_name: str) -> str:
    return cr_name


def service_account_name(cr_name: str) -> str:
    return f"{cr_name}-node"


def api_key_secret_name(cr_name: str) -> str:
    return f"{cr_name}-api-key"


def service_monitor_name(cr_name: str) -> str:
    return cr_name


def selector_labels(cr_name: str) -> dict[str, str]:
    """Labels that select a resource's node pods; never change them (selectors are immutable)."""
    return {LABEL_NAME: APP_NAME, LABEL_INSTANCE: cr_name}


def selector_string(cr_name: str) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(selector_labels(cr_name).items()))


def ordinal_of(cr_name: str, name: str) -> int | None:
    """The ordinal of a pod or node name of this resource, or None for a foreign name."""
    prefix = f"{statefulset_name(cr_name)}-"
    if not name.startswith(prefix):
        return None
    rest = name[len(prefix) :]
    if not rest.isdigit() or (len(rest) > 1 and rest.startswith("0")):
        return None
    return int(rest)
