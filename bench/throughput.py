"""No-op job throughput of our job pool against pgqueuer and procrastinate, in one run.

    python -m bench.throughput [--runs N] [--jobs N] [--quick] [--no-takeover]

Method
------
One private PostgreSQL 15 server (Debian's binaries, started by ``dsm_node.embedded_pg``) with
durable commits (``fsync=on``, ``synchronous_commit=on``), listening on 127.0.0.1 only. Every system
gets its own database on that server, created once; its history (finished jobs, logs, events)
accumulates over the run, so every measured run starts from a table with history present.

Systems and configurations (each consumer set runs in processes of its own):

* ``dsm``: real node processes (``python -m dsm_node node run``), 1 and 3 of them, each on its own
  127.0.0.x address, started one after the other, all on one database.
* ``pgqueuer``: its own benchmark's defaults (5 consumers, batches of 10) and its best
  configuration (8 consumers, batches of 100); asyncpg and uvloop as in its benchmark.
* ``procrastinate``: one worker with concurrency 8.

Rounds are interleaved to spread the machine's noise evenly: in round r every configuration is
started, warmed up (a small unmeasured drain), measured once per scenario, and stopped. Before each
measured run the queue tables are ``VACUUM ANALYZE``d and a ``CHECKPOINT`` is taken.

Scenarios (the time is from the first job being available until the last one is finished, i.e. its
row is deleted or marked done in the database; a probe checks that every 5 ms):

* ``drain``: a backlog of N no-op jobs is inserted in one transaction through the system's own
  enqueue path, ``ANALYZE``d inside it, and committed while the consumers idle. The clock starts at
  the commit.
* ``cycle``: 4 producers on their own connections enqueue N jobs in batches of 100 (one transaction
  per batch) while the consumers run; the clock starts with the first enqueue.

procrastinate is about 20x slower than the others, so it gets N/5 jobs (at least 1,000): its rate
is still measured over several seconds.

The CPU time spent by PostgreSQL (all of its processes), by the consumers and by this harness is
recorded per run, and ``pg_stat_statements`` is reset before and read after every run: the JSON
under ``bench/results/`` has both, and the takeover latency and memory figures (see
``bench.takeover``).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import takeover
from bench.common import CpuMeter, RssSampler, Server, fmt_rate, python_version, say, summary, table
from bench.systems import Dsm, Pgqueuer, Procrastinate, System, consumer_memory, migrate

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
PROBE_INTERVAL = 0.005


async def wait_done(system: System, lo: int, hi: int, within_s: float) -> float:
    deadline = time.perf_counter() + within_s
    while await system.pending(lo, hi):
        if time.perf_counter() > deadline:
            raise TimeoutError(f"{system.name} {system.config}: jobs not done after {within_s} s")
        await asyncio.sleep(PROBE_INTERVAL)
    return time.perf_counter()


async def prepare(system: System) -> None:
    """Removes leftovers' dead rows and refreshes statistics; a checkpoint so none runs mid-run."""
    for t in system.queue_tables:
        await system.control.execute(f"VACUUM ANALYZE {t}")
    await system.control.execute("CHECKPOINT")
    await system.control.execute("SELECT pg_stat_statements_reset()")


async def top_statements(system: System, limit: int = 6) -> list[dict[str, Any]]:
    cur = await system.control.execute(
        "SELECT left(regexp_replace(query, '\\s+', ' ', 'g'), 160), calls, rows, "
        "round(total_exec_time::numeric, 1) FROM pg_stat_statements "
        "WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) "
        "ORDER BY total_exec_time DESC LIMIT %s",
        (limit,),
    )
    return [
        {"query": q, "calls": c, "rows": r, "total_ms": float(ms)}
        for q, c, r, ms in await cur.fetchall()
    ]


