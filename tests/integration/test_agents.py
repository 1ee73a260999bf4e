"""Agents end to end against real nodes and a real PostgreSQL: activation with a token on any
node, heartbeats over mutual TLS on the heartbeat port, events stored exactly once, the manager
list, deactivation, offline detection and clock alerts, the administration API and CLI."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.agents import (
    agent_settings,
    dsm,
    env,
    events_in_db,
    manager_of,
    start_node,
    token,
    wait_serving,
)
from tests.support.nodes import API_KEY, Cluster, query
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration


def test_agent_activates_heartbeats_and_its_events_are_stored_once(
    dsm_cluster: Cluster, tmp_path: Path
) -> None:
    url = dsm_cluster.database_url
    # Online is read after the agent has exited: 30 missed heartbeats leave time for that read.
    agent_settings(url, interval=1.0, missed=30)
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


def test_a_token_is_never_used_more_often_than_it_allows(dsm_cluster: Cluster) -> None:
    """30 activations at once, on two nodes, with a token of 5 uses: exactly 5 agents."""
    import asyncio

    from dsm_node.agents import agent as agent_mod
    from tests.support.agents import heartbeat_port

    url = dsm_cluster.database_url
    a, b = start_node(dsm_cluster, "a"), start_node(dsm_cluster, "b")
    wait_serving(a)
    wait_serving(b)
    tok, pin = token(a, uses=5)

    async def one(i: int) -> str:
        node = (a, b)[i % 2]
        try:
            await agent_mod.activate([(node.address, heartbeat_port(node))], tok, pin, f"h{i}")
        except agent_mod.AgentError as e:
            return "token_used_up" if "token_used_up" in str(e) else str(e)
        return "activated"

    async def all_at_once() -> list[str]:
        return list(await asyncio.gather(*(one(i) for i in range(30))))

    results = asyncio.run(all_at_once())
    assert results.count("activated") == 5, results
    assert results.count("token_used_up") == 25, results
    assert query(url, "SELECT count(*), min(uses), max(uses) FROM agents, activation_tokens") == [
        (5, 5, 5)
    ]


def test_silent_agent_turns_offline_with_an_alert_and_a_deactivated_one_is_refused(
    dsm_cluster: Cluster, tmp_path: Path
) -> None:
    """A silent agent turns Offline with an alert after the missed intervals (the watch job, on
    the database's clock); a deactivated agent's next heartbeat is refused and it stops."""
    url = dsm_cluster.database_url
    agent_settings(url, interval=1.0, missed=2, agent_clock_skew_limit_seconds=5.0)
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
        "--max-heartbeats",
        "1",
    )
    assert r.returncode == 0, r.stderr
    wait_until(
        lambda: query(url, "SELECT status FROM agents WHERE id = 1") == [("offline",)],
        120,
        "the agent Offline",
    )
    status, body = a.request("GET", "/api/agents/alerts")
    assert status == 200 and [x["type"] for x in body["alerts"]] == ["Agent Offline"]
    # back, with a clock 100 s ahead: the Offline alert clears, a clock alert is raised
    # (it keeps heartbeating while the watch job looks: one heartbeat alone would be 2 missed
    # intervals old, so Offline again, by the job's next round)
    log = tmp_path / "returning-agent.log"
    with open(log, "ab") as out:
        returning = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dsm_node",
                "agent",
                "run",
                "--state-dir",
                str(state),
                "--manager",
                manager_of(a),
                "--clock-offset",
                "100",
            ],
            env=env(),
            stdout=out,
            stderr=subprocess.STDOUT,
        )

    def alerts() -> dict[str, bool]:
        if returning.poll() is not None:
            raise AssertionError(f"the agent exited ({returning.returncode}): {log.read_text()}")
        status, body = a.request("GET", "/api/agents/alerts?all=true")
        assert status == 200
        return {x["type"]: x["clearedAt"] is not None for x in body["alerts"]}

    try:
        wait_until(
            lambda: alerts() == {"Agent Offline": True, "Agent Clock Out of Sync": False},
            120,
            "the Offline alert cleared and a clock alert raised",
            lambda: str(alerts()),
        )
    finally:
        returning.send_signal(signal.SIGTERM)
        returning.wait(60)
    (skew,) = query(url, "SELECT clock_skew_seconds FROM agents WHERE id = 1")[0]
    assert 90 < skew < 110  # against the database's clock
    # the CLI reads it all
    cli = ["--server", a.url, "--insecure", "--api-key", API_KEY]
    r = dsm("agents", "list", *cli)
    assert r.returncode == 0 and f"{skew:+.1f}s" in r.stdout, r.stdout + r.stderr
    r = dsm("agents", "events", "1", *cli, "--output", "json")
    assert r.returncode == 0 and json.loads(r.stdout)["events"][0]["type"] == "agent.started"
    # deactivated: the certificate is revoked on the node at once
    status, body = a.request("POST", "/api/agents/1/deactivate")
    assert status == 200
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
    assert r.returncode == 3 and "deactivated" in r.stderr, r.stderr


def test_events_older_than_the_retention_are_pruned(dsm_cluster: Cluster) -> None:
    url = dsm_cluster.database_url
    a = start_node(dsm_cluster, "a")
    query(
        url,
        "INSERT INTO agents (id, hostname, cert_serial, cert_not_after, activated_on) "
        "VALUES (7, 'old', 1, now() + interval '1 day', 'test')",
    )
    query(
        url,
        "INSERT INTO agent_events (agent_id, seq, type, agent_time, data, received_at) "
        "SELECT 7, s, 't', 0, '{}', now() - make_interval(days => CASE WHEN s <= 5 THEN 40 "
        "ELSE 1 END) FROM generate_series(1, 8) s",
    )
    status, body = a.request("POST", "/api/jobs", {"type": "prune_agent_events"})
    assert status == 201, body
    wait_until(
        lambda: query(url, "SELECT seq FROM agent_events ORDER BY seq") == [(6,), (7,), (8,)],
        120,
        "events older than 30 days pruned",
    )
