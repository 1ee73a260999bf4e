"""Figures for the operator with real nodes: time from apply to all nodes ``Online`` for 1 and 3
nodes compared with the sum of the nodes' own start times (the rest is the operator's and the
control plane's overhead), an upgrade of 3 nodes, and the operator's memory at idle and while
reconciling.

Run (needs the control plane built by ``make k8s`` and PostgreSQL's server binaries)::

    .venv/bin/python -m bench.operator_figures                 # reconcile interval 1 s and 10 s
    .venv/bin/python -m bench.operator_figures --intervals 10 --runs 3

It starts its own control plane, PostgreSQL and mini kubelet in a temporary directory, and
prints a Markdown table. Definitions:

- *apply -> Online*: from the apply request until the resource's status shows every node
  ``Online`` with Ready=True (what ``kubectl get dsm`` shows), polled every 0.1 s;
- *node start*: per process, from the kubelet spawning it to its first successful readiness
  probe (the kubelet probes every 1 s, so this includes up to 1 s of probe latency);
- *overhead* = apply -> Online minus the sum of node starts: the operator's reaction time
  (its timer), StatefulSet controller, scheduler, the kubelet's watch, and status writes;
- *RSS*: the operator process' resident memory from /proc: idle = mean over 10 s after the
  cluster settled; reconciling = peak sampled every 0.1 s during launch and upgrade, and VmHWM.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from tests.k8s import controlplane
from tests.k8s.kubeapi import KubeApi
from tests.k8s.kubelet import KubeletEvent, MiniKubelet
from tests.support import e2e
from tests.support.jobtypes import CREATE_EFFECTS
from tests.support.nodes import query, set_settings
from tests.support.waiting import wait_until

from dsm_node.db import migrating
from dsm_node.db.engine import create_engine
from dsm_node.embedded_pg import EmbeddedPostgres

TEMPLATE = "e2e_figures_template"


class RssSampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.samples: list[int] = []
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.wait(0.1):
            try:
                self.samples.append(e2e.rss_kib(self.pid))
            except (OSError, KeyError):
                return

    def stop(self) -> list[int]:
        self.stop_event.set()
        self.join()
        return self.samples


@dataclass
class Run:
    nodes: int
    interval: float
    apply_to_online: float
    node_starts: list[float]
    upgrade: float | None
    rss_idle_before: float
    rss_idle_after: float
    rss_peak: int
    rss_hwm: int

    @property
    def overhead(self) -> float:
        return self.apply_to_online - sum(self.node_starts)


def node_start_times(events: list[KubeletEvent], since: float) -> list[float]:
    spawned: dict[str, float] = {}
    starts = []
    for e in sorted(events, key=lambda e: e.at):
        if e.at < since:
            continue
        if e.kind == "spawned":
            spawned[e.uid] = e.at
        elif e.kind == "ready" and e.uid in spawned:
            starts.append(e.at - spawned.pop(e.uid))
    return starts


def make_template(pg: EmbeddedPostgres) -> None:
    import psycopg

    with psycopg.connect(pg.admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{TEMPLATE}"')
        conn.execute(f'CREATE DATABASE "{TEMPLATE}"')

    async def migrate() -> None:
        engine = create_engine(pg.url(TEMPLATE), pool_size=1)
        try:
            await migrating.ensure_schema(engine, "0.1.0")
        finally:
            await engine.dispose()

    asyncio.run(migrate())


def one_run(
    api: KubeApi,
    kubelet: MiniKubelet,
    pg: EmbeddedPostgres,
    kubeconfig: Path,
    workdir: Path,
    n: int,
    nodes: int,
    interval: float,
    upgrade: bool,
) -> Run:
    import psycopg

    ns = f"figures-{n}"
    api.expect("POST", "/api/v1/namespaces", {"metadata": {"name": ns}})
    wait_until(
        lambda: api.get(f"/api/v1/namespaces/{ns}/serviceaccounts/default") is not None,
        30,
        "default service account",
    )
    db = f"figures_{n}"
    with psycopg.connect(pg.admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{db}" TEMPLATE "{TEMPLATE}"')
    url = pg.url(db)
    query(url, CREATE_EFFECTS)
    set_settings(
        url,
        heartbeat_interval_seconds=e2e.HEARTBEAT_INTERVAL,
        offline_threshold_seconds=e2e.OFFLINE_THRESHOLD,
    )
    manager = e2e.Manager(api, kubelet, ns, url)
    manager.create_secrets()
    operator = e2e.OperatorProcess(
        kubeconfig, ns, workdir / f"operator-{n}.log", reconcile_interval=interval
    ).start()
    try:
        time.sleep(5)  # settle after start-up
        idle_before = statistics.mean(e2e.rss_kib(operator.pid) for _ in range(3))
        sampler = RssSampler(operator.pid)
        sampler.start()
        t0 = time.time()
        manager.apply(nodes=nodes)
        wait_until(lambda: manager.all_online(nodes, "0.1.0"), 600, "all Online")
        elapsed = time.time() - t0
        starts = node_start_times(kubelet.events_of(ns), t0)
        upgrade_s = None
        if upgrade:
            t1 = time.time()
            manager.patch_spec(version="0.2.0")
            wait_until(lambda: manager.all_online(nodes, "0.2.0"), 900, "upgraded")
            upgrade_s = time.time() - t1
        peak = max(sampler.stop() or [0])
        idle: list[int] = []
        for _ in range(20):
            time.sleep(0.5)
            idle.append(e2e.rss_kib(operator.pid))
        hwm = e2e.rss_kib(operator.pid, "VmHWM")
        return Run(
            nodes,
            interval,
            elapsed,
            starts,
            upgrade_s,
            idle_before,
            statistics.mean(idle),
            peak,
            hwm,
        )
    finally:
        operator.stop()
        api.call(
            "DELETE",
            f"/apis/apps/v1/namespaces/{ns}/statefulsets/{manager.name}",
            {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"},
        )
        kubelet.forget_namespace(ns)
        api.call("DELETE", f"/api/v1/namespaces/{ns}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.operator_figures", description=__doc__)
    parser.add_argument("--intervals", type=float, nargs="+", default=[1.0, 10.0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="dsm-e2e-figures-"))
    print(f"work directory (logs): {workdir}", file=sys.stderr)
    counter = itertools.count()
    runs: list[Run] = []
    pg = EmbeddedPostgres(workdir / "pg").start()
    try:
        make_template(pg)
        with controlplane.running(workdir / "k8s", workloads=True) as plane:
            api = KubeApi(plane.kubeconfig)
            e2e.install_crd(api)
            kubelet = e2e.dsm_kubelet(api, workdir / "kubelet")
            kubelet.start()
            try:
                for interval in args.intervals:
                    for nodes in args.nodes:
                        for _ in range(args.runs):
                            run = one_run(
                                api,
                                kubelet,
                                pg,
                                plane.kubeconfig,
                                workdir,
                                next(counter),
                                nodes,
                                interval,
                                upgrade=nodes > 1,
                            )
                            runs.append(run)
                            print(_row(run), file=sys.stderr)
            finally:
                kubelet.stop()
            if kubelet.errors:
                print("kubelet errors:", kubelet.errors, file=sys.stderr)
    finally:
        pg.stop("immediate")
    print(
        "| reconcile interval | nodes | apply -> all Online | node starts (sum) | each node start"
        " | overhead | overhead per node | 3-node upgrade | RSS idle before / after"
        " | RSS peak reconciling (VmHWM) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for run in runs:
        print(_row(run))
    return 0


def _row(r: Run) -> str:
    each = ", ".join(f"{s:.1f}" for s in r.node_starts)
    upgrade = f"{r.upgrade:.1f} s" if r.upgrade is not None else "-"
    return (
        f"| {r.interval:g} s | {r.nodes} | {r.apply_to_online:.1f} s | {sum(r.node_starts):.1f} s"
        f" | {each} | {r.overhead:.1f} s | {r.overhead / r.nodes:.1f} s | {upgrade}"
        f" | {r.rss_idle_before / 1024:.1f} / {r.rss_idle_after / 1024:.1f} MiB"
        f" | {r.rss_peak / 1024:.1f} MiB ({r.rss_hwm / 1024:.1f}) |"
    )


if __name__ == "__main__":
    raise SystemExit(main())