async def measure(
    server: Server, system: System, scenario: str, n: int, *, warmup: bool = False
) -> dict[str, Any]:
    await prepare(system)

    def groups() -> dict[str, list[int]]:
        return {"postgres": server.pids(), "consumers": system.consumer_pids()}

    rss = RssSampler(system.consumer_pids()).start()
    cpu = CpuMeter(groups())
    load_before = os.getloadavg()[0]
    harness0 = time.process_time()
    enqueue_s = None
    if scenario == "drain":
        lo, hi, t0 = await system.insert_backlog(n)
    else:
        t0 = time.perf_counter()
        lo, hi = await system.enqueue(n)
        enqueue_s = time.perf_counter() - t0
    t1 = await wait_done(system, lo, hi, within_s=max(120.0, n / 50))
    used = cpu.stop(groups())
    loaded = await rss.stop()
    used["harness"] = time.process_time() - harness0
    elapsed = t1 - t0
    result: dict[str, Any] = {
        "system": system.name,
        "config": system.config,
        "scenario": scenario,
        "jobs": n,
        "seconds": round(elapsed, 4),
        "jobs_per_s": n / elapsed,
        "cpu_seconds": {k: round(v, 3) for k, v in used.items()},
        "cpu_us_per_job": {k: round(v / n * 1e6, 1) for k, v in used.items()},
        "loadavg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "loaded_rss_kib": loaded,
    }
    if enqueue_s is not None:
        result["enqueue_seconds"] = round(enqueue_s, 4)
    if not warmup:
        result["top_statements"] = await top_statements(system)
    return result


def build_systems(server: Server, log_dir: Path, args: argparse.Namespace) -> list[Any]:
    dsm_url = server.create_database("bench_dsm")
    pgq_url = server.create_database("bench_pgqueuer")
    proc_url = server.create_database("bench_procrastinate")
    node_cfg = {
        "concurrency": args.concurrency,
        "claim_batch": args.claim_batch,
        "db_pool_size": args.db_pool_size,
    }
    systems: list[Any] = [
        Dsm(dsm_url, log_dir, nodes=1, **node_cfg),
        Dsm(dsm_url, log_dir, nodes=3, **node_cfg),
        Pgqueuer(pgq_url, log_dir, consumers=5, batch=10, label="default (5 x batch 10)"),
        Pgqueuer(pgq_url, log_dir, consumers=8, batch=100, label="best (8 x batch 100)"),
        Procrastinate(proc_url, log_dir, concurrency=8),
    ]
    return [s for s in systems if s.name in args.systems]


