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
    """A request that failed: ``status`` is the HTTP status, 0 when no answer came."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class ConnectionSettingsError(ApiError):
    """The connection settings themselves are wrong (no request was sent)."""

    def __init__(self, message: str) -> None:
        super().__init__(0, message)


def _first(*candidates: tuple[str, Any]) -> tuple[Any, str]:
    """The first value given, and where it came from."""
    for source, value in candidates:
        if value:
            return value, source
    return None, ""


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
    def from_args(
        cls,
        server: str | None,
        ca_file: str | None,
        insecure: bool,
        api_key: str | None = None,
    ) -> Client:
        """The connection from flags, else the environment, else ``dsm up``'s context file;
        raises ApiError (status 0: our input) naming where a bad value came from."""
        ctx: dict[str, Any] = {}
        ctx_path = context_file()
        if ctx_path.exists():
            try:
                ctx = json.loads(ctx_path.read_text())
            except (OSError, ValueError) as e:
                raise ConnectionSettingsError(f"cannot read {ctx_path}: {e}") from None
        server, server_from = _first(
            ("--server", server),
            ("DSM_SERVER", os.environ.get("DSM_SERVER")),
            (str(ctx_path), ctx.get("server")),
        )
        if not server:
            raise ConnectionSettingsError(
                "no server: pass --server https://HOST:4119 or run `dsm up` first"
            )
        if not server.lower().startswith("https://"):
            raise ConnectionSettingsError(
                f"the server URL must start with https:// (nodes speak only TLS), got {server!r}"
                f" from {server_from}",
            )
        ca, ca_from = _first(
            ("--ca-file", ca_file),
            ("DSM_CA_FILE", os.environ.get("DSM_CA_FILE")),
            (str(ctx_path), ctx.get("caFile")),
        )
        if ca and not insecure and not Path(ca).is_file():
            raise ConnectionSettingsError(
                f"the CA file {ca} (from {ca_from}) does not exist: pass --ca-file with the "
                "nodes' CA certificate",
            )
        key, _ = _first(
            ("--api-key", api_key),
            ("DSM_API_KEY", os.environ.get("DSM_API_KEY")),
            (str(ctx_path), ctx.get("apiKey")),
        )
        return cls(server.rstrip("/"), ca, insecure, key)

    def _ssl(self) -> ssl.SSLContext:
        """Certificate checks on (the CA file was checked to exist in from_args)."""
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
            context = self._ssl()
        except (OSError, ssl.SSLError) as e:
            raise ConnectionSettingsError(f"cannot use the CA file {self.ca_file}: {e}") from None
        try:
            with urllib.request.urlopen(req, timeout=self.timeout, context=context) as r:
                return json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            try:
                message = json.loads(e.read()).get("error", e.reason)
            except Exception:
                message = str(e.reason)
            raise ApiError(e.code, f"{e.code}: {message}") from None
        except (urllib.error.URLError, OSError) as e:
            raise ApiError(0, f"cannot reach {self.server}: {getattr(e, 'reason', e)}") from None
