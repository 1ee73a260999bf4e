"""Takeover latency: from SIGKILL of a node holding jobs until those jobs run on another node.

Three nodes share a database whose cluster settings are a 1 s heartbeat and a 10 s offline
threshold (``settings`` rows ``heartbeat_interval_seconds`` and ``offline_threshold_seconds``).
Each run enqueues 30 ``sleep`` jobs of 600 s, waits until they are all running, SIGKILLs the node
that holds most of them, and polls ``jobs.owner_node`` until every job the dead node held is
running on another node. The latency is ``max(claimed_at)`` of those jobs (the database clock)
minus the database clock read just before the kill. Expected: the threshold minus the dead node's
heartbeat age at the kill, plus the wait for a peer's next sweep (at most one interval), i.e.
between threshold - interval and threshold + interval. The killed node is restarted (a new
incarnation) before the next run.
"""

from __future__ import annotations

import asyncio
import json
import signal
import statistics
import time
from pathlib import Path
from typing import Any

import psycopg

from bench.common import Server, say, table
from bench.systems import NodeProc, migrate, node_address
from dsm_node.db.engine import create_engine
from dsm_node.jobs.pool import JobPool, NewJob

HEARTBEAT_S = 1.0
THRESHOLD_S = 10.0
JOBS = 30


async def _one(conn: psycopg.AsyncConnection[Any], sql: str, params: Any = None) -> Any:
    cur = await conn.execute(sql, params)
    return await cur.fetchone()


async def measure(server: Server, log_dir: Path, runs: int) -> list[dict[str, Any]]:
    url = server.create_database("bench_takeover")
    await migrate(url)
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        for key, value in (
            ("heartbeat_interval_seconds", HEARTBEAT_S),
            ("offline_threshold_seconds", THRESHOLD_S),
        ):
            await conn.execute(
                "INSERT INTO settings (key, value) VALUES (%s, %s::jsonb) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (key, json.dumps(value)),
            )
        nodes = [
            NodeProc(
                f"takeover-{i + 1}",
                node_address(10 + i),
                url,
                log_dir / f"takeover-{i + 1}.log",
                {"DSM_CONCURRENCY": "200"},
            )
            for i in range(3)
        ]
        engine = create_engine(url, pool_size=2, application_name="dsm-bench")
        pool = JobPool(engine)
        results = []
        try:
            for n in nodes:
                n.launch()
                await n.wait_ready()
            for r in range(1, runs + 1):
                res = await _run(conn, pool, nodes)
                res["round"] = r
                results.append(res)
                say(
                    f"takeover, run {r}/{runs}: {res['latency_s']:.2f} s from SIGKILL to the "
                    f"{res['jobs']} jobs running elsewhere (heartbeat age at kill "
                    f"{res['heartbeat_age_at_kill_s']:.2f} s; threshold {THRESHOLD_S:g} s, "
                    f"interval {HEARTBEAT_S:g} s)"
                )
        finally:
            for n in nodes:
                n.kill()
            await engine.dispose()
    return results


async def _run(
    conn: psycopg.AsyncConnection[Any], pool: JobPool, nodes: list[NodeProc]
) -> dict[str, Any]:
    ids = (await pool.enqueue([NewJob("sleep", {"seconds": 600}) for _ in range(JOBS)])).ids
    deadline = time.monotonic() + 30
    while True:
        row = await _one(
            conn,
            "SELECT count(*) FILTER (WHERE state = 'running') FROM jobs WHERE id = ANY(%s)",
            (ids,),
        )
        if row[0] == JOBS:
            break
        if time.monotonic() > deadline:
            raise TimeoutError("sleep jobs were not all claimed within 30 s")
        await asyncio.sleep(0.05)
    owner, held = await _one(
        conn,
        "SELECT owner_node, count(*) FROM jobs WHERE id = ANY(%s) "
        "GROUP BY owner_node ORDER BY count(*) DESC LIMIT 1",
        (ids,),
    )
    victim_name = (await _one(conn, "SELECT name FROM nodes WHERE id = %s", (owner,)))[0]
    victim = next(n for n in nodes if n.name == victim_name)
    victim_jobs = [
        r[0]
        for r in await (
            await conn.execute(
                "SELECT id FROM jobs WHERE id = ANY(%s) AND owner_node = %s", (ids, owner)
            )
        ).fetchall()
    ]
    kill_at, hb_age = await _one(
        conn,
        "SELECT clock_timestamp(), extract(epoch FROM clock_timestamp() - last_heartbeat) "
        "FROM nodes WHERE id = %s",
        (owner,),
    )
    assert victim.proc is not None
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait(10)
    deadline = time.monotonic() + 4 * THRESHOLD_S
    while True:
        done, last_claim = await _one(
            conn,
            "SELECT count(*) FILTER (WHERE state = 'running' AND owner_node <> %s), "
            "max(claimed_at) FROM jobs WHERE id = ANY(%s)",
            (owner, victim_jobs),
        )
        if done == len(victim_jobs):
            break
        if time.monotonic() > deadline:
            raise TimeoutError("the dead node's jobs were not taken over")
        await asyncio.sleep(0.02)
    latency = (last_claim - kill_at).total_seconds()
    # Bring the victim back (a new incarnation) for the next run.
    victim.launch()
    await victim.wait_ready()
    return {
        "victim": victim_name,
        "jobs": len(victim_jobs),
        "latency_s": round(latency, 3),
        "heartbeat_age_at_kill_s": round(float(hb_age), 3),
        "threshold_s": THRESHOLD_S,
        "heartbeat_interval_s": HEARTBEAT_S,
        "within_threshold_plus_interval": latency <= THRESHOLD_S + HEARTBEAT_S,
        "held_by_victim": held,
    }


def render(results: list[dict[str, Any]]) -> str:
    lat = [r["latency_s"] for r in results]
    rows = [
        ["takeover runs", "median s", "min-max s", "bound (threshold + interval)", "all within"],
        [
            str(len(lat)),
            f"{statistics.median(lat):.2f}",
            f"{min(lat):.2f}-{max(lat):.2f}",
            f"{THRESHOLD_S + HEARTBEAT_S:g} s",
            "yes" if all(r["within_threshold_plus_interval"] for r in results) else "no",
        ],
    ]
    return table(rows, right={1, 2})