def jobs_for(system: Any, n: int) -> int:
    return max(1_000, n // 5) if isinstance(system, Procrastinate) else n


async def run_throughput(
    server: Server, log_dir: Path, args: argparse.Namespace
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, str], str]:
    systems = build_systems(server, log_dir, args)
    for s in systems:
        if isinstance(s, Dsm):
            await migrate(s.url)
        else:
            await s.install()
    runs: list[dict[str, Any]] = []
    memory: list[dict[str, Any]] = []
    settings = {f"{s.name} {s.config}": s.settings for s in systems}
    plan = ""
    for r in range(1, args.runs + 1):
        for s in systems:
            await s.start()
            try:
                n = jobs_for(s, args.jobs)
                await measure(server, s, "drain", max(200, n // 10), warmup=True)
                for scenario in args.scenarios:
                    res = await measure(server, s, scenario, n)
                    res["round"] = r
                    runs.append(res)
                    say(
                        f"{s.name}, {s.config}, {scenario}, run {r}/{args.runs}: "
                        f"{fmt_rate(res['jobs_per_s'])} jobs/s "
                        f"({n:,} jobs in {res['seconds']:.2f} s; CPU us/job: "
                        + ", ".join(f"{k} {v:g}" for k, v in res["cpu_us_per_job"].items())
                        + ")"
                    )
                if isinstance(s, Dsm) and not plan:
                    plan = await explain_with_backlog(s, n)
                loaded: dict[int, int] = {}
                for res in runs:
                    if res["round"] == r and (res["system"], res["config"]) == (s.name, s.config):
                        for pid, kib in res["loaded_rss_kib"].items():
                            loaded[pid] = max(loaded.get(pid, 0), kib)
                memory.append(
                    {
                        "system": s.name,
                        "config": s.config,
                        "round": r,
                        "processes": consumer_memory(s, loaded),
                    }
                )
            finally:
                await s.stop()
    return runs, memory, settings, plan


async def explain_with_backlog(s: Dsm, n: int) -> str:
    """EXPLAIN of the claim statement while a backlog is present (then drains it)."""
    lo, hi, _ = await s.insert_backlog(n)
    plan = await s.explain_claim()
    await wait_done(s, lo, hi, within_s=120)
    return plan


# -- report -----------------------------------------------------------------------------------


def aggregate(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    keys: list[tuple[str, str, str]] = []
    for r in runs:
        k = (r["system"], r["config"], r["scenario"])
        if k not in keys:
            keys.append(k)
    out = []
    for system, config, scenario in keys:
        rs = [
            r
            for r in runs
            if (r["system"], r["config"], r["scenario"]) == (system, config, scenario)
        ]
        cpu = {
            g: summary([r["cpu_us_per_job"][g] for r in rs])["median"]
            for g in rs[0]["cpu_us_per_job"]
        }
        out.append(
            {
                "system": system,
                "config": config,
                "scenario": scenario,
                "jobs": rs[0]["jobs"],
                "jobs_per_s": summary([r["jobs_per_s"] for r in rs]),
                "cpu_us_per_job_median": cpu,
            }
        )
    return out


def render(agg: list[dict[str, Any]]) -> str:
    peers = [a for a in agg if a["system"] != "dsm"]
    peer_cols = []
    for p in peers:
        col = (
            f"{p['system']} {p['config'].split(' ')[0]}"
            if p["system"] == "pgqueuer"
            else p["system"]
        )
        if col not in peer_cols:
            peer_cols.append(col)
    header = ["scenario", "system", "config", "jobs", "median jobs/s", "min-max", "IQR", "runs"]
    header += [f"x {c}" for c in peer_cols]
    rows = [header]
    for a in agg:
        s = a["jobs_per_s"]
        row = [
            a["scenario"],
            a["system"],
            a["config"],
            f"{a['jobs']:,}",
            fmt_rate(s["median"]),
            f"{fmt_rate(s['min'])}-{fmt_rate(s['max'])}",
            f"{fmt_rate(s['q1'])}-{fmt_rate(s['q3'])}",
            str(s["runs"]),
        ]
        for c in peer_cols:
            peer = next(
                (
                    p
                    for p in peers
                    if p["scenario"] == a["scenario"]
                    and (p["system"] == c or f"{p['system']} {p['config'].split(' ')[0]}" == c)
                ),
                None,
            )
            if a["system"] != "dsm" or peer is None:
                row.append("")
            else:
                row.append(f"{s['median'] / peer['jobs_per_s']['median']:.2f}")
        rows.append(row)
    return table(rows, right={3, 4, 5, 6, 7, *range(8, 8 + len(peer_cols))})


def render_memory(memory: list[dict[str, Any]]) -> str:
    fields = ("idle_rss_mib", "loaded_rss_mib", "hwm_mib")
    by: dict[tuple[str, str, str], list[dict[str, float]]] = {}
    for m in memory:
        for p in m["processes"]:
            by.setdefault((m["system"], m["config"], p["process"]), []).append(p)
    rows = [
        [
            "system",
            "config",
            "process",
            "idle RSS MiB",
            "loaded RSS MiB (max)",
            "VmHWM MiB (start-up included)",
        ]
    ]
    for (system, config, proc), ps in by.items():
        med = {f: summary([p[f] for p in ps]) for f in fields}
        rows.append(
            [
                system,
                config,
                proc,
                f"{med['idle_rss_mib']['median']:.1f}",
                f"{med['loaded_rss_mib']['median']:.1f} ({med['loaded_rss_mib']['max']:.1f})",
                f"{med['hwm_mib']['median']:.1f}",
            ]
        )
    return table(rows, right={3, 4, 5})


async def main_async(args: argparse.Namespace) -> int:
    work = Path(tempfile.mkdtemp(prefix="dsm-bench-"))
    log_dir = work / "logs"
    log_dir.mkdir()
    say(f"starting PostgreSQL (durable commits); logs in {log_dir}")
    server = Server.start()
    started = dt.datetime.now(dt.UTC)
    try:
        say(f"dsm_node: {node_source(args.node_source)}")
        pg_settings = server.settings()
        say("PostgreSQL " + ", ".join(f"{k}={v}" for k, v in pg_settings.items()))
        runs, memory, settings, plan = await run_throughput(server, log_dir, args)
        takeover_runs: list[dict[str, Any]] = []
        if args.takeover_runs:
            takeover_runs = await takeover.measure(server, log_dir, args.takeover_runs)
    finally:
        server.stop()
    agg = aggregate(runs)
    say("results (jobs/s; x PEER = our median / the peer's median in the same scenario)")
    print(render(agg), end="\n\n")
    say("memory per consumer process (medians over the rounds)")
    print(render_memory(memory), end="\n\n", flush=True)
    if takeover_runs:
        say("takeover latency")
        print(takeover.render(takeover_runs), flush=True)
    result = {
        "date": started.isoformat(timespec="seconds"),
        "command": "python -m bench.throughput " + " ".join(args.argv),
        "machine": {
            "cpus": os.cpu_count(),
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30),
            "platform": platform.platform(),
            "python": python_version(),
        },
        "node_source": node_source(args.node_source),
        "postgres": pg_settings,
        "configurations": settings,
        "claim_plan_with_backlog": plan,
        "summary": agg,
        "runs": runs,
        "memory": memory,
        "takeover": takeover_runs,
    }
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"throughput-{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    out.write_text(json.dumps(result, indent=2, default=str))
    say(f"raw results: {out}")
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.throughput", description=__doc__.split("\n")[0]
    )
    p.add_argument("--runs", type=int, default=5, help="measured runs per configuration (5)")
    p.add_argument("--jobs", type=int, default=30_000, help="no-op jobs per run (30,000)")
    p.add_argument("--quick", action="store_true", help="2 runs of 5,000 jobs, 1 takeover")
    p.add_argument("--scenario", choices=["drain", "cycle", "both"], default="both")
    p.add_argument("--takeover-runs", type=int, default=3, help="0 skips the takeover test")
    p.add_argument("--concurrency", type=int, default=256, help="DSM_CONCURRENCY of our nodes")
    p.add_argument("--claim-batch", type=int, default=100, help="DSM_CLAIM_BATCH of our nodes")
    p.add_argument("--db-pool-size", type=int, default=10, help="DSM_DB_POOL_SIZE of our nodes")
    p.add_argument(
        "--systems",
        default="dsm,pgqueuer,procrastinate",
        help="comma-separated subset of dsm,pgqueuer,procrastinate",
    )
    p.add_argument(
        "--node-source",
        default="worktree",
        help="'worktree' (default) or a git revision whose node_image is measured",
    )
    args = p.parse_args(argv)
    args.argv = argv or []
    args.systems = set(args.systems.split(","))
    if args.quick:
        args.runs, args.jobs, args.takeover_runs = 2, 5_000, min(args.takeover_runs, 1)
    args.scenarios = ["drain", "cycle"] if args.scenario == "both" else [args.scenario]
    return args


def node_source(rev: str) -> str:
    """Describes the dsm_node code under test: a git snapshot or the working tree."""
    if snap := os.environ.get("DSM_BENCH_SNAPSHOT"):
        return f"snapshot: {snap}"
    head = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "--", "node_image"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    return f"working tree at {head}" + (" with uncommitted changes in node_image" if dirty else "")


def reexec_on_snapshot(rev: str, argv: list[str]) -> int:
    """Runs the benchmark again with dsm_node taken from ``git archive REV`` (other people's
    uncommitted edits in node_image then cannot change what is measured halfway through), or
    from a directory holding a ``node_image`` copy (to measure a proposed change)."""
    if (Path(rev) / "node_image" / "dsm_node").is_dir():
        return _reexec(Path(rev).resolve(), f"directory {Path(rev).resolve()}", argv)
    sha = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", rev],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    snap = Path(tempfile.mkdtemp(prefix=f"dsm-bench-src-{sha}-"))
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", sha, "node_image"], capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(snap)], input=archive, check=True)
    say(f"measuring dsm_node from git {rev} ({sha}), unpacked in {snap}")
    return _reexec(snap, f"git {rev} ({sha})", argv)


def _reexec(snap: Path, label: str, argv: list[str]) -> int:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(snap / "node_image"), str(REPO), os.environ.get("PYTHONPATH", "")]
        ),
        "DSM_BENCH_SNAPSHOT": label,
    }
    return subprocess.call([sys.executable, "-m", "bench.throughput", *argv], env=env)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.node_source != "worktree" and not os.environ.get("DSM_BENCH_SNAPSHOT"):
        return reexec_on_snapshot(args.node_source, argv)
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    raise SystemExit(main())
