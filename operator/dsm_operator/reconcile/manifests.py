"""What the children of a ``DeepSecurityManager`` look like, as plain dictionaries.

Pure functions of the spec (and of a few observed facts passed in as arguments: the replica
count the planner chose, the hash of the Secrets' contents, whether the ServiceMonitor API
exists). The handlers apply the results with server-side apply, so a function here must return
the *whole* intent for the fields the operator owns and nothing it does not want to own.

Stability matters more than brevity here: any change to the pod template produces a new
StatefulSet revision, which the operator then rolls out node by node. So the template depends
only on the spec and the Secrets' contents, and an operator upgrade that keeps this module's
output equal rolls nothing.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

from dsm_operator.reconcile import alerting, names
from dsm_operator.reconcile.specs import ManagerSpec, Owner, SecretInputs

Manifest = dict[str, Any]

#: Node pods run as this user (the node image creates it).
NODE_UID = 10001


def owner_reference(owner: Owner) -> dict[str, Any]:
    return {
        "apiVersion": names.API_VERSION,
        "kind": names.KIND,
        "name": owner.name,
        "uid": owner.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def labels(owner: Owner, component: str) -> dict[str, str]:
    return {
        **names.selector_labels(owner.name),
        names.LABEL_COMPONENT: component,
        names.LABEL_MANAGED_BY: names.MANAGED_BY,
        names.LABEL_PART_OF: "dsm",
    }


def _metadata(owner: Owner, name: str, component: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": owner.namespace,
        "labels": labels(owner, component),
        "ownerReferences": [owner_reference(owner)],
        **extra,
    }


def config_hash(secrets: SecretInputs) -> str:
    """A digest of every Secret value the pods read, stamped on the pod template.

    Environment variables and files from Secrets are not refreshed in running pods, so a change
    of content must change the template to roll the pods; an unchanged content must not.
    """
    digest = hashlib.sha256()
    parts: list[tuple[str, bytes | None]] = [
        ("database_url", secrets.database_url),
        ("local_secret", secrets.local_secret),
        ("api_key", secrets.api_key),
        *sorted((f"tls/{k}", v) for k, v in secrets.tls.items()),
    ]
    for key, value in parts:
        digest.update(key.encode())
        digest.update(b"\0")
        digest.update(b"-" if value is None else b"+" + value)
        digest.update(b"\0")
    return digest.hexdigest()[:32]


def node_image(spec: ManagerSpec, default_repository: str) -> str:
    """``spec.image`` when given, otherwise ``<repository>:<version>``."""
    return spec.image or f"{default_repository}:{spec.version}"


def _startup_failure_threshold(spec: ManagerSpec, period: int) -> int:
    # The startup probe must never kill a node that is migrating the schema: it allows the
    # whole node-ready timeout (the node answers /healthz while migrating anyway).
    return max(1, math.ceil(spec.node_ready_timeout_seconds / period))


def _probe(path: str, *, period: int, timeout: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": names.NODE_API_PORT_NAME, "scheme": "HTTPS"},
        "periodSeconds": period,
        "timeoutSeconds": timeout,
        "failureThreshold": failures,
    }


def _env(spec: ManagerSpec) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": "DSM_NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "DSM_ADVERTISE_ADDRESS", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "DSM_BIND_ADDRESS", "value": "0.0.0.0"},
        {"name": "DSM_API_PORT", "value": str(names.NODE_API_PORT)},
        {"name": "DSM_HEARTBEAT_PORT", "value": str(names.NODE_HEARTBEAT_PORT)},
        {"name": "DSM_SOFTWARE_VERSION", "value": spec.version},
        {
            "name": "DSM_DATABASE_URL",
            "valueFrom": {
                "secretKeyRef": {
                    "name": spec.database.secret_ref.name,
                    "key": spec.database.secret_ref.key,
                }
            },
        },
        {
            "name": "DSM_LOCAL_SECRET_FILE",
            "value": f"{names.LOCAL_SECRET_DIR}/{spec.master_key.local_secret_ref.key}",
        },
        {
            "name": "DSM_BOOTSTRAP_API_KEY_FILE",
            "value": f"{names.API_KEY_DIR}/{names.API_KEY_SECRET_KEY}",
        },
        {"name": "DSM_OFFLINE_THRESHOLD_SECONDS", "value": str(spec.offline_threshold_seconds)},
        # On Kubernetes a new pod for an ordinal is a new node by construction: after a
        # scale-down decommissioned it, a later scale-up must be able to reuse the name.
        {"name": "DSM_REUSE_DECOMMISSIONED_NAME", "value": "true"},
        {"name": "TZ", "value": spec.time_zone},
    ]
    if spec.tls is not None:
        env += [
            {"name": "DSM_TLS_CERT_FILE", "value": f"{names.TLS_DIR}/tls.crt"},
            {"name": "DSM_TLS_KEY_FILE", "value": f"{names.TLS_DIR}/tls.key"},
        ]
    return env


def _volumes(spec: ManagerSpec, owner: Owner) -> tuple[list[Manifest], list[Manifest]]:
    ref = spec.master_key.local_secret_ref
    volumes: list[Manifest] = [
        {
            "name": "local-secret",
            "secret": {
                "secretName": ref.name,
                "items": [{"key": ref.key, "path": ref.key}],
                "defaultMode": 0o440,
            },
        },
        {
            "name": "api-key",
            "secret": {
                "secretName": names.api_key_secret_name(owner.name),
                "items": [{"key": names.API_KEY_SECRET_KEY, "path": names.API_KEY_SECRET_KEY}],
                "defaultMode": 0o440,
            },
        },
        # The root file system is read-only; the node's only write is its generated
        # self-signed certificate, under $TMPDIR.
        {"name": "tmp", "emptyDir": {"sizeLimit": "16Mi"}},
    ]
    mounts: list[Manifest] = [
        {"name": "local-secret", "mountPath": names.LOCAL_SECRET_DIR, "readOnly": True},
        {"name": "api-key", "mountPath": names.API_KEY_DIR, "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    if spec.tls is not None:
        volumes.append(
            {
                "name": "tls",
                "secret": {"secretName": spec.tls.secret_ref.name, "defaultMode": 0o440},
            }
        )
        mounts.append({"name": "tls", "mountPath": names.TLS_DIR, "readOnly": True})
    return volumes, mounts


def _topology_spread(spec: ManagerSpec, owner: Owner) -> list[dict[str, Any]]:
    constraints = []
    for constraint in spec.scheduling.topology_spread_constraints:
        filled = dict(constraint)
        filled.setdefault("labelSelector", {"matchLabels": names.selector_labels(owner.name)})
        constraints.append(filled)
    return constraints


def pod_template(
    spec: ManagerSpec, owner: Owner, *, image: str, secrets_hash: str
) -> dict[str, Any]:
    volumes, mounts = _volumes(spec, owner)
    container: dict[str, Any] = {
        "name": "node",
        "image": image,
        "imagePullPolicy": spec.image_pull_policy,
        "command": ["dsm", "node", "run"],
        "env": _env(spec),
        "ports": [
            {"name": names.NODE_API_PORT_NAME, "containerPort": names.NODE_API_PORT},
            {"name": names.NODE_HEARTBEAT_PORT_NAME, "containerPort": names.NODE_HEARTBEAT_PORT},
        ],
        "startupProbe": _probe(
            names.HEALTHZ_PATH,
            period=10,
            timeout=5,
            failures=_startup_failure_threshold(spec, 10),
        ),
        "livenessProbe": _probe(names.HEALTHZ_PATH, period=10, timeout=5, failures=6),
        "readinessProbe": _probe(names.READYZ_PATH, period=5, timeout=3, failures=2),
        "volumeMounts": mounts,
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
        },
    }
    resources = spec.resources.model_dump(exclude_defaults=True)
    if resources:
        container["resources"] = resources
    pod_spec: dict[str, Any] = {
        "serviceAccountName": names.service_account_name(owner.name),
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": 60,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": NODE_UID,
            "runAsGroup": NODE_UID,
            "fsGroup": NODE_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": volumes,
    }
    scheduling = spec.scheduling
    if scheduling.node_selector:
        pod_spec["nodeSelector"] = dict(scheduling.node_selector)
    if scheduling.tolerations:
        pod_spec["tolerations"] = [dict(t) for t in scheduling.tolerations]
    if scheduling.affinity:
        pod_spec["affinity"] = dict(scheduling.affinity)
    if scheduling.topology_spread_constraints:
        pod_spec["topologySpreadConstraints"] = _topology_spread(spec, owner)
    if scheduling.priority_class_name:
        pod_spec["priorityClassName"] = scheduling.priority_class_name
    if spec.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": s.name} for s in spec.image_pull_secrets]
    pod_labels = {
        **spec.pod_labels,
        **labels(owner, "node"),
        names.LABEL_VERSION: spec.version,
    }
    annotations = {**spec.pod_annotations, names.CONFIG_HASH_ANNOTATION: secrets_hash}
    return {"metadata": {"labels": pod_labels, "annotations": annotations}, "spec": pod_spec}


def statefulset(
    spec: ManagerSpec, owner: Owner, *, replicas: int, image: str, secrets_hash: str
) -> Manifest:
    """The node StatefulSet.

    ``Parallel`` pod management plus ``OnDelete`` updates hand all ordering to the operator:
    it raises ``replicas`` one at a time for launches and deletes one pod at a time for
    rollouts. ``OrderedReady`` would stop recreating a deleted pod while a lower ordinal is not
    Ready, which is exactly the state of old-version nodes during an upgrade
    (docs/operator-design.md).
    """
    name = names.statefulset_name(owner.name)
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": _metadata(owner, name, "node"),
        "spec": {
            "replicas": replicas,
            "serviceName": names.headless_service_name(owner.name),
            "podManagementPolicy": "Parallel",
            "updateStrategy": {"type": "OnDelete"},
            "revisionHistoryLimit": 10,
            "selector": {"matchLabels": names.selector_labels(owner.name)},
            "template": pod_template(spec, owner, image=image, secrets_hash=secrets_hash),
        },
    }


def headless_service(owner: Owner) -> Manifest:
    """Stable DNS names for the nodes; published before they are ready so peers can reach a
    node that is still starting or migrating."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(owner, names.headless_service_name(owner.name), "node"),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": names.selector_labels(owner.name),
            "ports": [
                {
                    "name": names.NODE_API_PORT_NAME,
                    "port": names.NODE_API_PORT,
                    "targetPort": names.NODE_API_PORT_NAME,
                    "protocol": "TCP",
                },
                {
                    "name": names.NODE_HEARTBEAT_PORT_NAME,
                    "port": names.NODE_HEARTBEAT_PORT,
                    "targetPort": names.NODE_HEARTBEAT_PORT_NAME,
                    "protocol": "TCP",
                },
            ],
        },
    }


