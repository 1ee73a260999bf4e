"""The request-head deadline of the node's listeners (api/listeners.py), on a plain loopback
server in the test's own event loop: the loop is blocked on purpose to play a loaded machine."""

from __future__ import annotations

import asyncio
import time

from aiohttp import web

from dsm_node.api import listeners
from tests.support.loopback import next_address

HEAD_TIMEOUT = 0.5


async def hello(request: web.Request) -> web.Response:
    return web.Response(text="hello")


async def serve(address: str) -> tuple[web.AppRunner, asyncio.Server, int]:
    app = web.Application()
    app.router.add_get("/", hello)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    server = runner.server
    assert server is not None
    listeners._watch_heads(server)
    loop = asyncio.get_running_loop()
    tcp = await loop.create_server(
        lambda: listeners.DeadlineRequestHandler(
            server, loop=loop, header_timeout=HEAD_TIMEOUT, access_log=None
        ),
        address,
        0,
    )
    return runner, tcp, tcp.sockets[0].getsockname()[1]


async def test_a_head_received_in_time_is_answered_even_when_the_loop_runs_late() -> None:
    """The head arrives well within the deadline, but the node's event loop is busy (a loaded
    machine) until the deadline has passed: the socket's data and the deadline's timer then fall
    due in the same turn of the loop, and the data is read first. The deadline is met (the head
    was there in time), so the request must be answered, not closed unanswered."""
    address = next_address()
    runner, tcp, port = await serve(address)
    try:
        reader, writer = await asyncio.open_connection(address, port)
        await asyncio.sleep(0.05)  # the server has accepted: its head deadline is armed
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")  # sent at once
        time.sleep(HEAD_TIMEOUT + 0.5)  # noqa: ASYNC251 (the point: a loop that runs late)
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 200"), answer
    finally:
        tcp.close()
        await runner.cleanup()


async def test_a_head_that_never_comes_is_still_closed() -> None:
    address = next_address()
    runner, tcp, port = await serve(address)
    try:
        reader, writer = await asyncio.open_connection(address, port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n")  # never finished
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        assert answer == b""
    finally:
        tcp.close()
        await runner.cleanup()
