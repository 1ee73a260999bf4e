"""The HTTPS listeners, with deadlines that keep slow clients from holding connections open.

aiohttp bounds the size of a request head but not the time a client takes to send it (before
aiohttp 3.14 a client that dribbles header bytes holds its connection forever), and asyncio waits
60 s for a TLS handshake. Every phase of a connection therefore has a deadline here:

- TLS handshake: ``tls_handshake_timeout``.
- Request head (request line and headers): ``header_timeout``, counted from the connection's
  start, or from the first byte of a later request on a kept-alive connection; the connection is
  closed when the head is not complete by then. The deadline is met when the parser has the
  whole head (``data_received``), not when the handler's task gets to it.
- Request body: read by the handlers within ``Limits.body_timeout_seconds`` (408, then closed);
  a body nobody reads is drained for at most ``LINGERING_SECONDS``.
- Idle keep-alive: ``keepalive_timeout``.

A connection is in one of three states: waiting for a head (deadline armed), in a request (the
head arrived: ``note_head``, from ``data_received`` and again from the request factory), or idle
after a request (the guard middleware calls ``note_done``; the next byte starts a new head
deadline).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from dataclasses import dataclass
from typing import Any

from aiohttp import web, web_protocol
from aiohttp.http_exceptions import HttpProcessingError

from dsm_node.logs import LogBudget

log = logging.getLogger("dsm.api")
LINGERING_SECONDS = 2.0


REFUSALS = LogBudget(log)


@dataclass(frozen=True)
class Deadlines:
    header_timeout: float = 10.0
    keepalive_timeout: float = 75.0
    tls_handshake_timeout: float = 10.0

    def handler_options(self) -> dict[str, Any]:
        """Options for aiohttp's request handler (the same for every listener)."""
        return {
            "keepalive_timeout": self.keepalive_timeout,
            "lingering_time": LINGERING_SECONDS,
            "access_log": None,
        }


class DeadlineRequestHandler(web_protocol.RequestHandler):
    """aiohttp's request handler plus the request-head deadline (see the module docstring)."""

    def __init__(self, manager: web.Server, *, header_timeout: float, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._head_timeout = header_timeout
        self._head_timer: asyncio.TimerHandle | None = None
        self._in_request = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if not self._in_request and self._head_timer is None:
            self._arm()  # the first byte of the next request on a kept-alive connection
        heads = self._request_count
        super().data_received(data)
        if self._request_count != heads:
            # The head is complete now, so the deadline is met now. The request factory (which
            # also calls note_head) runs later, in the handler's task: on a loaded machine the
            # deadline's timer, due in the same turn of the loop, would run first and close a
            # connection whose head arrived in time.
            self.note_head()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def note_head(self) -> None:
        self._in_request = True
        self._disarm()

    def note_done(self) -> None:
        self._in_request = False

    def _arm(self) -> None:
        self._disarm()
        self._head_timer = asyncio.get_running_loop().call_later(
            self._head_timeout, self._head_too_slow
        )

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def log_exception(self, *args: Any, **kwargs: Any) -> None:
        """aiohttp reports a request its parser refused (a client's malformed HTTP) as an ERROR
        with a traceback; it is the client's mistake: one line, within the log budget."""
        exc = kwargs.get("exc_info")
        if isinstance(exc, HttpProcessingError):
            peer = self.transport.get_extra_info("peername") if self.transport else None
            first = (exc.message or "").strip().splitlines()[:1]
            REFUSALS.log(
                logging.INFO,
                "malformed HTTP from %s: %d %s",
                peer[0] if isinstance(peer, tuple) else peer,
                exc.code,
                first[0].rstrip(":") if first else type(exc).__name__,
            )
            return
        super().log_exception(*args, **kwargs)

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if self._in_request or self.transport is None:
            return
        peer = self.transport.get_extra_info("peername")
        log.debug("closed %s: no request head within %g s", peer, self._head_timeout)
        self.force_close()


def note_done(request: web.BaseRequest) -> None:
    """Called when a request's handler has finished (by the guard middleware)."""
    protocol = request.protocol
    if isinstance(protocol, DeadlineRequestHandler):
        protocol.note_done()


class GuardedSite(web.BaseSite):
    """An HTTPS listener on ``host:port`` whose connections have deadlines."""

    def __init__(
        self,
        runner: web.AppRunner,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext,
        deadlines: Deadlines,
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context)
        self._host, self._port, self._deadlines = host, port, deadlines

    @property
    def name(self) -> str:
        return f"https://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        server = self._runner.server
        assert server is not None
        _watch_heads(server)
        options = self._deadlines.handler_options()
        self._server = await loop.create_server(
            lambda: DeadlineRequestHandler(
                server, loop=loop, header_timeout=self._deadlines.header_timeout, **options
            ),
            self._host,
            self._port,
            ssl=self._ssl_context,
            ssl_handshake_timeout=self._deadlines.tls_handshake_timeout,
            reuse_address=True,
            backlog=1024,
        )


def _watch_heads(server: web.Server) -> None:
    """Wraps the server's request factory (called once a request's head is complete) so that the
    connection's head deadline is disarmed; idempotent."""
    factory = server.request_factory
    if getattr(factory, "_dsm_watching", False):
        return

    def watching(*args: Any, **kwargs: Any) -> web.BaseRequest:
        request = factory(*args, **kwargs)
        if isinstance(request.protocol, DeadlineRequestHandler):
            request.protocol.note_head()
        return request

    watching._dsm_watching = True  # type: ignore[attr-defined]
    server.request_factory = watching
