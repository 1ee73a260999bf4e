"""Seeded fault injection against a real cluster: node processes, each behind its own TCP proxy to
a PostgreSQL server of its own, under a steady load of transactional and plain jobs.

The seed fixes the schedule: which faults, in which order, against which node, for how long, and
the jobs submitted. (Timing on a shared machine is not reproducible; the schedule is.) Faults run
one at a time, and the cluster settles between them, so that every effect can be attributed:

    sigkill               the node dies; peers take over its jobs after the threshold; it restarts
    sigstop_short         the node pauses for well under its self-stop point; nobody notices
    sigstop_long          the node pauses past the threshold: declared offline, then rejoins
    sigterm               graceful halt (jobs released without spending an attempt); restart
    link_drop             every database connection of the node is reset at once
    link_blackhole        the node's link goes silent past the threshold (no reset)
    short_cut             the database refuses the node for under its self-stop point
    pg_restart_fast       PostgreSQL restarts (fast shutdown) under the whole cluster
    pg_restart_immediate  PostgreSQL crashes and recovers (immediate shutdown)
    pg_outage_long        PostgreSQL is down for longer than the threshold, then starts again
    freeze_in_tx          the node stops inside its completion and heartbeat transactions
    signin_flood          100 concurrent wrong-password sign-ins from 20 addresses

What must hold, checked after the run: every transactional job's effect happened exactly once
(``test_effects`` rows are written in the transaction that completes the job); no acknowledged job
is lost or stuck; no job is a dead letter; no node other than a fault's target is declared offline
(after a PostgreSQL restart neither, however long: silence counts from the server's start at the
earliest); no node other than a fault's target fences itself, unless a PostgreSQL outage fell
inside the silence that led to the fence (every node lost its database then: one that went
without a heartbeat for two thirds of the threshold rightly fenced itself; such fences are
counted apart); every node taken offline is declared so within the threshold and one interval of
its last heartbeat.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime as dt
import http.client
import json
import random
import re
import signal
import ssl
import statistics
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsm_node.embedded_pg import EmbeddedPostgres
from tests.support.effects import prepare
from tests.support.loopback import next_address
from tests.support.nodes import Cluster, NodeProcess, query
from tests.support.tcpproxy import Proxy
from tests.support.waiting import wait_until

KINDS = (
    "sigkill",
    "sigstop_short",
    "sigstop_long",
    "sigterm",
    "link_drop",
    "link_blackhole",
    "short_cut",
    "pg_restart_fast",
    "pg_restart_immediate",
    "pg_outage_long",
    "freeze_in_tx",
    "signin_flood",
)
# Faults after which peers must declare the target offline (and within the bound).
TAKES_OFFLINE = {"sigkill", "sigstop_long", "link_blackhole", "freeze_in_tx"}
# Faults after which the target itself may stop claiming (it could not heartbeat long enough).
MAY_FENCE_TARGET = {"sigstop_long", "link_blackhole", "freeze_in_tx"}


@dataclass(frozen=True)
class Config:
    seed: int
    faults: int  # 0: every kind once, in a seeded order
    nodes: int = 3
    threshold: float = 6.0
    interval: float = 1.0
    kinds: tuple[str, ...] = KINDS  # the kinds to draw from

    @property
    def fence_after(self) -> float:
        return self.threshold * 2 / 3

    @property
    def bound(self) -> float:
        """Silence after which a node taken offline must have been declared offline."""
        return self.threshold + self.interval


@dataclass(frozen=True)
class Fault:
    index: int
    kind: str
    target: str  # a node's name; "postgres" for the server
    seconds: float  # how long the fault lasts, where that is a choice
    gap: float  # pause before the fault


def schedule(config: Config, names: list[str]) -> list[Fault]:
    """The faults of a run: a pure function of the configuration (and so of the seed)."""
    rnd = random.Random(config.seed)
    kinds = list(config.kinds)
    order = rnd.sample(kinds, len(kinds))
    count = config.faults or len(kinds)
    t, f = config.threshold, config.fence_after
    faults = []
    for i in range(count):
        kind = order[i] if i < len(order) else rnd.choice(kinds)
        seconds = {
            "sigstop_short": rnd.uniform(0.2, 0.45) * f,
            "short_cut": rnd.uniform(0.2, 0.45) * f,
            "sigstop_long": t + rnd.uniform(1, 3),
            "link_blackhole": t + rnd.uniform(1, 3),
            "freeze_in_tx": t + rnd.uniform(1, 3),
            "pg_outage_long": t + rnd.uniform(1, 3),
        }.get(kind, 0.0)
        target = "postgres" if kind.startswith("pg_") else rnd.choice(names)
        faults.append(Fault(i + 1, kind, target, round(seconds, 2), round(rnd.uniform(0.5, 2), 2)))
    return faults


@dataclass
class FaultRecord:
    fault: Fault
    started: float = 0.0  # wall clock
    ended: float = 0.0
    silence: float | None = None  # target's silence when declared offline (database clock)
    detected_after: float | None = None  # wall time from the fault to the declaration
    outage: float | None = None  # how long PostgreSQL was away
    note: str = ""


@dataclass
class Report:
    config: Config
    faults: list[FaultRecord] = field(default_factory=list)
    acknowledged: int = 0
    unacknowledged_batches: int = 0
    answers: dict[int, int] = field(default_factory=dict)
    transactional: int = 0
    effects: int = 0
    duplicates: int = 0
    lost: int = 0
    stuck: int = 0
    dead_letters: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    deadline_returns: int = 0
    excused: list[str] = field(default_factory=list)  # fences explained by PostgreSQL outages
    violations: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def text(self) -> str:
        c = self.config
        kinds = Counter(r.fault.kind for r in self.faults)
        lines = [
            f"chaos: seed {c.seed}, {len(self.faults)} faults, {c.nodes} nodes, threshold "
            f"{c.threshold:g} s, heartbeat {c.interval:g} s (bound {c.bound:g} s), "
            f"{self.seconds:.0f} s",
            "faults by kind: " + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())),
            f"jobs acknowledged {self.acknowledged} ({self.transactional} transactional), "
            f"unacknowledged batches {self.unacknowledged_batches}; answers {self.answers}; "
            f"outcomes {self.outcomes}",
            f"effects {self.effects}, duplicates {self.duplicates}, lost {self.lost}, "
            f"stuck {self.stuck}, dead letters {self.dead_letters}, returned at their deadline "
            f"{self.deadline_returns}",
        ]
        silences = [r.silence for r in self.faults if r.silence is not None]
        detected = [r.detected_after for r in self.faults if r.detected_after is not None]
        if silences:
            lines.append(
                f"takeover: silence when declared offline (database clock) n={len(silences)} "
                f"min {min(silences):.2f} median {statistics.median(silences):.2f} max "
                f"{max(silences):.2f} s; over the bound {sum(s > c.bound for s in silences)}; "
                f"fault to declaration (wall) median {statistics.median(detected):.2f} max "
                f"{max(detected):.2f} s"
            )
        outages = [r.outage for r in self.faults if r.outage is not None]
        if outages:
            lines.append("PostgreSQL outages: " + ", ".join(f"{o:.1f} s" for o in outages))
        for r in self.faults:
            f = r.fault
            detail = [f"{f.seconds:g} s"] if f.seconds else []
            if r.silence is not None:
                detail.append(f"declared offline after {r.silence:.2f} s of silence")
            if r.outage is not None:
                detail.append(f"outage {r.outage:.1f} s")
            if r.note:
                detail.append(r.note)
            lines.append(f"  #{f.index:<3} {f.kind:<21} {f.target:<8} " + "; ".join(detail))
        if self.excused:
            lines.append(f"explained by PostgreSQL outages: {len(self.excused)}")
            lines += [f"  {e}" for e in self.excused]
        lines.append(
            "violations: " + ("none" if not self.violations else str(len(self.violations)))
        )
        lines += [f"  {v}" for v in self.violations]
        return "\n".join(lines)


class Producer:
    """Submits a seeded mix of jobs through every node, one thread per node name (a frozen node
    stalls only its own thread), until stopped."""

    def __init__(self, chaos: Chaos, seed: int) -> None:
        self.chaos = chaos
        self.seed = seed
        self.ids: list[int] = []
        self.transactional: list[int] = []
        self.unacknowledged = 0
        self.answers: Counter[int] = Counter()  # HTTP status of every submission
        self.halt = threading.Event()
        self.lock = threading.Lock()
        self.threads = [
            threading.Thread(target=self.run, args=(name, i), daemon=True, name=f"submit-{name}")
            for i, name in enumerate(chaos.names)
        ]

    @staticmethod
    def batch(rnd: random.Random) -> tuple[list[dict[str, Any]], int]:
        jobs: list[dict[str, Any]] = []
        n = rnd.randint(5, 20)
        for _ in range(n):
            payload = {
                "sleep_before": rnd.choice([0, 0, 0.05, 0.2]),
                "sleep_after_write": rnd.choice([0, 0, 0.05, 0.3]),
            }
            jobs.append({"type": "record_effect", "timeoutSeconds": 30, "payload": payload})
        jobs += [{"type": "noop", "maxAttempts": 10}] * rnd.randint(0, 10)
        return jobs, n

    def run(self, name: str, index: int) -> None:
        rnd = random.Random(self.seed * 1000 + index)
        while not self.halt.wait(0.25):
            jobs, transactional = self.batch(rnd)
            node = self.chaos.cluster.nodes[name]  # the latest process of that name
            try:
                status, body = node.request("POST", "/api/jobs", {"jobs": jobs}, timeout=5)
            except OSError:
                with self.lock:
                    self.unacknowledged += 1  # may or may not have been stored
                continue
            with self.lock:
                self.answers[status] += 1
                if status == 201:
                    ids = list(body["ids"])
                    self.ids += ids
                    self.transactional += ids[:transactional]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def stop(self) -> None:
        self.halt.set()
        for t in self.threads:
            t.join(30)


class Chaos:
    def __init__(self, pg: EmbeddedPostgres, database: str, log_dir: Path, config: Config) -> None:
        self.pg = pg
        self.url = pg.url(database)
        self.config = config
        self.log_dir = log_dir
        self.cluster = Cluster(self.url, log_dir)
        self.names = [f"n{i + 1}" for i in range(config.nodes)]
        self.proxies = {n: Proxy(pg.port) for n in self.names}
        self.report = Report(config)
        self.producer = Producer(self, config.seed + 1)

    # -- the cluster ----------------------------------------------------------------------

    def start_node(self, name: str) -> NodeProcess:
        proxy = self.proxies[name]
        return self.cluster.start(
            name,
            database_url=self.url.replace(f":{self.pg.port}/", f":{proxy.port}/"),
            DSM_TEST_FAULT_FILE=str(self.fault_file(name)),
            DSM_SHUTDOWN_GRACE_SECONDS="2",
        )

    def fault_file(self, name: str) -> Path:
        return self.log_dir / f"fault-{name}"

    def nodes_table(self) -> dict[str, tuple[str, int, float]]:
        """name -> (status, epoch, seconds since its last heartbeat)."""
        return {
            n: (s, int(e), float(age))
            for n, s, e, age in query(
                self.url,
                "SELECT name, status, epoch, extract(epoch FROM now() - last_heartbeat) FROM nodes",
            )
        }

    def all_online(self) -> bool:
        try:
            table = self.nodes_table()
        except Exception:
            return False
        return all(
            n in table
            and table[n][0] == "online"
            and table[n][2] < 2 * self.config.interval + 1
            and self.cluster.nodes[n].proc is not None
            and self.cluster.nodes[n].proc.poll() is None  # type: ignore[union-attr]
            and not self.cluster.nodes[n].is_stopped()
            for n in self.names
        )

    def wait_offline(self, record: FaultRecord, name: str) -> None:
        """Waits for peers to declare the node offline; records the silence and the delay."""

        def declared() -> tuple[float, str] | None:
            rows = query(
                self.url,
                "SELECT extract(epoch FROM status_changed_at - last_heartbeat), status "
                "FROM nodes WHERE name = %s AND status <> 'online'",
                (name,),
            )
            return (float(rows[0][0]), str(rows[0][1])) if rows else None

        try:
            silence, _ = wait_until(declared, 4 * self.config.threshold + 10, f"{name} offline")
        except AssertionError:
            self.report.violations.append(f"#{record.fault.index}: {name} never declared offline")
            return
        record.silence = silence
        record.detected_after = time.time() - record.started
        if silence > self.config.bound + self.config.interval:
            self.report.violations.append(
                f"#{record.fault.index}: {name} declared offline after {silence:.2f} s of "
                f"silence (bound {self.config.bound:g} s)"
            )

    def settle(self, record: FaultRecord | None) -> None:
        try:
            wait_until(self.all_online, 90, "every node online again")
        except AssertionError:
            where = f"#{record.fault.index}" if record else "end"
            self.report.violations.append(f"{where}: the cluster did not recover: {self.table()}")

    def table(self) -> str:
        with contextlib.suppress(Exception):
            return str(self.nodes_table())
        return "(database unreachable)"

    # -- faults ---------------------------------------------------------------------------

    def apply(self, fault: Fault) -> FaultRecord:
        record = FaultRecord(fault, started=time.time())
        getattr(self, f"_{fault.kind}")(record)
        record.ended = time.time()
        return record

    def _node(self, record: FaultRecord) -> NodeProcess:
        return self.cluster.nodes[record.fault.target]

    def _sigkill(self, record: FaultRecord) -> None:
        self._node(record).kill()
        self.wait_offline(record, record.fault.target)
        self.start_node(record.fault.target)

    def _sigstop_short(self, record: FaultRecord) -> None:
        node = self._node(record)
        node.signal(signal.SIGSTOP)
        time.sleep(record.fault.seconds)
        node.signal(signal.SIGCONT)

    def _sigstop_long(self, record: FaultRecord) -> None:
        node = self._node(record)
        node.signal(signal.SIGSTOP)
        try:
            self.wait_offline(record, record.fault.target)
            time.sleep(max(0.0, record.started + record.fault.seconds - time.time()))
        finally:
            node.signal(signal.SIGCONT)

    def _sigterm(self, record: FaultRecord) -> None:
        code = self._node(record).stop()
        if code != 0:
            self.report.violations.append(f"#{record.fault.index}: SIGTERM exit code {code}")
        self.start_node(record.fault.target)

    def _link_drop(self, record: FaultRecord) -> None:
        self.proxies[record.fault.target].drop()

    def _link_blackhole(self, record: FaultRecord) -> None:
        proxy = self.proxies[record.fault.target]
        proxy.cut()
        try:
            self.wait_offline(record, record.fault.target)
            time.sleep(max(0.0, record.started + record.fault.seconds - time.time()))
        finally:
            proxy.restore()

    def _short_cut(self, record: FaultRecord) -> None:
        proxy = self.proxies[record.fault.target]
        proxy.refuse()
        time.sleep(record.fault.seconds)
        proxy.restore()

    def _pg_restart(self, record: FaultRecord, mode: str, down: float = 0.0) -> None:
        began = time.monotonic()
        self.pg.stop(mode)
        time.sleep(down)
        self.pg.start()
        record.outage = time.monotonic() - began

    def _pg_restart_fast(self, record: FaultRecord) -> None:
        self._pg_restart(record, "fast")

    def _pg_restart_immediate(self, record: FaultRecord) -> None:
        self._pg_restart(record, "immediate")

    def _pg_outage_long(self, record: FaultRecord) -> None:
        self._pg_restart(record, "fast", record.fault.seconds)

    def _freeze_in_tx(self, record: FaultRecord) -> None:
        node = self._node(record)
        armed = self.fault_file(record.fault.target)
        armed.write_text("completion heartbeat")
        try:
            wait_until(node.is_stopped, 20, "the node stops inside its transactions")
        except AssertionError:
            armed.unlink(missing_ok=True)
            record.note = "not reached (no completion in 20 s)"
            return
        record.started = time.time()
        record.note = "stopped holding job rows and its own row"
        try:
            self.wait_offline(record, record.fault.target)
            time.sleep(max(0.0, record.started + record.fault.seconds - time.time()))
        finally:
            node.signal(signal.SIGCONT)

    def _signin_flood(self, record: FaultRecord) -> None:
        node = self._node(record)
        base = next_address().rsplit(".", 1)[0]
        sources = [f"{base}.{200 + i}" for i in range(20)]
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE

        def attempt(i: int) -> int:
            conn = http.client.HTTPSConnection(
                node.address,
                node.port,
                timeout=60,
                context=ctx,
                source_address=(sources[i % 20], 0),
            )
            try:
                body = json.dumps({"username": f"flood-{i}", "password": "wrong password!"})
                conn.request("POST", "/api/sessions", body, {"Content-Type": "application/json"})
                return conn.getresponse().status
            except OSError:
                return 0
            finally:
                conn.close()

        with concurrent.futures.ThreadPoolExecutor(100) as pool:
            statuses = Counter(pool.map(attempt, range(100)))
        if errors := sum(n for status, n in statuses.items() if status >= 500 and status != 503):
            self.report.violations.append(
                f"#{record.fault.index}: {errors} sign-ins answered with a server error"
            )
        record.note = "answers " + ", ".join(
            f"{s or 'error'}: {n}" for s, n in sorted(statuses.items())
        )

    # -- the run --------------------------------------------------------------------------

    def run(self) -> Report:
        began = time.monotonic()
        cfg = self.config
        first = self.start_node(self.names[0])
        prepare(self.url, cfg.threshold, cfg.interval)
        wait_until(
            lambda: f"offline threshold {cfg.threshold:g} s" in first.log_text(),
            30,
            "the first node takes the test timing",
        )
        for name in self.names[1:]:
            self.start_node(name)
        self.producer.start()
        faults = schedule(cfg, self.names)
        print("chaos schedule:", ", ".join(f"{f.kind}@{f.target}" for f in faults), flush=True)
        try:
            for fault in faults:
                time.sleep(fault.gap)
                epochs = {n: e for n, (_, e, _) in self.nodes_table().items()}
                record = self.apply(fault)
                self.report.faults.append(record)
                self.settle(record)
                self.check_bystanders(record, epochs)
                print(f"chaos #{fault.index} {fault.kind}@{fault.target} done", flush=True)
            time.sleep(2)
        finally:
            self.producer.stop()
        self.settle(None)
        self.verify()
        self.check_logs()
        self.report.seconds = time.monotonic() - began
        return self.report

    def check_bystanders(self, record: FaultRecord, epochs: dict[str, int]) -> None:
        """No node other than the target was declared offline (it would have a new epoch). A
        PostgreSQL restart excuses nothing here: the nodes' silence counts from the server's
        start at the earliest, so a restart alone never makes a node Offline."""
        for name, (_, epoch, _) in self.nodes_table().items():
            if name != record.fault.target and epochs.get(name, epoch) != epoch:
                self.report.violations.append(
                    f"#{record.fault.index}: bystander {name} was declared offline "
                    f"(incarnation {epochs[name]} -> {epoch})"
                )

    @staticmethod
    def excused_by_postgres(record: FaultRecord, at: float, silence: float | None) -> bool:
        """Whether a PostgreSQL outage explains a node fencing itself at ``at`` after ``silence``
        seconds without a heartbeat: the outage fell inside that silence. (The silence also holds
        the time since the last beat before the outage and the reconnection after it, which a
        loaded machine stretches: a 1.5 s outage has been seen to cost 4.1 s of silence, an
        honest fence. A fence whose silence began after the server was back is not excused.)"""
        if record.outage is None or silence is None:
            return False
        return record.started <= at and record.ended >= at - silence

    def verify(self) -> None:
        r, url = self.report, self.url
        with contextlib.suppress(AssertionError):
            wait_until(
                lambda: query(url, "SELECT count(*) FROM jobs")[0][0] == 0, 120, "every job ends"
            )
        left = {int(i) for (i,) in query(url, "SELECT id FROM jobs WHERE target_node IS NULL")}
        r.stuck = len(left)
        ids = self.producer.ids
        r.acknowledged = len(ids)
        r.transactional = len(self.producer.transactional)
        r.unacknowledged_batches = self.producer.unacknowledged
        r.answers = dict(sorted(self.producer.answers.items()))
        if errors := sum(n for status, n in r.answers.items() if status >= 500 and status != 503):
            r.violations.append(f"{errors} submissions answered with a server error")
        finished = {
            int(i): str(o)
            for i, o in query(
                url,
                "SELECT id, outcome FROM job_history WHERE type IN ('record_effect', 'noop')",
            )
        }
        r.lost = sum(1 for i in ids if i not in finished and i not in left)
        r.outcomes = dict(Counter(finished[i] for i in ids if i in finished))
        r.dead_letters = r.outcomes.get("failed", 0)
        counts = dict(query(url, "SELECT job_id, count(*) FROM test_effects GROUP BY job_id"))
        r.effects = sum(counts.values())
        r.duplicates = sum(1 for n in counts.values() if n > 1)
        missing = [
            i
            for i in self.producer.transactional
            if finished.get(i) == "succeeded" and counts.get(i, 0) == 0
        ]
        unexplained = [i for i, n in counts.items() if finished.get(int(i)) != "succeeded"]
        if r.duplicates:
            r.violations.append(f"{r.duplicates} transactional jobs took effect more than once")
        if missing:
            r.violations.append(f"{len(missing)} succeeded transactional jobs without an effect")
        if unexplained:
            r.violations.append(f"{len(unexplained)} effects of jobs that did not succeed")
        if r.lost:
            r.violations.append(f"{r.lost} acknowledged jobs lost")
        if r.stuck:
            r.violations.append(f"{r.stuck} jobs never ended")
        if r.dead_letters:
            r.violations.append(f"{r.dead_letters} jobs ended as dead letters")

    def check_logs(self) -> None:
        """Fences and declarations that no fault explains."""
        threshold = self.config.threshold
        windows = [
            (r, r.started, r.ended + 2 * threshold) for r in self.report.faults
        ]  # effects of a fault may show a little after it ended

        def explained(at: float, node: str, allowed: set[str], raw: str, declared: bool) -> bool:
            silent = re.search(r"no heartbeat for ([0-9.]+) s", raw)
            for r, start, end in windows:
                if not start <= at <= end:
                    continue
                if r.fault.target == node and r.fault.kind in allowed:
                    return True
                if not declared and self.excused_by_postgres(
                    r, at, float(silent.group(1)) if silent else None
                ):
                    self.report.excused.append(f"#{r.fault.index} {r.fault.kind}: {raw}")
                    return True
            return False

        line = re.compile(r"^(\S+)Z \w+\s+\S+ \S+: (.*)$")
        for proc in self.cluster.started:
            for raw in proc.log_text().splitlines():
                m = line.match(raw)
                if not m:
                    continue
                at = dt.datetime.fromisoformat(m.group(1)).replace(tzinfo=dt.UTC).timestamp()
                message = m.group(2)
                if message.startswith("stopped claiming jobs") and not explained(
                    at, proc.name, MAY_FENCE_TARGET | TAKES_OFFLINE, raw, declared=False
                ):
                    self.report.violations.append(f"{proc.name} fenced itself: {raw}")
                if (d := re.match(r"declared (\S+) offline", message)) and not explained(
                    at, d.group(1), TAKES_OFFLINE, raw, declared=True
                ):
                    self.report.violations.append(f"{d.group(1)} declared offline: {raw}")
                if "past their deadline" in message:
                    self.report.deadline_returns += int(message.split()[0])

    def close(self) -> None:
        self.producer.halt.set()
        self.cluster.close()
        for p in self.proxies.values():
            p.close()
