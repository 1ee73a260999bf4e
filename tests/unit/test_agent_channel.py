"""The heartbeat channel's connection handling, over plain loopback TCP (TLS is tested with real
nodes in ``tests/integration/test_agents_hostile.py``): an answer sent before the body has arrived
must reach a client that is still sending, which takes a lingering close."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Iterator

import pytest

from dsm_node.agents import protocol
from dsm_node.agents.channel import Answer, ChannelProtocol, Request

PATIENCE = 20.0  # a socket timeout far beyond any linger used below


async def _ok(request: Request) -> Answer:
    return Answer(200, b"{}")


@pytest.fixture
def serve() -> Iterator[object]:
    """serve(linger, linger_bytes) -> port of a channel server on a loop in a thread."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    servers: list[asyncio.Server] = []
    connections: list[Tracked] = []

    def start(linger: float, linger_bytes: int = 4 << 20) -> int:
        def connection() -> Tracked:
            connections.append(Tracked(_ok, 5.0, 5.0, linger, linger_bytes))
            return connections[-1]

        async def make() -> asyncio.Server:
            return await loop.create_server(connection, "127.0.0.1", 0)

        server = asyncio.run_coroutine_threadsafe(make(), loop).result(10)
        servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    yield start

    def stop() -> None:
        for server in servers:
            server.close()
        for c in connections:
            if c.transport is not None:
                c.transport.abort()
        loop.call_soon(loop.stop)

    loop.call_soon_threadsafe(stop)
    thread.join(10)
    loop.close()


class Tracked(ChannelProtocol):
    """Remembers its transport, for the fixture to close what a test left open."""

    transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        super().connection_made(transport)


def _post(length: int, body: bytes) -> bytes:
    head = (
        f"POST {protocol.PATH_HEARTBEAT} HTTP/1.1\r\nHost: x\r\n"
        f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    )
    return head.encode() + body


def _exchange(port: int, data: bytes) -> bytes:
    """Sends all of ``data``, then reads to the end; raises on a reset or a timeout."""
    with socket.create_connection(("127.0.0.1", port), timeout=PATIENCE) as s:
        s.sendall(data)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def _status_and_code(raw: bytes) -> tuple[int, str]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), json.loads(body)["code"]


@pytest.mark.parametrize("extra", [1, 3 << 20])
def test_too_large_body_answer_reaches_a_client_still_sending(serve, extra: int) -> None:  # type: ignore[no-untyped-def]
    # a long linger: the connection must close because the announced body is complete
    port = serve(PATIENCE * 10)
    size = protocol.MAX_HEARTBEAT_BODY + extra
    raw = _exchange(port, _post(size, b" " * size))
    assert _status_and_code(raw) == (413, "too_large")


def test_head_too_large_answer_reaches_a_client_still_sending(serve) -> None:  # type: ignore[no-untyped-def]
    port = serve(0.5)
    data = b"POST / HTTP/1.1\r\nX: " + b"a" * (3 << 20)
    with socket.create_connection(("127.0.0.1", port), timeout=PATIENCE) as s:
        s.sendall(data)
        raw = s.recv(65536)
    assert _status_and_code(raw) == (431, "too_large")


def test_a_silent_client_is_closed_after_the_linger(serve) -> None:  # type: ignore[no-untyped-def]
    port = serve(0.2)
    size = protocol.MAX_HEARTBEAT_BODY + 1
    with socket.create_connection(("127.0.0.1", port), timeout=PATIENCE) as s:
        s.sendall(_post(size, b"{"))  # then nothing more: the linger ends it
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    assert _status_and_code(b"".join(chunks)) == (413, "too_large")


def test_bytes_beyond_the_linger_bound_end_the_connection(serve) -> None:  # type: ignore[no-untyped-def]
    port = serve(PATIENCE * 10, linger_bytes=64 << 10)
    with socket.create_connection(("127.0.0.1", port), timeout=PATIENCE) as s:
        s.sendall(_post(1 << 40, b""))
        with pytest.raises(OSError):  # the server stops reading: a reset, or a send that fails
            for _ in range(1 << 12):  # up to 4 GiB of body, far past the 64 KiB bound
                s.sendall(b" " * (1 << 20))


def test_a_complete_request_is_closed_without_lingering(serve) -> None:  # type: ignore[no-untyped-def]
    port = serve(PATIENCE * 10)
    raw = _exchange(port, f"GET {protocol.PATH_CA} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert raw.startswith(b"HTTP/1.1 200 ")
