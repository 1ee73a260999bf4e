"""Operator settings, from environment variables with the ``DSM_OPERATOR_`` prefix."""

from __future__ import annotations

import ipaddress

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class OperatorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DSM_OPERATOR_", frozen=True)

    node_image_repository: str = "ghcr.io/dsm-dev/dsm-node"
    """Repository of the node image; the tag is ``spec.version`` unless ``spec.image`` is set."""

    reconcile_interval_seconds: float = Field(default=10.0, gt=0)
    """How often each resource is re-examined (level-based reconcile timer)."""

    node_api_enabled: bool = True
    """Whether to call the nodes' HTTPS API at all (node list, decommission)."""

    node_api_networks: list[str] = Field(default_factory=list)
    """CIDRs the operator may dial pod IPs in; empty means any. Tests set ``127.0.0.0/8``
    so that the operator never dials a simulated pod's private address."""

    node_api_timeout_seconds: float = Field(default=5.0, gt=0)
    """Timeout of one call to a node's API."""

    metrics_port: int = Field(default=8080, ge=0, le=65535)
    """Port of the operator's own Prometheus ``/metrics``; 0 turns it off."""

    metrics_address: str = "0.0.0.0"
    """Address the metrics endpoint binds to."""

    liveness_endpoint: str = "http://0.0.0.0:8081/healthz"
    """kopf's liveness endpoint (``--liveness``); empty turns it off."""

    @field_validator("node_api_networks")
    @classmethod
    def _valid_networks(cls, value: list[str]) -> list[str]:
        for cidr in value:
            ipaddress.ip_network(cidr, strict=False)
        return value

    def may_dial(self, address: str | None) -> bool:
        """Whether the operator may connect to a pod at ``address``."""
        if not address or not self.node_api_enabled:
            return False
        if not self.node_api_networks:
            return True
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in ipaddress.ip_network(c, strict=False) for c in self.node_api_networks)
