"""Node-list mode (no balancer): agents get every Online node's heartbeat address with a version,
pick one at random and fail over. A 4th node that joins is known to every agent after one
heartbeat round; a node stopped and decommissioned is no longer listed after one round; with every
node down agents keep their events and deliver them all when nodes return: 0 events lost and 0
duplicated, counted per agent against what each agent recorded.

"After one round": the snapshot of each agent's answered heartbeats is taken once every node
gives agents the new list (its ``dsm_agent_manager_list_addresses`` gauge); each agent's next
answered heartbeat must carry it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.support.agents import (
    Simulator,
    agent_settings,
    events_in_db,
    manager_of,
    managers_listed,
    start_node,
    token,
    wait_serving,
)
from tests.support.nodes import Cluster, NodeProcess
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration
AGENTS = 40
INTERVAL = 1.0


def _wait_listed(nodes: tuple[NodeProcess, ...], count: int) -> None:
    """Until every node gives agents a list of ``count`` addresses (each refreshes its own, on a
    busy machine not necessarily within the second it aims at)."""
    wait_until(
        lambda: all(managers_listed(n) == count for n in nodes),
        120,
        f"every node listing {count} managers",
        lambda: str({n.name: managers_listed(n) for n in nodes}),
    )


def _next_round(sim: Simulator) -> dict[str, Any]:
    """Waits until every agent has had a heartbeat answered after now; returns the status. The
    simulator writes its status once a second, so the snapshot taken now may miss up to two
    answers (heartbeats are at least 0.9 s apart) and one more may be under way: three more
    answers than the snapshot shows include one the node composed after now."""
    before = {a["agentId"]: a["ok"] for a in sim.status()["perAgent"]}

    def done() -> Any:
        s = sim.status()
        ok = all(a["ok"] >= before[a["agentId"]] + 3 for a in s["perAgent"])
        return s if ok else None

    return dict(wait_until(done, 120, "one more heartbeat round", sim.log))


@pytest.mark.timeout(900)
def test_node_list_join_decommission_and_total_outage(dsm_cluster: Cluster, tmp_path: Path) -> None:
    url = dsm_cluster.database_url
    agent_settings(url, interval=INTERVAL, missed=1000)
    a, b, c = (start_node(dsm_cluster, n) for n in ("a", "b", "c"))
    for n in (a, b, c):
        wait_serving(n)
    tok, pin = token(a, uses=AGENTS)
    sim = Simulator([manager_of(a)], AGENTS, INTERVAL, 3, tmp_path / "sim", tok, pin).start()
    try:
        wait_until(
            lambda: (
                sim.status().get("perAgent") and all(x["ok"] >= 1 for x in sim.status()["perAgent"])
            ),
            300,
            "agents up",
            sim.log,
        )
        status = _next_round(sim)
        assert all(
            set(x["managers"]) == {manager_of(n) for n in (a, b, c)} for x in status["perAgent"]
        ), status["perAgent"][0]

        # a 4th node joins: every agent knows it after one round
        d = start_node(dsm_cluster, "d")
        wait_serving(d)
        _wait_listed((a, b, c, d), 4)
        status = _next_round(sim)
        assert all(manager_of(d) in x["managers"] for x in status["perAgent"])
        assert len({x["managersVersion"] for x in status["perAgent"]}) == 1

        # stopped and decommissioned: no longer listed after one round
        d.stop()
        assert a.request("POST", "/api/nodes/d/decommission")[0] == 200
        _wait_listed((a, b, c), 3)
        status = _next_round(sim)
        assert not any(manager_of(d) in x["managers"] for x in status["perAgent"])

        # every node down: agents wait and buffer; nodes return; everything is delivered
        for n in (a, b, c):
            n.stop()
        failed = {x["agentId"]: x["failed"] for x in sim.status()["perAgent"]}
        wait_until(
            lambda: all(x["failed"] > failed[x["agentId"]] + 1 for x in sim.status()["perAgent"]),
            120,
            "agents failing",
            sim.log,
        )
        for n in ("a", "b", "c"):
            start_node(dsm_cluster, n)
        for n in (a, b, c):
            wait_serving(dsm_cluster.nodes[n.name])
        status = _next_round(sim)
        status = _next_round(sim)
        final = sim.stop()
    finally:
        sim.kill()
    stored = events_in_db(url)
    lost = duplicated = 0
    for x in final["perAgent"]:
        seqs = stored.get(x["agentId"], [])
        duplicated += len(seqs) - len(set(seqs))
        delivered = x["recorded"] - x["waiting"]  # what the agent holds as acknowledged
        lost += delivered - len(set(seqs))
        assert seqs == list(range(1, len(seqs) + 1)), f"agent {x['agentId']}: a gap"
        assert len(seqs) == x["acked"], x
    assert lost == 0 and duplicated == 0, (lost, duplicated)
    # agents offer their TLS session again; resumed connections still carry the agent's
    # certificate (the node accepted these heartbeats, which it does only for a named agent)
    assert final["resumedSessions"] > 0
    assert sum(len(v) for v in stored.values()) >= AGENTS * 10
