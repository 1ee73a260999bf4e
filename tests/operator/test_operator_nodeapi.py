"""The operator's node-API client against a real HTTPS server on 127.0.0.1 (aiohttp), with a
certificate for the pod's stable DNS name: verification by SNI while dialling the IP."""

from __future__ import annotations

import datetime
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from tests.support import pki

from dsm_operator.gateways import nodeapi

SERVER_NAME = "mgr-0.mgr-nodes.ns.svc"
KEY = "test-api-key"


def _certificate(tmp: Path, name: str) -> tuple[Path, Path, bytes]:
    """A self-signed certificate for the pod's stable DNS name, as a node makes its own."""
    issued = pki.self_signed(name, dns=[name], validity=datetime.timedelta(hours=1))
    cert_path, key_path = issued.write(tmp / "tls.crt", tmp / "tls.key")
    return cert_path, key_path, issued.cert_pem


class FakeNode:
    def __init__(self) -> None:
        self.decommissioned: list[str] = []
        self.patched: list[dict[str, Any]] = []
        self.statuses = {"mgr-0": "Online", "mgr-3": "Offline", "mgr-4": "Online"}

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/api/nodes", self.nodes)
        app.router.add_post("/api/nodes/{name}/decommission", self.decommission)
        app.router.add_patch("/api/settings", self.settings)
        return app

    def _authorized(self, request: web.Request) -> bool:
        return request.headers.get("Authorization") == f"Bearer {KEY}"

    async def nodes(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return web.json_response({"error": "unauthorized"}, status=401)
        return web.json_response(
            {
                "nodes": [
                    {"name": n, "status": s, "version": "1.0.0", "address": "127.0.0.1"}
                    for n, s in self.statuses.items()
                ]
            }
        )

    async def settings(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return web.json_response({"error": "unauthorized"}, status=401)
        body = await request.json()
        if "bogus" in body:
            return web.json_response({"error": "unknown setting(s): bogus"}, status=400)
        self.patched.append(body)
        return web.json_response({"settings": body})

    async def decommission(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return web.json_response({"error": "unauthorized"}, status=401)
        name = request.match_info["name"]
        if name not in self.statuses:
            return web.json_response({}, status=404)
        if self.statuses[name] != "Offline":
            return web.json_response({}, status=409)
        self.statuses[name] = "Decommissioned"
        self.decommissioned.append(name)
        return web.json_response({})


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[tuple[FakeNode, int, bytes]]:
    cert, key, pem = _certificate(tmp_path, SERVER_NAME)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    node = FakeNode()
    runner = web.AppRunner(node.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield node, port, pem
    finally:
        await runner.cleanup()


def _target(port: int, name: str = SERVER_NAME) -> nodeapi.Target:
    return nodeapi.Target("127.0.0.1", name, port=port)


async def test_list_nodes_verified_by_sni(server: tuple[FakeNode, int, bytes]) -> None:
    _, port, pem = server
    api = nodeapi.NodeApi(KEY, pem, timeout=5)
    reports = await api.list_nodes(_target(port))
    assert {r.name: r.status for r in reports} == {
        "mgr-0": "Online",
        "mgr-3": "Offline",
        "mgr-4": "Online",
    }


async def test_wrong_name_fails_verification(server: tuple[FakeNode, int, bytes]) -> None:
    _, port, pem = server
    api = nodeapi.NodeApi(KEY, pem, timeout=5)
    with pytest.raises(Exception, match=r"(?i)certificate|hostname"):
        await api.list_nodes(_target(port, "mgr-1.mgr-nodes.ns.svc"))


async def test_without_a_ca_the_self_signed_node_is_accepted(
    server: tuple[FakeNode, int, bytes],
) -> None:
    _, port, _ = server
    api = nodeapi.NodeApi(KEY, None, timeout=5)
    assert len(await api.list_nodes(_target(port, "anything"))) == 3


async def test_wrong_key_is_an_error(server: tuple[FakeNode, int, bytes]) -> None:
    _, port, pem = server
    api = nodeapi.NodeApi("wrong", pem, timeout=5)
    with pytest.raises(nodeapi.NodeApiError, match="401"):
        await api.list_nodes(_target(port))


@pytest.mark.parametrize(("node", "code"), [("mgr-3", 200), ("mgr-4", 409), ("mgr-9", 404)])
async def test_decommission(server: tuple[FakeNode, int, bytes], node: str, code: int) -> None:
    fake, port, pem = server
    api = nodeapi.NodeApi(KEY, pem, timeout=5)
    assert await api.decommission(_target(port), node) == code
    assert fake.decommissioned == (["mgr-3"] if code == 200 else [])


async def test_patch_settings(server: tuple[FakeNode, int, bytes]) -> None:
    fake, port, pem = server
    api = nodeapi.NodeApi(KEY, pem, timeout=5)
    await api.patch_settings(_target(port), {"managerAddress": "lb", "managerPort": 443})
    assert fake.patched == [{"managerAddress": "lb", "managerPort": 443}]
    with pytest.raises(nodeapi.NodeApiError, match=r"400 .*bogus"):
        await api.patch_settings(_target(port), {"bogus": 1})
