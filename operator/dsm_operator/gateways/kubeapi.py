"""The one place that talks to the Kubernetes API (besides kopf itself).

Synchronous on purpose: it wraps the official client's ``DynamicClient`` (which covers the
ServiceMonitor CRD without generated classes); the handlers call it through
``asyncio.to_thread`` so the event loop never blocks. Children are written with server-side
apply under one field manager, so every pass re-asserts exactly the fields the operator owns
and leaves everything else (other controllers' fields, user annotations) alone.

Which object may be written at all is decided in ``reconcile/ownership.py``; this module offers
the writes that rule needs: a create that fails when the name is taken, an apply pinned to one
uid, a delete with a uid precondition. A write the API server refuses for good (a 4xx other than
a conflict or throttling) is raised as :class:`Refused`, which the pass reports in the status.
"""

from __future__ import annotations

import base64
import importlib.metadata
import json
import logging
import os
import threading
import time
from typing import Any

from kubernetes import client, config, dynamic
from kubernetes.client import exceptions

from dsm_operator.reconcile import names

logger = logging.getLogger(__name__)


class Refused(Exception):
    """The API server refused a write, and repeating it unchanged will not help (a 4xx other
    than 409 Conflict and 429 Too Many Requests): invalid (422), forbidden (403), bad (400)."""

    def __init__(self, what: str, status: int, message: str) -> None:
        super().__init__(f"{what}: {status} {message}")
        self.what = what
        self.status = status
        self.message = message


def _message(exc: exceptions.ApiException) -> str:
    """The API server's own message (a Status body), else the HTTP reason."""
    try:
        body = json.loads(exc.body or "")
    except (TypeError, ValueError):
        body = None
    if isinstance(body, dict) and body.get("message"):
        return str(body["message"])
    return str(exc.reason or "")


def _refused(exc: exceptions.ApiException, what: str) -> Refused | None:
    status = int(exc.status or 0)
    if 400 <= status < 500 and status not in (409, 429):
        return Refused(what, status, _message(exc))
    return None


def secret_values(secret: dict[str, Any]) -> dict[str, bytes]:
    """The decoded ``data`` of a Secret body."""
    return {k: base64.b64decode(v) for k, v in (secret.get("data") or {}).items()}


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
        """Server-side apply, taking ownership of conflicting fields.

        Callers pin ``metadata.uid`` (``ownership.pinned``) so that the write reaches only the
        object whose ownership they checked.
        """
        res = self._resource(manifest["apiVersion"], manifest["kind"])
        meta = manifest["metadata"]
        try:
            result = self._client.server_side_apply(  # type: ignore[no-untyped-call]
                res,
                body=manifest,
                name=meta["name"],
                namespace=meta.get("namespace"),
                field_manager=names.FIELD_MANAGER,
                force_conflicts=True,
            )
        except exceptions.ApiException as exc:
            refused = _refused(exc, f"apply {manifest['kind']} {meta['name']}")
            if refused is not None:
                raise refused from exc
            raise
        return dict(result.to_dict())

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        res = self._resource(api_version, kind)
        try:
            return dict(res.get(name=name, namespace=namespace).to_dict())
        except exceptions.ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def delete(self, api_version: str, kind: str, namespace: str, name: str, uid: str) -> bool:
        """Delete the object ``name`` only if it is still the one with ``uid`` (a uid
        precondition); ``True`` when something was deleted."""
        try:
            res = self._resource(api_version, kind)
        except dynamic.exceptions.ResourceNotFoundError:
            return False
        try:
            res.delete(name=name, namespace=namespace, body={"preconditions": {"uid": uid}})
        except exceptions.ApiException as exc:
            if exc.status in (404, 409):
                return False
            raise
        return True

    def create(self, manifest: dict[str, Any]) -> dict[str, Any] | None:
        """Create, or ``None`` when anything of that name exists (never touches it).

        The created object's fields are then recorded as *applied* by the operator's field
        manager, exactly as if server-side apply had created it: later applies own them alone,
        so a field the operator stops setting is removed instead of staying co-owned by a
        create-time ``Update`` entry.
        """
        res = self._resource(manifest["apiVersion"], manifest["kind"])
        meta = manifest["metadata"]
        try:
            created = res.create(
                body=manifest,
                namespace=meta.get("namespace"),
                field_manager=names.FIELD_MANAGER,
            )
        except exceptions.ApiException as exc:
            if exc.status == 409:
                return None
            refused = _refused(exc, f"create {manifest['kind']} {meta['name']}")
            if refused is not None:
                raise refused from exc
            raise
        body = dict(created.to_dict())
        self._claim_as_applied(res, body)
        return body

    def _claim_as_applied(self, res: Any, body: dict[str, Any]) -> None:
        """Turn the operator's ``Update`` entry in ``managedFields`` into an ``Apply`` entry
        (what kubectl does when it moves an object from client-side to server-side apply)."""
        meta = body.get("metadata") or {}
        for _attempt in range(3):
            entries = meta.get("managedFields") or meta.get("managed_fields") or []
            index = next(
                (
                    i
                    for i, e in enumerate(entries)
                    if e.get("manager") == names.FIELD_MANAGER
                    and e.get("operation") == "Update"
                    and not e.get("subresource")
                ),
                None,
            )
            if index is None:
                return
            path = f"/metadata/managedFields/{index}"
            patch = [
                {"op": "test", "path": "/metadata/uid", "value": meta.get("uid")},
                {"op": "test", "path": f"{path}/manager", "value": names.FIELD_MANAGER},
                {"op": "test", "path": f"{path}/operation", "value": "Update"},
                {"op": "replace", "path": f"{path}/operation", "value": "Apply"},
            ]
            try:
                res.patch(
                    name=meta["name"],
                    namespace=meta.get("namespace"),
                    body=patch,
                    content_type="application/json-patch+json",
                )
                return
            except exceptions.ApiException as exc:
                if exc.status == 404:
                    return
                if exc.status not in (409, 422):
                    raise
            # Another writer moved the entries: read them again.
            try:
                current = res.get(name=meta["name"], namespace=meta.get("namespace")).to_dict()
            except exceptions.ApiException as exc:
                if exc.status == 404:
                    return
                raise
            if (current.get("metadata") or {}).get("uid") != meta.get("uid"):
                return
            meta = current.get("metadata") or {}
        logger.warning("could not record the created fields of %s as applied", meta.get("name"))

    # --- specific ------------------------------------------------------------------------

    def secret_data(self, namespace: str, name: str) -> dict[str, bytes] | None:
        """The decoded data of a Secret, or ``None`` when it does not exist."""
        secret = self.get("v1", "Secret", namespace, name)
        return None if secret is None else secret_values(secret)

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
