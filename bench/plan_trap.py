"""Claim latency when the queue fills up faster than its statistics are refreshed.

    python -m bench.plan_trap [--ready N]

A known trap of Postgres-backed queues: with prepared statements, a queue table whose statistics
were taken while it was empty (or freshly created) gets a cached plan that scans the whole table
instead of the index, and throughput was seen to jump between about 1,000 and 14,000 jobs/s
depending on when statistics refreshed. This reproduces it for our claim statement: the ``jobs``
table gets history (jobs enqueued and deleted), is ``VACUUM ANALYZE``d while empty (as autovacuum
would after a quiet period), then receives N ready jobs through ``JobPool.enqueue`` in batches of
1,000 (autoanalyze runs at most once a minute, so the statistics stay those of the empty table).
It then times 50 claims of 100 through ``JobPool.claim`` and prints the claim's plan. With the
planner free to choose, it picks a bitmap scan that sorts the whole ready set on every claim
instead of walking ``jobs_ready_idx``.

To measure another version of the node code, put its ``node_image`` first on ``PYTHONPATH``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import psycopg
from sqlalchemy import text

from bench.common import Server, say
from bench.systems import migrate
from dsm_node.db.engine import create_engine
from dsm_node.db.queries import Q
from dsm_node.jobs import builtin  # noqa: F401  (registers noop)
from dsm_node.jobs import pool as pool_module
from dsm_node.jobs.pool import JobPool, NewJob


async def run(ready: int, claims: int = 50) -> None:
    server = Server.start()
    try:
        url = server.create_database("plan_trap")
        await migrate(url)
        with psycopg.connect(url, autocommit=True) as c:
            c.execute(
                "INSERT INTO nodes (name, address, api_port, version, status, started_at, "
                "last_heartbeat) VALUES ('trap', '127.0.0.1', 1, 'x', 'online', now(), now())"
            )
            node_id = c.execute("SELECT id FROM nodes WHERE name = 'trap'").fetchone()[0]  # type: ignore[index]
        engine = create_engine(url, pool_size=2)
        pool = JobPool(engine)
        for _ in range(3):  # history
            await pool.enqueue([NewJob("noop", {}) for _ in range(10_000)])
            with psycopg.connect(url, autocommit=True) as c:
                c.execute("DELETE FROM jobs")
        with psycopg.connect(url, autocommit=True) as c:
            c.execute("VACUUM ANALYZE jobs")
        for start in range(0, ready, 1_000):
            await pool.enqueue([NewJob("noop", {}) for _ in range(min(1_000, ready - start))])
        async with engine.connect() as conn:
            if "claim_plan" in Q.sql:  # the proposed fix, when the code under test has it
                await conn.execute(text(Q.sql["claim_plan"]))
            rows = await conn.execute(
                text("EXPLAIN " + Q.sql["claim_jobs"]),
                {"node_id": node_id, "epoch": 1, "limit": 100},
            )
            plan = "\n".join(r[0] for r in rows)
            await conn.rollback()
        times = []
        for _ in range(claims):
            t = time.perf_counter()
            got = await pool.claim(node_id, 1, 100)
            times.append((time.perf_counter() - t) * 1000)
            assert len(got) == 100
        await engine.dispose()
    finally:
        server.stop()
    say(f"code under test: {pool_module.__file__}")
    say(f"claim plan with {ready:,} ready jobs and the empty table's statistics:\n{plan}")
    say(
        f"{claims} claims of 100: median {statistics.median(times):.2f} ms, "
        f"min {min(times):.2f} ms, max {max(times):.2f} ms"
    )


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench.plan_trap", description=__doc__)
    p.add_argument("--ready", type=int, default=30_000, help="ready jobs (30,000)")
    asyncio.run(run(p.parse_args().ready))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
