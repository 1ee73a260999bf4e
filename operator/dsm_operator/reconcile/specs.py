"""The ``DeepSecurityManager`` spec as typed Python values.

The CRD schema (crds/deepsecuritymanagers.yaml) is the source of truth and the API server has
already validated and defaulted every object before the operator sees it. This model repeats the
defaults only so that the pure code can be fed a partial spec in tests, and so that every other
module reads attributes instead of walking dictionaries. Unknown keys are ignored, not refused:
refusing is the API server's job, and a newer CRD must not break an older operator.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="ignore", frozen=True
    )


class SecretKeyRef(_Model):
    name: str
    key: str


class DatabaseSecretRef(SecretKeyRef):
    key: str = "url"


class LocalSecretRef(SecretKeyRef):
    key: str = "localSecret"


class Database(_Model):
    secret_ref: DatabaseSecretRef


class MasterKey(_Model):
    local_secret_ref: LocalSecretRef


class SecretRef(_Model):
    name: str


class Tls(_Model):
    secret_ref: SecretRef


class LoadBalancer(_Model):
    enabled: bool = True
    port: int = 443
    service_type: Literal["LoadBalancer", "NodePort", "ClusterIP"] = "LoadBalancer"
    annotations: dict[str, str] = Field(default_factory=dict)
    source_ranges: list[str] = Field(default_factory=list)
    external_traffic_policy: Literal["Cluster", "Local"] = "Cluster"


class Resources(_Model):
    limits: dict[str, int | str] = Field(default_factory=dict)
    requests: dict[str, int | str] = Field(default_factory=dict)


class Scheduling(_Model):
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[dict[str, Any]] = Field(default_factory=list)
    affinity: dict[str, Any] | None = None
    topology_spread_constraints: list[dict[str, Any]] = Field(default_factory=list)
    priority_class_name: str | None = None


class PodDisruptionBudget(_Model):
    enabled: bool = True
    max_unavailable: int | str = 1


class Monitoring(_Model):
    service_monitor: bool = True
    prometheus_rule: bool = True
    interval: str = "30s"
    labels: dict[str, str] = Field(default_factory=dict)


class ImagePullSecret(_Model):
    name: str


class ManagerSpec(_Model):
    """``spec`` of a DeepSecurityManager; field docs live in the CRD (``kubectl explain``)."""

    version: str
    image: str | None = None
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    image_pull_secrets: list[ImagePullSecret] = Field(default_factory=list)
    nodes: int = 1
    database: Database
    master_key: MasterKey
    time_zone: str = "UTC"
    offline_threshold_seconds: int = 180
    node_ready_timeout_seconds: int = 900
    paused: bool = False
    agent_connection: Literal["nodeList", "loadBalancer"] = "nodeList"
    load_balancer: LoadBalancer = Field(default_factory=LoadBalancer)
    tls: Tls | None = None
    resources: Resources = Field(default_factory=Resources)
    scheduling: Scheduling = Field(default_factory=Scheduling)
    pod_disruption_budget: PodDisruptionBudget = Field(default_factory=PodDisruptionBudget)
    monitoring: Monitoring = Field(default_factory=Monitoring)
    pod_annotations: dict[str, str] = Field(default_factory=dict)
    pod_labels: dict[str, str] = Field(default_factory=dict)

    @classmethod
    def parse(cls, spec: Any) -> ManagerSpec:
        """Build from the ``spec`` mapping of a resource body."""
        return cls.model_validate(dict(spec))


class Owner(_Model):
    """What the children need to know about the resource that owns them."""

    name: str
    namespace: str
    uid: str


class SecretInputs(_Model):
    """Contents of the Secrets the pods read; only their hash ends up in a manifest.

    Each value is the raw bytes of the key the pods use (``None`` when absent), so that a change
    elsewhere in the same Secret does not roll the pods.
    """

    database_url: bytes | None = None
    local_secret: bytes | None = None
    api_key: bytes | None = None
    tls: dict[str, bytes] = Field(default_factory=dict)
