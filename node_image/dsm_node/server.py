"""Runs one node process: the HTTPS listeners, the node, and signal handling."""

from __future__ import annotations

import asyncio
import logging
import signal

from aiohttp import web

from dsm_node.api import app as api_app
from dsm_node.api import tls
from dsm_node.config import NodeConfig
from dsm_node.node import Node, StartupError

log = logging.getLogger("dsm.node")


async def serve(config: NodeConfig) -> int:
    """Returns the process exit code: 0 after a clean halt, 2 when the node cannot join."""
    node = Node(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    runner = web.AppRunner(api_app.build(node), access_log=None, handle_signals=False)
    await runner.setup()
    names = [config.address, config.node_name, "localhost", "127.0.0.1"]
    ssl_ctx = tls.server_context(config.tls_cert_file, config.tls_key_file, names)
    ports = [config.api_port] + ([config.heartbeat_port] if config.heartbeat_port else [])
    for port in ports:
        await web.TCPSite(runner, config.bind_address, port, ssl_context=ssl_ctx).start()
    log.info("listening on https://%s:%s", config.bind_address, ",".join(map(str, ports)))

    code = 0
    start = asyncio.create_task(node.start())
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait({start, stopped}, return_when=asyncio.FIRST_COMPLETED)
    if start.done() and start.exception() is not None:
        exc = start.exception()
        if isinstance(exc, StartupError):
            log.error("cannot join the cluster: %s", exc)
        else:
            log.error("cannot start", exc_info=exc)
        code = 2
    else:
        if not start.done():
            log.info("stop requested while starting")
            start.cancel()
            await asyncio.gather(start, return_exceptions=True)
        else:
            await stopped
    await node.stop()
    await runner.cleanup()
    log.info("stopped")
    return code
