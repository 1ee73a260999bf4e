"""The one place that talks to the Kubernetes API (besides kopf itself).

Synchronous on purpose: it wraps the official client's ``DynamicClient`` (which covers the
ServiceMonitor CRD without generated classes); the handlers call it through
``asyncio.to_thread`` so the event loop never blocks. Children are written with server-side
apply under one field manager, so every pass re-asserts exactly the fields the operator owns
and leaves everything else (other controllers' fields, user annotations) alone.
"""

from __future__ import annotations

import base64
import importlib.metadata
import logging
import os
import threading
import time
from typing import Any

from kubernetes import client, config, dynamic
from kubernetes.client import exceptions

from dsm_operator.reconcile import names

logger = logging.getLogger(__name__)


def user_agent() -> str:
    """``dsm-operator/<version>``: names the operator in the API server's audit log."""
    try:
        version = importlib.metadata.version("dsm")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return f"{names.USER_AGENT}/{version}"


class KubeGateway:
    def __init__(self, api_client: Any | None = None) -> None:
        if api_client is None:
            try:
                config.load_incluster_config()  # type: ignore[no-untyped-call]
            except config.ConfigException:
                # The client reads $KUBECONFIG once, at import; read it now instead.
                config.load_kube_config(  # type: ignore[no-untyped-call]
                    config_file=os.environ.get("KUBECONFIG")
                )
            api_client = client.ApiClient()
        api_client.user_agent = user_agent()
        self._api_client = api_client
        self._client = dynamic.DynamicClient(api_client)  # type: ignore[no-untyped-call]
        self._lock = threading.Lock()
        self._service_monitor_api = False
        self._service_monitor_checked = 0.0

    def close(self) -> None:
        """Close the connection pool (an operator stopped in-process leaves no sockets)."""
        self._api_client.close()

    def _resource(self, api_version: str, kind: str) -> Any:
        with self._lock:  # discovery cache is not thread-safe
            return self._client.resources.get(api_version=api_version, kind=kind)

    # --- generic -------------------------------------------------------------------------

    def apply(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Server-side apply, taking ownership of conflicting fields."""
        res = self._resource(manifest["apiVersion"], manifest["kind"])
        meta = manifest["metadata"]
        result = self._client.server_side_apply(  # type: ignore[no-untyped-call]
            res,
            body=manifest,
            name=meta["name"],
            namespace=meta.get("namespace"),
            field_manager=names.FIELD_MANAGER,
            force_conflicts=True,
        )
        return dict(result.to_dict())

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        res = self._resource(api_version, kind)
        try:
            return dict(res.get(name=name, namespace=namespace).to_dict())
        except exceptions.ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def delete(self, api_version: str, kind: str, namespace: str, name: str) -> bool:
        """Delete if present; ``True`` when something was deleted."""
        try:
            res = self._resource(api_version, kind)
        except dynamic.exceptions.ResourceNotFoundError:
            return False
        try:
            res.delete(name=name, namespace=namespace)
        except exceptions.ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return True

    def create(self, manifest: dict[str, Any]) -> bool:
        """Create unless it exists; ``True`` when created."""
        res = self._resource(manifest["apiVersion"], manifest["kind"])
        try:
            res.create(body=manifest, namespace=manifest["metadata"].get("namespace"))
        except exceptions.ApiException as exc:
            if exc.status == 409:
                return False
            raise
        return True

    # --- specific ------------------------------------------------------------------------

    def secret_data(self, namespace: str, name: str) -> dict[str, bytes] | None:
        """The decoded data of a Secret, or ``None`` when it does not exist."""
        secret = self.get("v1", "Secret", namespace, name)
        if secret is None:
            return None
        data = secret.get("data") or {}
        return {k: base64.b64decode(v) for k, v in data.items()}

    def list_pods(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        res = self._resource("v1", "Pod")
        items = res.get(namespace=namespace, label_selector=selector).to_dict()["items"]
        return [dict(p) for p in items]

    def delete_pod(self, namespace: str, name: str, uid: str | None) -> bool:
        """Delete one pod, only if it is still the same pod (uid precondition)."""
        res = self._resource("v1", "Pod")
        body = {"preconditions": {"uid": uid}} if uid else None
        try:
            res.delete(name=name, namespace=namespace, body=body)
        except exceptions.ApiException as exc:
            if exc.status in (404, 409):
                return False
            raise
        return True

    def service_monitor_api(self, recheck_seconds: float = 300.0) -> bool:
        """Whether the monitoring.coreos.com ServiceMonitor API is served.

        A positive answer is kept; a negative one is re-checked (with a fresh discovery) at most
        every ``recheck_seconds``, so installing the Prometheus Operator later is noticed.
        """
        if self._service_monitor_api:
            return True
        now = time.monotonic()
        if self._service_monitor_checked and now - self._service_monitor_checked < recheck_seconds:
            return False
        if self._service_monitor_checked:
            with self._lock:
                self._client.resources.invalidate_cache()
        self._service_monitor_checked = now
        try:
            self._resource("monitoring.coreos.com/v1", "ServiceMonitor")
        except dynamic.exceptions.ResourceNotFoundError:
            return False
        self._service_monitor_api = True
        return True
