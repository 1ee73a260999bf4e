"""A small HTTPS client for the ``dsm`` command (standard library only)."""

from __future__ import annotations

import json
import os
import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class ApiError(RuntimeError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def context_file() -> Path:
    return state_dir() / "context.json"


def state_dir() -> Path:
    if env := os.environ.get("DSM_STATE_DIR"):
        return Path(env)
    if os.getuid() == 0:  # PostgreSQL runs as another user and must reach its directory
        return Path("/var/lib/dsm")
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "dsm"


@dataclass
class Client:
    server: str
    ca_file: str | None = None
    insecure: bool = False
    api_key: str | None = None
    timeout: float = 30.0

    @classmethod
    def from_args(cls, server: str | None, ca_file: str | None, insecure: bool) -> Client:
        ctx: dict[str, Any] = {}
        if context_file().exists():
            ctx = json.loads(context_file().read_text())
        server = server or os.environ.get("DSM_SERVER") or ctx.get("server")
        if not server:
            raise ApiError(0, "no server: pass --server https://HOST:4119 or run `dsm up` first")
        return cls(
            server.rstrip("/"),
            ca_file or os.environ.get("DSM_CA_FILE") or ctx.get("caFile"),
            insecure,
            os.environ.get("DSM_API_KEY") or ctx.get("apiKey"),
        )

    def _ssl(self) -> ssl.SSLContext:
        if self.insecure:
            c = ssl.create_default_context()
            c.check_hostname = False
            c.verify_mode = ssl.CERT_NONE
            return c
        return ssl.create_default_context(cafile=self.ca_file)

    def request(self, method: str, path: str, body: Any = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.server + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        if self.api_key:
            req.add_header("Authorization", f"Bearer {self.api_key}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout, context=self._ssl()) as r:
                return json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            try:
                message = json.loads(e.read()).get("error", e.reason)
            except Exception:
                message = str(e.reason)
            raise ApiError(e.code, f"{e.code}: {message}") from None
        except (urllib.error.URLError, OSError) as e:
            raise ApiError(0, f"cannot reach {self.server}: {getattr(e, 'reason', e)}") from None