def load_balancer_service(spec: ManagerSpec, owner: Owner) -> Manifest | None:
    """One published port, TCP passthrough to the nodes' TLS port.

    A plain TCP Service never terminates TLS and keeps every connection on the endpoint it was
    first sent to; only Ready nodes (Online, schema compatible) receive connections.
    """
    return _passthrough_service(
        spec, owner, names.load_balancer_service_name(owner.name), "load-balancer",
        names.NODE_API_PORT_NAME,
    )  # fmt: skip


def agent_load_balancer_service(spec: ManagerSpec, owner: Owner) -> Manifest | None:
    """The heartbeat channel's own published address: TCP ``loadBalancer.port`` (443) passed
    through to the nodes' heartbeat port (4120), beside the console's (443 -> 4119). Agents
    authenticate with client certificates, so TLS must reach the node: no termination, and each
    heartbeat's connection stays on one node."""
    return _passthrough_service(
        spec, owner, names.agent_load_balancer_service_name(owner.name), "agent-load-balancer",
        names.NODE_HEARTBEAT_PORT_NAME,
    )  # fmt: skip


def _passthrough_service(
    spec: ManagerSpec, owner: Owner, name: str, component: str, target_port: str
) -> Manifest | None:
    """A Service publishing ``loadBalancer.port`` as plain TCP to the nodes' ``target_port``:
    both load balancers (console and agents) are this shape, one port each."""
    lb = spec.load_balancer
    if not lb.enabled:
        return None
    service_spec: dict[str, Any] = {
        "type": lb.service_type,
        "selector": names.selector_labels(owner.name),
        "sessionAffinity": "None",
        "ports": [
            {"name": target_port, "port": lb.port, "targetPort": target_port, "protocol": "TCP"}
        ],
    }
    if lb.service_type != "ClusterIP":
        service_spec["externalTrafficPolicy"] = lb.external_traffic_policy
    if lb.service_type == "LoadBalancer" and lb.source_ranges:
        service_spec["loadBalancerSourceRanges"] = list(lb.source_ranges)
    metadata = _metadata(owner, name, component)
    if lb.annotations:
        metadata["annotations"] = dict(lb.annotations)
    return {"apiVersion": "v1", "kind": "Service", "metadata": metadata, "spec": service_spec}


