"""Readiness (``/readyz``) of a node object, without a database: ready means the API can serve."""

from __future__ import annotations

import asyncio

from dsm_node.cluster.lease import Event, Phase
from dsm_node.cluster.membership import Identity
from dsm_node.config import NodeConfig
from dsm_node.node import Node


def test_a_registered_node_still_joining_is_not_ready() -> None:
    """Between registration and the services being built (settings read from the database, the
    pool wired), /readyz said 200 while every API call answered 503 'not ready yet (joining)':
    a loaded machine made the gap long enough for tests (and a load balancer) to fall into."""
    node = Node(NodeConfig(database_url="postgresql://u:p@127.0.0.1:5432/d", node_name="n"))
    assert node.not_ready_reasons()  # starting
    asyncio.run(node.lease.advance(Event.JOIN, node.live.timing))
    node.lease.registered(Identity(1, 1, "n"))
    assert node.phase is Phase.JOINING and node.shared() is None
    assert node.not_ready_reasons(), "ready before the API can serve"
