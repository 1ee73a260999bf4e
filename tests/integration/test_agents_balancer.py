"""1,000 simulated agents through a real HAProxy in TCP mode in front of 3 real nodes.

- Connections land on every node (each heartbeat is a new connection; the balancer spreads them).
- The node sees the agent's own client certificate, so nothing terminated TLS: a heartbeat is
  accepted only when the handshake verified a certificate of the agent CA naming the agent, with
  the serial on record (HAProxy holds no certificate at all), and the agents verified the nodes'
  certificates from the agent CA in turn.
- A node killed with SIGKILL loses its agents to the others within one interval, judged by
  rounds, not by a clock: no agent misses a heartbeat after the kill (each heartbeat is a new
  connection; the balancer sends it to a live node, and an agent whose connection broke mid-way
  tries the balancer again within the same round), and every agent's heartbeats after the kill
  are recorded on the survivors. (A wall-clock bound would measure this shared machine: at
  1,000 agents it serves one round in more or less than an interval depending on the others'
  load.)
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.agents import (
    Simulator,
    agent_settings,
    heartbeat_port,
    start_node,
    token,
    wait_serving,
)
from tests.support.haproxy import Balancer
from tests.support.loopback import next_address
from tests.support.nodes import Cluster, query, set_settings
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration
AGENTS = 1000
INTERVAL = 30.0


@pytest.mark.timeout(900)
def test_a_thousand_agents_through_haproxy_spread_and_rehome_after_sigkill(
    dsm_cluster: Cluster, tmp_path: Path
) -> None:
    url = dsm_cluster.database_url
    agent_settings(url, interval=INTERVAL, missed=100)
    nodes = [start_node(dsm_cluster, n) for n in ("a", "b", "c")]
    for n in nodes:
        wait_serving(n)
    lb = Balancer(
        next_address(),
        {n.name: (n.address, heartbeat_port(n)) for n in nodes},
        tmp_path,
    ).start()
    try:
        # the operator (or an administrator) names the balancer: agents are told to use only it
        set_settings(url, manager_address=lb.address, heartbeat_port=lb.port)
        tok, pin = token(nodes[0], uses=AGENTS)
        sim = Simulator(
            [f"{lb.address}:{lb.port}"],
            AGENTS,
            INTERVAL,
            2,
            tmp_path / "sim",
            tok,
            pin,
            extra=["--connections", "64"],
        ).start()
        try:

            def everyone_heartbeated() -> bool:
                s = sim.status()
                return bool(s.get("perAgent")) and all(a["ok"] >= 2 for a in s["perAgent"])

            wait_until(everyone_heartbeated, 600, "every agent heartbeating twice", sim.log)
            status = sim.status()
            assert {a["mode"] for a in status["perAgent"]} == {"loadBalancer"}
            assert {tuple(a["managers"]) for a in status["perAgent"]} == {
                (f"{lb.address}:{lb.port}",)
            }
            per_node = dict(
                query(
                    url,
                    "SELECT n.name, count(*) FROM agents a JOIN nodes n "
                    "ON n.id = a.last_node GROUP BY n.name",
                )
            )
            assert set(per_node) == {"a", "b", "c"}, per_node
            events_per_node = dict(
                query(
                    url,
                    "SELECT n.name, count(*) FROM agent_events e "
                    "JOIN nodes n ON n.id = e.node_id GROUP BY n.name",
                )
            )
            assert min(events_per_node.values()) > AGENTS / 10, events_per_node
            assert query(url, "SELECT count(*) FROM agents WHERE heartbeats > 0") == [(AGENTS,)]

            victim = nodes[2]
            failed_before = {a["agentId"]: a["failed"] for a in sim.status()["perAgent"]}
            victim.kill()  # and reaped: whatever c committed began before kill_at
            (kill_at,) = query(url, "SELECT now()")[0]
            # the next round counts from a status written after the kill
            written = sim.status()["elapsedSeconds"]
            wait_until(lambda: sim.status()["elapsedSeconds"] > written + 1, 60, "a fresh status")
            ok_before = {a["agentId"]: a["ok"] for a in sim.status()["perAgent"]}

            def next_round_done() -> bool:
                s = sim.status()
                return all(a["ok"] > ok_before[a["agentId"]] for a in s["perAgent"])

            wait_until(next_round_done, 600, "every agent's next heartbeat", sim.log)
            after = sim.status()["perAgent"]
            missed = [a["agentId"] for a in after if a["failed"] > failed_before[a["agentId"]]]
            assert missed == [], f"{len(missed)} agents missed a heartbeat after the kill"
            # An answer counted above may have left c just before the kill: the database says
            # when every agent has been heard since.
            wait_until(
                lambda: (
                    query(url, "SELECT count(*) FROM agents WHERE last_heartbeat > %s", (kill_at,))
                    == [(AGENTS,)]
                ),
                120,
                "every agent heard after the kill",
                sim.log,
            )
            (on_victim,) = query(
                url,
                "SELECT count(*) FROM agent_events e JOIN nodes n ON n.id = e.node_id "
                "WHERE n.name = 'c' AND e.received_at > %s",
                (kill_at,),
            )[0]
            assert on_victim == 0
            survivors = dict(
                query(
                    url,
                    "SELECT n.name, count(*) FROM agents a JOIN nodes n ON n.id = a.last_node "
                    "GROUP BY n.name",
                )
            )
            assert set(survivors) == {"a", "b"}, survivors
            final = sim.stop()
            assert final["fatal"] == 0
        finally:
            sim.kill()
    finally:
        lb.stop()