def pod_disruption_budget(spec: ManagerSpec, owner: Owner) -> Manifest | None:
    """Guards against voluntary evictions (drains). The operator's own rollouts delete pods
    directly and are not counted against it."""
    if not spec.pod_disruption_budget.enabled:
        return None
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(owner, names.pdb_name(owner.name), "node"),
        "spec": {
            "maxUnavailable": spec.pod_disruption_budget.max_unavailable,
            "selector": {"matchLabels": names.selector_labels(owner.name)},
        },
    }


def service_monitor(spec: ManagerSpec, owner: Owner) -> Manifest | None:
    """Prometheus Operator scrape config for the nodes' ``/metrics`` on the headless Service.

    The nodes serve HTTPS, often with self-signed certificates, so certificate verification is
    skipped for the scrape (metrics carry no secrets; the API behind the same port needs a key).
    """
    if not spec.monitoring.service_monitor:
        return None
    metadata = _metadata(owner, names.service_monitor_name(owner.name), "monitoring")
    metadata["labels"] = {**spec.monitoring.labels, **metadata["labels"]}
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": metadata,
        "spec": {
            "selector": {"matchLabels": labels(owner, "node")},
            "namespaceSelector": {"matchNames": [owner.namespace]},
            "endpoints": [
                {
                    "port": names.NODE_API_PORT_NAME,
                    "scheme": "https",
                    "path": names.METRICS_PATH,
                    "interval": spec.monitoring.interval,
                    "tlsConfig": {"insecureSkipVerify": True},
                }
            ],
        },
    }


