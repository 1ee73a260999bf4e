"""A small, thread-safe Kubernetes REST client on plain ``http.client``: :class:`KubeApi` (calls,
server-side apply, merge patches, watches) and :class:`ApiError`. Used by the mini kubelet and the
e2e tier.

Why not the official client: the mini kubelet needs exact control over content types (merge
patches of the status subresource, server-side apply), watch streams (resourceVersion, bookmarks,
410 Gone, closing a stream from another thread) and plain dictionaries; the official client's
models and signatures change between releases. Every call opens its own connection (loopback,
milliseconds), so any thread may call anything.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import socket
import ssl
import tempfile
import threading
import urllib.parse
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

MERGE_PATCH = "application/merge-patch+json"
APPLY_PATCH = "application/apply-patch+yaml"


class ApiError(Exception):
    def __init__(self, status: int, body: Any, what: str) -> None:
        super().__init__(f"{what}: HTTP {status}: {body}")
        self.status = status
        self.body = body


class KubeApi:
    """REST calls with the admin client certificate of a kubeconfig (data embedded or files)."""

    def __init__(self, kubeconfig: Path, timeout: float = 30.0) -> None:
        doc = yaml.safe_load(kubeconfig.read_text())
        ctx_name = doc.get("current-context")
        context = next(
            (c["context"] for c in doc["contexts"] if c["name"] == ctx_name),
            doc["contexts"][0]["context"],
        )
        cluster = next(c["cluster"] for c in doc["clusters"] if c["name"] == context["cluster"])
        user = next(u["user"] for u in doc["users"] if u["name"] == context["user"])
        server = urllib.parse.urlsplit(cluster["server"])
        self.host = server.hostname or "127.0.0.1"
        self.port = server.port or 443
        self.timeout = timeout
        if "certificate-authority-data" in cluster:
            ca = base64.b64decode(cluster["certificate-authority-data"]).decode()
            self._ssl = ssl.create_default_context(cadata=ca)
        else:
            self._ssl = ssl.create_default_context(cafile=cluster["certificate-authority"])
        with tempfile.TemporaryDirectory(prefix="e2e-kubeapi-") as tmp:
            cert, key = Path(tmp) / "c.pem", Path(tmp) / "k.pem"
            for path, data_key, file_key in (
                (cert, "client-certificate-data", "client-certificate"),
                (key, "client-key-data", "client-key"),
            ):
                if data_key in user:
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
                    with os.fdopen(fd, "wb") as f:
                        f.write(base64.b64decode(user[data_key]))
                else:
                    path.write_bytes(Path(user[file_key]).read_bytes())
            self._ssl.load_cert_chain(str(cert), str(key))
        self._watches: set[http.client.HTTPSConnection] = set()
        self._lock = threading.Lock()

    # -- plain calls ------------------------------------------------------------------------

    def _connect(self, timeout: float | None = None) -> http.client.HTTPSConnection:
        return http.client.HTTPSConnection(
            self.host, self.port, timeout=timeout or self.timeout, context=self._ssl
        )

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        query: Mapping[str, Any] | None = None,
        content_type: str = "application/json",
    ) -> tuple[int, Any]:
        """(HTTP status, decoded JSON body or None)."""
        if query:
            path += "?" + urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
        payload = None
        if body is not None:
            payload = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        conn = self._connect()
        try:
            conn.request(
                method,
                path,
                body=payload,
                headers={"Accept": "application/json", "Content-Type": content_type},
            )
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        try:
            decoded = json.loads(data) if data else None
        except json.JSONDecodeError:
            decoded = data.decode(errors="replace")
        return resp.status, decoded

    def expect(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        ok: tuple[int, ...] = (200, 201, 202),
        query: Mapping[str, Any] | None = None,
        content_type: str = "application/json",
    ) -> Any:
        status, reply = self.call(method, path, body, query=query, content_type=content_type)
        if status not in ok:
            raise ApiError(status, reply, f"{method} {path}")
        return reply

    def get(self, path: str) -> dict[str, Any] | None:
        status, reply = self.call("GET", path)
        if status == 404:
            return None
        if status != 200:
            raise ApiError(status, reply, f"GET {path}")
        assert isinstance(reply, dict)
        return reply

    def merge_patch(self, path: str, patch: Mapping[str, Any]) -> Any:
        return self.expect("PATCH", path, dict(patch), content_type=MERGE_PATCH)

    def apply(self, path: str, manifest: Mapping[str, Any], manager: str = "dsm-e2e") -> Any:
        """Server-side apply (JSON is valid YAML), forcing conflicts."""
        return self.expect(
            "PATCH",
            path,
            json.dumps(manifest),
            query={"fieldManager": manager, "force": "true"},
            content_type=APPLY_PATCH,
        )

    # -- watches ----------------------------------------------------------------------------

    def watch(
        self, path: str, query: Mapping[str, Any], server_timeout: int = 60
    ) -> Iterator[dict[str, Any]]:
        """One watch request: yields events until the server ends it (``server_timeout``) or
        :meth:`close_watches` cuts it. Raises ApiError for a non-200 answer."""
        params = {
            **query,
            "watch": "1",
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(server_timeout),
        }
        conn = self._connect(timeout=server_timeout + 30)
        with self._lock:
            self._watches.add(conn)
        try:
            conn.request(
                "GET",
                path + "?" + urllib.parse.urlencode(params),
                headers={"Accept": "application/json"},
            )
            resp = conn.getresponse()
            if resp.status != 200:
                raise ApiError(resp.status, resp.read().decode(errors="replace"), f"watch {path}")
            for line in resp:
                if line.strip():
                    yield json.loads(line)
        finally:
            with self._lock:
                self._watches.discard(conn)
            conn.close()

    def close_watches(self) -> None:
        """Unblocks every watch stream that is waiting for data (used to stop threads)."""
        with self._lock:
            conns = list(self._watches)
        for conn in conns:
            sock = conn.sock
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
