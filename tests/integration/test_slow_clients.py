"""Slow clients cannot hold a real node's connections: hundreds of connections that never finish
their TLS handshake, their request head or their body are all closed by the node, and a normal
client is served meanwhile. (Issue 9: 300 slow-header connections were never closed in 30 s.)

The node runs with short deadlines (2 s) for the phase under test; the test waits up to 30 s
for each close, so it checks that the node closes them, not how fast."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time

import pytest

from tests.support import rawhttp
from tests.support.loopback import next_address
from tests.support.nodes import Cluster, NodeProcess

pytestmark = pytest.mark.integration

# Short deadlines for the phase under test; the TLS handshake deadline stays long where it is
# not under test (a loaded machine may take seconds to complete a crowd of handshakes).
DEADLINES = {
    "DSM_HTTP_HEADER_TIMEOUT_SECONDS": "2",
    "DSM_HTTP_BODY_TIMEOUT_SECONDS": "2",
    "DSM_TLS_HANDSHAKE_TIMEOUT_SECONDS": "30",
}
CONNECTIONS = 300
PATIENCE = 30.0


async def closed_by_server(reader: asyncio.StreamReader, deadline: float) -> bool:
    """True when the server closes the connection (EOF or reset) before ``deadline``."""
    try:
        while time.monotonic() < deadline:
            try:
                data = await asyncio.wait_for(reader.read(65536), 0.5)
            except TimeoutError:
                continue
            if not data:
                return True
    except (ConnectionError, ssl.SSLError):
        return True
    return False


async def dribble(writer: asyncio.StreamWriter, lines: list[bytes]) -> None:
    """Sends ``lines`` one every half second, then keeps sending harmless header lines."""
    n = 0
    try:
        for line in lines:
            writer.write(line)
            await writer.drain()
            await asyncio.sleep(0.5)
        while True:
            n += 1
            writer.write(b"X-Slow-%d: still typing\r\n" % n)
            await writer.drain()
            await asyncio.sleep(0.5)
    except (ConnectionError, ssl.SSLError, RuntimeError):
        return


async def slow_connections(node: NodeProcess, kind: str, sources: list[str]) -> int:
    """Opens CONNECTIONS connections of one kind of slowness, all open at once; returns how many
    the node closed within PATIENCE seconds of their opening."""
    connecting = asyncio.Semaphore(20)  # a crowd, not a handshake storm: every one gets in

    async def open_one(i: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        local = (sources[i % len(sources)], 0)
        async with connecting:
            if kind == "no TLS handshake":
                reader, writer = await asyncio.open_connection(
                    node.address, node.port, local_addr=local
                )
                writer.write(b"\x16\x03\x01")  # the start of a ClientHello, and nothing more
                return reader, writer
            return await asyncio.open_connection(
                node.address, node.port, ssl=rawhttp.tls_context(), local_addr=local
            )

    async def first_request(i: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A connection that asks one question in time and is answered; the crowd only turns
        slow afterwards (see below)."""
        reader, writer = await open_one(i)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        await reader.readuntil(b"\r\n\r\n")
        return reader, writer

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        deadline = time.monotonic() + PATIENCE
        if kind == "no TLS handshake":
            closed = await closed_by_server(reader, deadline)
            await close(writer)
            return closed
        head = [b"GET /api/nodes HTTP/1.1\r\n", b"Host: x\r\n"]
        if kind == "slow body":
            head = [
                b"POST /api/sessions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 1000\r\n\r\n{"
            ]
        sender = asyncio.create_task(dribble(writer, head))
        closed = await closed_by_server(reader, deadline)
        sender.cancel()
        await close(writer)
        return closed

    async def one(i: int) -> bool:
        return await hold(*await open_one(i))

    if kind == "slow second request":
        # Every first request is made (and answered) before any connection starts dribbling:
        # the first request is the well-behaved part, and with 300 dribblers already running,
        # this process's own event loop can fall seconds behind on a loaded machine and send
        # a first head later than the node's 2 s deadline (rightly closed: the node cannot
        # tell a late client from a slow one).
        opened = await asyncio.gather(*(first_request(i) for i in range(CONNECTIONS)))
        results = await asyncio.gather(*(hold(r, w) for r, w in opened), return_exceptions=True)
    else:
        results = await asyncio.gather(
            *(one(i) for i in range(CONNECTIONS)), return_exceptions=True
        )
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors[:3]
    return sum(1 for r in results if r is True)


async def served_meanwhile(node: NodeProcess, during: asyncio.Task[int]) -> list[int]:
    """A normal client's requests while the slow ones hang on (from a thread of its own, so that
    the slow crowd in this process cannot make it slow too)."""
    statuses = []
    while not during.done():
        r = await asyncio.to_thread(rawhttp.request, node.address, node.port, "GET", "/readyz")
        statuses.append(r.status)
        await asyncio.sleep(0.5)
    return statuses


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError, ssl.SSLError, TimeoutError):
        await asyncio.wait_for(writer.wait_closed(), 5)


@pytest.mark.parametrize(
    "kind", ["no TLS handshake", "slow head", "slow body", "slow second request"]
)
def test_slow_connections_are_closed_and_others_served(dsm_cluster: Cluster, kind: str) -> None:
    deadlines = {**DEADLINES}
    if kind == "no TLS handshake":
        deadlines["DSM_TLS_HANDSHAKE_TIMEOUT_SECONDS"] = "2"
    node = dsm_cluster.start("n", **deadlines)
    sources = [next_address() for _ in range(10)]

    async def attack() -> tuple[int, list[int]]:
        task = asyncio.create_task(slow_connections(node, kind, sources))
        served = await served_meanwhile(node, task)
        return await task, served

    closed, served = asyncio.run(attack())
    assert closed == CONNECTIONS, f"{closed} of {CONNECTIONS} closed by the node"
    assert served and set(served) == {200}, served
    assert node.request("GET", "/readyz")[0] == 200