def prometheus_rule(spec: ManagerSpec, owner: Owner) -> Manifest | None:
    """The alert rules (``alerting``), narrowed to this resource's nodes and operator metrics.

    Applied when the ServiceMonitor API exists: the Prometheus Operator always installs the
    ServiceMonitor and PrometheusRule CRDs together. Labelled like the ServiceMonitor, so that the
    same Prometheus ``ruleSelector`` finds it."""
    if not spec.monitoring.prometheus_rule:
        return None
    metadata = _metadata(owner, names.service_monitor_name(owner.name), "monitoring")
    metadata["labels"] = {**spec.monitoring.labels, **metadata["labels"]}
    service = names.headless_service_name(owner.name)
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": metadata,
        "spec": {"groups": alerting.rule_groups(owner.namespace, service, owner.name)},
    }


def service_account(owner: Owner) -> Manifest:
    """The nodes' identity. Nodes need no Kubernetes API access (they coordinate through the
    database), so no Role is bound and no token is mounted; a dedicated account keeps them from
    inheriting whatever the namespace's default account was granted."""
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _metadata(owner, names.service_account_name(owner.name), "node"),
        "automountServiceAccountToken": False,
    }


def api_key_secret(owner: Owner, api_key: str) -> Manifest:
    """The operator-managed bootstrap API key (created once, never rewritten)."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": _metadata(owner, names.api_key_secret_name(owner.name), "api-key"),
        "stringData": {names.API_KEY_SECRET_KEY: api_key},
    }


def children(
    spec: ManagerSpec,
    owner: Owner,
    *,
    replicas: int,
    default_repository: str,
    secrets_hash: str,
    service_monitor_api: bool,
) -> list[Manifest]:
    """Every child the operator applies on each pass, in creation order.

    The ServiceAccount and Services come before the StatefulSet so that the first pod finds
    them; the API-key Secret is created separately (once) because its content is random.
    """
    result: list[Manifest | None] = [
        service_account(owner),
        headless_service(owner),
        load_balancer_service(spec, owner),
        agent_load_balancer_service(spec, owner),
        pod_disruption_budget(spec, owner),
        service_monitor(spec, owner) if service_monitor_api else None,
        prometheus_rule(spec, owner) if service_monitor_api else None,
        statefulset(
            spec,
            owner,
            replicas=replicas,
            image=node_image(spec, default_repository),
            secrets_hash=secrets_hash,
        ),
    ]
    return [m for m in result if m is not None]


def unwanted_children(spec: ManagerSpec, owner: Owner) -> list[tuple[str, str, str]]:
    """(apiVersion, kind, name) of optional children the spec switched off; deleted if present."""
    result = []
    if not spec.load_balancer.enabled:
        result.append(("v1", "Service", names.load_balancer_service_name(owner.name)))
        result.append(("v1", "Service", names.agent_load_balancer_service_name(owner.name)))
    if not spec.pod_disruption_budget.enabled:
        result.append(("policy/v1", "PodDisruptionBudget", names.pdb_name(owner.name)))
    if not spec.monitoring.service_monitor:
        result.append(
            ("monitoring.coreos.com/v1", "ServiceMonitor", names.service_monitor_name(owner.name))
        )
    if not spec.monitoring.prometheus_rule:
        result.append(
            ("monitoring.coreos.com/v1", "PrometheusRule", names.service_monitor_name(owner.name))
        )
    return result


AGENT_SETTING_KEYS = (
    "managerAddress",
    "managerPort",
    "heartbeatAddress",
    "heartbeatPort",
    "relayAddress",
    "relayPort",
)


def agent_settings(
    spec: ManagerSpec, load_balancer_address: str | None, agent_address: str | None = None
) -> dict[str, Any] | None:
    """The cluster settings (``PATCH /api/settings``) that tell agents where to connect.

    ``nodeList``: every override cleared, so the managers hand out the list of node addresses.
    ``loadBalancer``: manager and relay point at the console's Service, heartbeats at the
    heartbeat channel's own Service (each its published port, TCP passthrough). ``None`` until
    both have an address.
    """
    if spec.agent_connection == "nodeList":
        return dict.fromkeys(AGENT_SETTING_KEYS)
    if not load_balancer_address or not agent_address:
        return None
    port = spec.load_balancer.port
    return {
        "managerAddress": load_balancer_address,
        "managerPort": port,
        "heartbeatAddress": agent_address,
        "heartbeatPort": port,
        "relayAddress": load_balancer_address,
        "relayPort": port,
    }
