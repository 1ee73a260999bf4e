"""The HTTPS API runs on a thread of its own, with its own event loop and its own database
connections.

Why: on one event loop, everything a client makes the node do (TLS handshakes and decryption,
HTTP parsing, JSON, validation, refusals) competes with the node's heartbeat. A flood of cheap
requests (a few hundred a second of refused sign-ins) was enough to delay heartbeats by seconds
on a busy machine, and a peer may then declare the node offline. With the API on its own loop the
node's loop (heartbeat, sweep, job pool) only competes for the interpreter lock, which Python
hands over every few milliseconds; no request can hold it for long (Argon2 and TLS run without it).

The API thread shares with the node only what holds no event loop (``services.NodeState`` and,
once the node has joined, ``services.Shared``: settings, master keys, caches); it has its own
engine, job pool gateway and membership gateway (``common.Gateways``).
"""

from __future__ import annotations

import asyncio
import logging
import ssl

from aiohttp import web

from dsm_node.api import app as api_app
from dsm_node.api import listeners
from dsm_node.api.common import Gateways, Limits
from dsm_node.cluster.membership import Membership
from dsm_node.config import NodeConfig
from dsm_node.db.engine import create_engine
from dsm_node.jobs.pool import JobPool
from dsm_node.services import NodeState
from dsm_node.threads import LoopThread

log = logging.getLogger("dsm.api")


class ApiServer(LoopThread):
    """Starts the listeners on the API thread; ``start`` raises what the listeners raised (a
    port in use, for one)."""

    def __init__(self, node: NodeState, config: NodeConfig, ssl_context: ssl.SSLContext) -> None:
        super().__init__("dsm-api", log)
        self.node, self.config, self.ssl_context = node, config, ssl_context
        self._node_loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        self._node_loop = asyncio.get_running_loop()
        await super().start()

    async def _serve(self) -> None:
        cfg = self.config
        engine = create_engine(
            cfg.database_url,
            pool_size=cfg.api_db_pool_size,
            application_name=f"dsm-node:{cfg.node_name}:api",
        )
        gateways = Gateways(engine, JobPool(engine), Membership(engine))
        deadlines = listeners.Deadlines(
            header_timeout=cfg.http_header_timeout_seconds,
            keepalive_timeout=cfg.http_keepalive_timeout_seconds,
            tls_handshake_timeout=cfg.tls_handshake_timeout_seconds,
        )
        app = api_app.build(
            self.node,
            gateways,
            Limits(body_timeout_seconds=cfg.http_body_timeout_seconds),
            self._node_loop,
        )
        runner = web.AppRunner(app, handle_signals=False, **deadlines.handler_options())
        await runner.setup()
        try:
            # The API port only: the heartbeat port serves the agent protocol and nothing else
            # (dsm_node.agents.channel), and this port has no agent route.
            await listeners.GuardedSite(
                runner, cfg.bind_address, cfg.api_port, self.ssl_context, deadlines
            ).start()
            log.info("listening on https://%s:%s", cfg.bind_address, cfg.api_port)
            self._serving()
            await self._stop.wait()
        finally:
            await runner.cleanup()
            await engine.dispose()
