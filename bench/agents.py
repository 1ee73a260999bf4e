"""Agent heartbeat benchmark: heartbeats/s and events/s per node with durable commits, a new
mutual-TLS connection per heartbeat and 10 events each, 1 and 3 real nodes, group commit side by
side with one transaction per heartbeat, the CPU split (PostgreSQL, nodes, simulator), and a
reconnect storm. Each configuration runs ``--runs`` times in interleaved rounds (the shared
machine's noise falls on all alike); the summary gives the median and the range. Method and
figures: docs/benchmarks.md ("Agent heartbeats").

    .venv/bin/python -m bench.agents [--runs 3] [--agents 600] [--interval 2] [--seconds 30]
                                     [--storm 10000] [--storm-interval 180]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from bench.common import CpuMeter, Server, say, summary, table
from dsm_node.db import migrating  # noqa: F401
from dsm_node.embedded_pg import free_port

REPO = Path(__file__).resolve().parents[1]
SECRET = "bench-local-secret"
API_KEY = "bench-api-key-0123456789"
ONE_TX = {
    "DSM_AGENT_BATCH_MAX": "1",
    "DSM_AGENT_COMMITTERS": "16",
    "DSM_AGENT_BATCH_WAIT_SECONDS": "0",
}


@dataclass(frozen=True)
class Mode:
    """How the nodes commit and how agents connect."""

    name: str
    node_env: dict[str, str]
    full_handshakes: bool  # agents never offer a saved TLS session


MODES = [
    Mode("group-commit", {}, False),
    Mode("one-tx", ONE_TX, False),
    Mode("group-commit-full-tls", {}, True),
]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


@dataclass
class Node:
    name: str
    address: str
    url: str
    extra: dict[str, str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    api_port: int = 0
    hb_port: int = 0

    def start(self) -> None:
        self.api_port = self.api_port or free_port(self.address)
        self.hb_port = self.hb_port or free_port(self.address)
        e = {
            **env(),
            "DSM_DATABASE_URL": self.url,
            "DSM_NODE_NAME": self.name,
            "DSM_BIND_ADDRESS": self.address,
            "DSM_API_PORT": str(self.api_port),
            "DSM_HEARTBEAT_PORT": str(self.hb_port),
            "DSM_LOCAL_SECRET": SECRET,
            "DSM_BOOTSTRAP_API_KEY": API_KEY,
            **self.extra,
        }
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dsm_node", "node", "run"],
                env=e,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(
                    f"https://{self.address}:{self.api_port}/readyz", context=ctx, timeout=2
                ):
                    time.sleep(1.0)  # the heartbeat port opens right after the join
                    return
            except Exception:
                time.sleep(0.3)
        raise RuntimeError(f"{self.name} did not start: {self.log.read_text()[-2000:]}")

    @property
    def manager(self) -> str:
        return f"{self.address}:{self.hb_port}"

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(60)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def api(node: Node, method: str, path: str, body: Any = None) -> Any:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    req = urllib.request.Request(
        f"https://{node.address}:{node.api_port}{path}",
        data=json.dumps(body).encode() if body is not None else None,
        method=method,
        headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, context=ctx, timeout=60) as r:
        return json.loads(r.read())


def simulate(
    managers: list[str],
    count: int,
    interval: float,
    seconds: float,
    state: Path,
    tok: str,
    pin: str,
    status: Path,
    full_handshakes: bool = False,
) -> subprocess.Popen[bytes]:
    args = [
        sys.executable,
        "-m",
        "dsm_node",
        "agents",
        "simulate",
        "--count",
        str(count),
        "--interval",
        str(interval),
        "--events",
        "10",
        "--state-dir",
        str(state),
        "--status-file",
        str(status),
        "--token",
        tok,
        "--ca-pin",
        pin,
        "--duration",
        str(seconds),
        "--connections",
        "128",
    ]
    if full_handshakes:
        args.append("--full-handshakes")
    for m in managers:
        args += ["--manager", m]
    with open(state / "sim.log", "ab") as log:  # the child keeps its own
        return subprocess.Popen(args, env=env(), stdout=subprocess.DEVNULL, stderr=log)


def db_totals(url: str) -> tuple[int, int]:
    with psycopg.connect(url) as c:
        row = c.execute(
            "SELECT coalesce(sum(heartbeats), 0), (SELECT count(*) FROM agent_events) FROM agents"
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def wait_all_answered(status: Path, at_least: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 1800
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the simulator exited with {proc.returncode}")
        try:
            s = json.loads(status.read_text())
            if s.get("perAgent") and all(a["ok"] >= at_least for a in s["perAgent"]):
                return
        except (OSError, ValueError):
            pass
        time.sleep(1)
    raise RuntimeError("agents did not all heartbeat in 30 minutes")


def idle_cpu_rate(pids: list[int], seconds: float = 10.0) -> float:
    """CPU seconds per second the nodes spend with no agent at all (their own loops)."""
    meter = CpuMeter({"nodes": pids})
    time.sleep(seconds)
    return meter.stop({"nodes": pids})["nodes"] / seconds


def run_config(
    server: Server,
    url: str,
    nodes_n: int,
    mode: Mode,
    args: argparse.Namespace,
    work: Path,
    pool: Path,
    tok: dict[str, Any],
) -> dict[str, Any]:
    nodes = [
        Node(
            f"n{i}",
            f"127.0.9.{i + 1}",
            url,
            mode.node_env,
            work / f"{nodes_n}-{mode.name}-n{i}.log",
        )
        for i in range(nodes_n)
    ]
    for n in nodes:
        n.start()
    sim: subprocess.Popen[bytes] | None = None
    try:
        pids = [n.proc.pid for n in nodes if n.proc]
        idle = idle_cpu_rate(pids)
        status = work / f"{nodes_n}-{mode.name}-status.json"
        status.unlink(missing_ok=True)
        sim = simulate(
            [n.manager for n in nodes],
            args.agents,
            args.interval,
            10**6,
            pool,
            tok["token"],
            tok["caPin"],
            status,
            mode.full_handshakes,
        )
        wait_all_answered(status, 2, sim)  # activation (first run only) and warm-up: not measured
        groups = {"postgres": server.pids(), "nodes": pids, "simulator": [sim.pid]}
        hb0, ev0 = db_totals(url)
        s0 = json.loads(status.read_text())
        meter = CpuMeter(groups)
        t0 = time.monotonic()
        time.sleep(args.seconds)
        cpu = meter.stop(groups)
        elapsed = time.monotonic() - t0
        hb1, ev1 = db_totals(url)
        s1 = json.loads(status.read_text())
        hbs, evs = hb1 - hb0, ev1 - ev0
        net_nodes = max(0.0, cpu["nodes"] - idle * elapsed)
        return {
            "nodes": nodes_n,
            "mode": mode.name,
            "agents": args.agents,
            "interval": args.interval,
            "seconds": round(elapsed, 1),
            "heartbeats": hbs,
            "events": evs,
            "heartbeatsPerSecond": hbs / elapsed,
            "eventsPerSecond": evs / elapsed,
            "perNodeHeartbeatsPerSecond": hbs / elapsed / nodes_n,
            "perNodeEventsPerSecond": evs / elapsed / nodes_n,
            "cpuSeconds": cpu,
            "nodeIdleCpuPerSecond": idle,
            "nodeCpuMsPerHeartbeat": 1000 * cpu["nodes"] / max(1, hbs),
            "nodeNetCpuMsPerHeartbeat": 1000 * net_nodes / max(1, hbs),
            "postgresCpuMsPerHeartbeat": 1000 * cpu["postgres"] / max(1, hbs),
            "simulatorCpuMsPerHeartbeat": 1000 * cpu["simulator"] / max(1, hbs),
            "heartbeatsPerNodeCpuSecond": hbs / max(0.001, net_nodes),
            "p50Ms": 1000 * s1["p50Seconds"],
            "p99Ms": 1000 * s1["p99Seconds"],
            "errors": s1["errors"] - s0["errors"],
            "resumedSessions": s1.get("resumedSessions", 0) - s0.get("resumedSessions", 0),
            "loadAverage": os.getloadavg()[0],
        }
    finally:
        if sim is not None and sim.poll() is None:
            sim.send_signal(signal.SIGTERM)
            sim.wait(120)
        for n in nodes:
            n.stop()


def storm(
    url: str, args: argparse.Namespace, work: Path, pool: Path, tok: dict[str, Any]
) -> dict[str, Any]:
    """N agents on 2 nodes (node list); one node is killed; time until every agent heartbeated
    on the other (database timestamps)."""
    nodes = [
        Node(f"s{i}", f"127.0.9.{20 + i}", url, {}, work / f"storm-s{i}.log") for i in range(2)
    ]
    for n in nodes:
        n.start()
    sim: subprocess.Popen[bytes] | None = None
    try:
        interval = args.storm_interval
        status = work / "storm-status.json"
        sim = simulate(
            [n.manager for n in nodes],
            args.storm,
            interval,
            10**6,
            pool,
            tok["token"],
            tok["caPin"],
            status,
        )
        wait_all_answered(status, 2, sim)
        with psycopg.connect(url) as c:
            kill_at = c.execute("SELECT now()").fetchone()[0]  # type: ignore[index]
            on_victim = c.execute(
                "SELECT count(*) FROM agents a JOIN nodes n ON n.id = a.last_node "
                "WHERE n.name = 's1' AND a.last_heartbeat > now() - make_interval(secs => %s)",
                (interval * 2,),
            ).fetchone()[0]  # type: ignore[index]
        nodes[1].kill()
        t0 = time.monotonic()
        while True:
            with psycopg.connect(url) as c:
                left = c.execute(
                    "SELECT count(*) FROM agents WHERE last_heartbeat <= %s "
                    "AND last_heartbeat > %s - make_interval(secs => %s)",
                    (kill_at, kill_at, interval * 2),
                ).fetchone()[0]  # type: ignore[index]
            if left == 0 or time.monotonic() - t0 > 900:
                break
            time.sleep(0.5)
        with psycopg.connect(url) as c:
            took = c.execute(
                "SELECT extract(epoch FROM max(first) - %s) FROM (SELECT agent_id, "
                "min(received_at) AS first FROM agent_events WHERE received_at > %s "
                "GROUP BY agent_id) f",
                (kill_at, kill_at),
            ).fetchone()[0]  # type: ignore[index]
        return {
            "agents": args.storm,
            "interval": interval,
            "agentsOnKilledNode": on_victim,
            "allRehomedAfterSeconds": float(took),
            "notRehomed": left,
            "loadAverage": os.getloadavg()[0],
        }
    finally:
        if sim is not None and sim.poll() is None:
            sim.send_signal(signal.SIGTERM)
            sim.wait(120)
        for n in nodes:
            n.stop()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=3, help="rounds; every configuration once each")
    p.add_argument("--agents", type=int, default=600)
    p.add_argument("--interval", type=float, default=2.0)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--storm", type=int, default=10_000, help="agents in the storm (0 skips)")
    p.add_argument("--storm-interval", type=float, default=180.0)
    p.add_argument("--nodes", default="1,3")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dsm-bench-agents-"))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # finally blocks stop the children
    server = Server.start()
    results: list[dict[str, Any]] = []
    storm_result = None
    try:
        # One database for every configuration: identities are activated once (by the first
        # run) and reused, and history accumulates as it would in a real cluster.
        url = server.create_database("agents")
        boot = Node("n0", "127.0.9.1", url, {}, work / "boot.log")
        boot.start()
        api(
            boot,
            "PATCH",
            "/api/settings",
            {
                "agentHeartbeatIntervalSeconds": max(1.0, args.interval),
                "agentMissedHeartbeatsOffline": 0,
            },
        )
        tok = api(boot, "POST", "/api/agents/tokens", {"maxUses": max(args.agents, args.storm)})
        boot.stop()
        pool = work / "identities"
        pool.mkdir()
        for round_ in range(1, args.runs + 1):
            for n in [int(x) for x in args.nodes.split(",")]:
                for mode in MODES:
                    say(
                        f"round {round_}/{args.runs}: {n} node(s), {mode.name}: {args.agents} "
                        f"agents every {args.interval} s, 10 events each"
                    )
                    r = run_config(server, url, n, mode, args, work, pool, tok)
                    r["round"] = round_
                    say(json.dumps({k: v for k, v in r.items() if k != "cpuSeconds"}))
                    results.append(r)
        if args.storm:
            say(f"storm: {args.storm} agents on 2 nodes, one killed")
            storm_result = storm(url, args, work, pool, tok)
            say(json.dumps(storm_result))
    finally:
        server.stop()
    columns = [
        ("heartbeats/s", "heartbeatsPerSecond", "{:.0f}"),
        ("per node", "perNodeHeartbeatsPerSecond", "{:.0f}"),
        ("events/s", "eventsPerSecond", "{:,.0f}"),
        ("node CPU ms/hb", "nodeNetCpuMsPerHeartbeat", "{:.2f}"),
        ("hb per node-CPU-s", "heartbeatsPerNodeCpuSecond", "{:.0f}"),
        ("PG CPU ms/hb", "postgresCpuMsPerHeartbeat", "{:.2f}"),
        ("sim CPU ms/hb", "simulatorCpuMsPerHeartbeat", "{:.2f}"),
        ("p50 ms", "p50Ms", "{:.0f}"),
        ("p99 ms", "p99Ms", "{:.0f}"),
        ("errors", "errors", "{:.0f}"),
    ]
    rows = [["nodes", "mode", "runs"] + [c[0] for c in columns]]
    summaries: list[dict[str, Any]] = []
    for n in [int(x) for x in args.nodes.split(",")]:
        for mode in MODES:
            mine = [r for r in results if r["nodes"] == n and r["mode"] == mode.name]
            if not mine:
                continue
            stats = {key: summary([float(r[key]) for r in mine]) for _, key, _ in columns}
            summaries.append({"nodes": n, "mode": mode.name, **stats})
            row = [str(n), mode.name, str(len(mine))]
            for _, key, f in columns:
                st = stats[key]
                cell = f.format(st["median"])
                if st["runs"] > 1:
                    cell += f" ({f.format(st['min'])}-{f.format(st['max'])})"
                row.append(cell)
            rows.append(row)
    print("median (min-max) of the runs; node CPU is net of the nodes' idle CPU")
    print(table(rows, right=set(range(2, 3 + len(columns)))))
    if storm_result:
        print("storm:", json.dumps(storm_result))
    out = (
        REPO / "bench" / "results" / f"agents-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    )
    out.parent.mkdir(exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "summary": summaries,
                "results": results,
                "storm": storm_result,
                "args": vars(args),
                "loadAverage": os.getloadavg(),
            },
            indent=2,
        )
    )
    print(f"raw results: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
