"""Runs one node process: the node on the main thread's event loop, the HTTPS API on its own
thread (``api.serving``), the agent protocol on another (``agents.channel``), and signal
handling."""

from __future__ import annotations

import asyncio
import logging
import signal

from dsm_node import auth
from dsm_node.agents.channel import AgentChannel
from dsm_node.api import serving, tls
from dsm_node.cluster.lease import Phase
from dsm_node.config import NodeConfig
from dsm_node.node import Node, StartupError

log = logging.getLogger("dsm.node")


async def serve(config: NodeConfig) -> int:
    """Returns the process exit code: 0 after a clean halt, 2 when the node cannot start or join."""
    node = Node(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    auth.HASHING.configure(config.sign_in_workers, config.sign_in_queue)
    names = [config.address, config.node_name, "localhost", "127.0.0.1"]
    try:
        ssl_ctx = tls.server_context(config.tls_cert_file, config.tls_key_file, names)
    except (OSError, ValueError) as e:
        log.error("cannot load the TLS certificate or key: %s", e)
        return 2
    api = serving.ApiServer(node, config, ssl_ctx)
    try:
        await api.start()
    except OSError as e:
        log.error(
            "cannot listen on %s port %s: %s", config.bind_address, config.api_port, e.strerror or e
        )
        return 2

    code = 0
    agent_channel: AgentChannel | None = None
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
            # the agent protocol on the heartbeat port, once the node is online
            if config.heartbeat_port and node.phase is Phase.ONLINE:
                agent_channel = AgentChannel(node, config)
                try:
                    await agent_channel.start()
                except OSError as e:
                    log.error(
                        "cannot serve agents on %s port %s: %s",
                        config.bind_address,
                        config.heartbeat_port,
                        e.strerror or e,
                    )
                    agent_channel = None
                    code = 2
                    stop.set()
            await stopped
    if agent_channel is not None:
        await agent_channel.stop()  # agents go elsewhere before the node leaves
    await node.stop()
    await api.stop()
    log.info("stopped")
    return code
