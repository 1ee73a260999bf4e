"""Calls to the manager nodes' own HTTPS API (docs/node-contract.md).

The operator dials a node by its pod IP taken from the pod's status, never through Service DNS:
the headless Service's names may not resolve from the operator's pod (another namespace, or a
test machine), and the pod IP names exactly the node that answers.

TLS: nodes terminate TLS themselves. When ``spec.tls`` names a Secret, the operator verifies the
node's certificate against that Secret's ``ca.crt`` (or ``tls.crt`` for a self-signed one) and
against the node's stable DNS name ``<pod>.<name>-nodes.<namespace>.svc``, sent as SNI while the
TCP connection goes to the pod IP. Without ``spec.tls`` every node generates a self-signed pair
that nobody can verify, so verification is skipped -- only for these pod-IP calls, and the calls
carry only the bootstrap API key that the same nodes already hold.
"""

from __future__ import annotations

import dataclasses
import ssl
from typing import Any

import aiohttp

from dsm_operator.reconcile import names
from dsm_operator.reconcile.statuses import NodeReport


class NodeApiError(Exception):
    """A node's API did not answer as the contract says."""


@dataclasses.dataclass(frozen=True)
class Target:
    """One node to call: where to connect and what name its certificate should carry."""

    address: str
    server_name: str
    port: int = names.NODE_API_PORT

    @property
    def base_url(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"https://{host}:{self.port}"


def ssl_context(ca_pem: bytes | None) -> ssl.SSLContext:
    """A verifying context for ``ca_pem``, or a non-verifying one when there is no CA."""
    if ca_pem:
        ctx = ssl.create_default_context(cadata=ca_pem.decode())
        ctx.check_hostname = True
        return ctx
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


class NodeApi:
    def __init__(self, api_key: str, ca_pem: bytes | None, timeout: float) -> None:
        self._headers = {"Authorization": f"Bearer {api_key}", "Accept": "application/json"}
        self._ssl = ssl_context(ca_pem)
        self._verify = bool(ca_pem)
        self._timeout = aiohttp.ClientTimeout(total=timeout)

    def _kwargs(self, target: Target) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"ssl": self._ssl, "headers": self._headers}
        if self._verify:
            kwargs["server_hostname"] = target.server_name
        return kwargs

    async def list_nodes(self, target: Target) -> list[NodeReport]:
        async with (
            aiohttp.ClientSession(timeout=self._timeout) as session,
            session.get(f"{target.base_url}{names.NODES_PATH}", **self._kwargs(target)) as resp,
        ):
            if resp.status != 200:
                raise NodeApiError(f"GET {names.NODES_PATH} on {target.address}: {resp.status}")
            body = await resp.json(content_type=None)
        return parse_nodes(body)

    async def decommission(self, target: Target, node: str) -> int:
        """POST the decommission; returns the HTTP status (200 done, 409 not offline, 404)."""
        url = f"{target.base_url}{names.DECOMMISSION_PATH.format(name=node)}"
        async with (
            aiohttp.ClientSession(timeout=self._timeout) as session,
            session.post(url, **self._kwargs(target)) as resp,
        ):
            if resp.status not in (200, 204, 404, 409):
                raise NodeApiError(f"POST decommission {node} on {target.address}: {resp.status}")
            return resp.status

    async def patch_settings(self, target: Target, values: dict[str, Any]) -> None:
        """``PATCH /api/settings`` with camelCase keys; any answer but 200 is an error."""
        async with (
            aiohttp.ClientSession(timeout=self._timeout) as session,
            session.patch(
                f"{target.base_url}{names.SETTINGS_PATH}", json=values, **self._kwargs(target)
            ) as resp,
        ):
            if resp.status != 200:
                text = (await resp.text())[:200]
                raise NodeApiError(f"PATCH {names.SETTINGS_PATH}: {resp.status} {text}")


def parse_nodes(body: Any) -> list[NodeReport]:
    """The ``GET /api/nodes`` body as reports; malformed entries are an error, not skipped."""
    if not isinstance(body, dict) or not isinstance(body.get("nodes"), list):
        raise NodeApiError("GET /api/nodes: body has no 'nodes' list")
    reports = []
    for entry in body["nodes"]:
        if not isinstance(entry, dict) or not entry.get("name") or not entry.get("status"):
            raise NodeApiError(f"GET /api/nodes: malformed entry {entry!r}")
        reports.append(
            NodeReport(
                name=str(entry["name"]),
                status=str(entry["status"]),
                version=str(entry["version"]) if entry.get("version") else None,
                address=str(entry["address"]) if entry.get("address") else None,
            )
        )
    return reports
