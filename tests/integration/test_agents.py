"""Agents end to end against real nodes and a real PostgreSQL: activation with a token on any
node, heartbeats over mutual TLS on the heartbeat port, events stored exactly once, the manager
list, deactivation, offline detection and clock alerts, the administration API and CLI."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.agents import (
    agent_settings,
    dsm,
    events_in_db,
    manager_of,
    start_node,
    token,
    wait_serving,
)
from tests.support.nodes import Cluster, query

pytestmark = pytest.mark.integration


def test_agent_activates_heartbeats_and_its_events_are_stored_once(
    dsm_cluster: Cluster, tmp_path: Path
) -> None:
    url = dsm_cluster.database_url
    agent_settings(url, interval=1.0)
    a = start_node(dsm_cluster, "a")
    wait_serving(a)
    tok, pin = token(a)
    state = tmp_path / "agent"
    r = dsm(
        "agent",
        "run",
        "--state-dir",
        str(state),
        "--manager",
        manager_of(a),
        "--token",
        tok,
        "--ca-pin",
        pin,
        "--hostname",
        "web-01",
        "--events-per-heartbeat",
        "3",
        "--max-heartbeats",
        "3",
    )
    assert r.returncode == 0, r.stderr + r.stdout
    stored = events_in_db(url)
    assert list(stored) == [1]
    # agent.started + 3 samples per heartbeat, 3 heartbeats, each stored once, in order
    assert stored[1] == list(range(1, 11)), stored
    status, agent = a.request("GET", "/api/agents/1")
    assert status == 200 and agent["status"] == "Online" and agent["ackedSequence"] == 10
    assert agent["hostname"] == "web-01" and agent["heartbeats"] == 3
    # the same agent restarted: no activation again, sequence continues, nothing lost
    r = dsm(
        "agent",
        "run",
        "--state-dir",
        str(state),
        "--manager",
        manager_of(a),
        "--max-heartbeats",
        "1",
    )
    assert r.returncode == 0, r.stderr + r.stdout
    assert events_in_db(url)[1] == list(range(1, 12))
    # the token was for one use: a second agent cannot activate with it
    r = dsm(
        "agent",
        "run",
        "--state-dir",
        str(tmp_path / "other"),
        "--manager",
        manager_of(a),
        "--token",
        tok,
        "--ca-pin",
        pin,
        "--max-heartbeats",
        "1",
    )
    assert r.returncode == 3 and "token_used_up" in r.stderr, r.stderr
    assert query(url, "SELECT count(*) FROM agents") == [(1,)]
