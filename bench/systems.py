"""The three systems under test behind one small interface.

Each system has its own database on the shared server, consumers that run in their own processes
(our nodes; one child process for each peer), and three operations the benchmark times:

* ``insert_backlog(n)``: one transaction that stores ``n`` no-op jobs through the system's own
  enqueue path, runs ``ANALYZE`` on the queue table (so that every planner sees the backlog: a
  plan made from an empty table's statistics scans the whole table, see bench/plan_trap.py) and
  commits. Consumers see the whole backlog at the commit.
* ``enqueue(n)``: ``PRODUCERS`` concurrent producers, each with its own connection, storing jobs in
  batches of ``ENQUEUE_BATCH`` (one transaction per batch) through the system's public API.
* ``pending(lo, hi)``: whether any job with an id in [lo, hi] is still waiting or running (an
  index-only probe, cheap enough to run every few milliseconds).
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import psycopg
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from tests.support.nodes import NodeProcess

from bench.common import memory_kib
from bench.peers import PGQ_ENTRYPOINT, PROCRASTINATE_QUEUE, procrastinate_app
from dsm_node import __version__
from dsm_node.db import migrating
from dsm_node.db.engine import create_engine
from dsm_node.jobs import builtin  # noqa: F401  (registers noop and sleep)
from dsm_node.jobs.pool import JobPool, NewJob

REPO = Path(__file__).resolve().parents[1]
PRODUCERS = 4
ENQUEUE_BATCH = 100
BACKLOG_CHUNK = 5_000


class System(Protocol):
    name: str
    queue_tables: list[str]
    control: psycopg.AsyncConnection[Any]

    @property
    def config(self) -> str: ...
    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    def consumer_pids(self) -> list[int]: ...
    async def insert_backlog(self, n: int) -> tuple[int, int, float]: ...
    async def enqueue(self, n: int) -> tuple[int, int]: ...
    async def pending(self, lo: int, hi: int) -> bool: ...


async def connect_control(url: str) -> psycopg.AsyncConnection[Any]:
    return await psycopg.AsyncConnection.connect(url, autocommit=True)


def _split(n: int, parts: int, batch: int) -> list[list[int]]:
    """Batch sizes for each producer: ``n`` jobs in batches of at most ``batch``."""
    sizes = [batch] * (n // batch) + ([n % batch] if n % batch else [])
    return [sizes[i::parts] for i in range(parts)]


# -- our node processes ---------------------------------------------------------------------


@dataclass
class NodeProc:
    """One ``python -m dsm_node node run`` on its own loopback address: the test kit's node
    launcher (tests/support/nodes.py) with the benchmark's settings (warnings only in the log, no
    test job types, no bootstrap API key)."""

    name: str
    address: str
    database_url: str
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    node: NodeProcess = field(init=False)
    idle_memory: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        settings: dict[str, str | None] = {
            "DSM_LOG_LEVEL": "WARNING",
            "DSM_LOCAL_SECRET": "bench-local-secret-not-for-production",
            "DSM_JOB_MODULES": None,
            "DSM_BOOTSTRAP_API_KEY": None,
            **self.env,
        }
        self.node = NodeProcess(
            self.name, self.database_url, self.log_path, settings, address=self.address
        )

    def launch(self) -> None:
        self.node.start()

    @property
    def proc(self) -> subprocess.Popen[bytes] | None:
        return self.node.proc

    @property
    def pid(self) -> int:
        return self.node.pid

    async def wait_ready(self, within_s: float = 60.0) -> None:
        await asyncio.to_thread(self.node.wait_ready, within_s)

    async def stop(self, within_s: float = 30.0) -> None:
        if self.node.child is not None:
            await asyncio.to_thread(self.node.child.stop, within_s)

    def kill(self) -> None:
        self.node.kill()


async def migrate(url: str) -> None:
    engine = create_engine(url, pool_size=1)
    try:
        await migrating.ensure_schema(engine, __version__)
    finally:
        await engine.dispose()


def node_address(i: int) -> str:
    return f"127.0.0.{10 + i}"


@dataclass
class Dsm:
    """Our job pool: ``nodes`` real node processes on one database."""

    url: str
    log_dir: Path
    nodes: int
    concurrency: int
    claim_batch: int
    db_pool_size: int
    name: str = "dsm"
    queue_tables: list[str] = field(default_factory=lambda: ["jobs", "job_history"])
    procs: list[NodeProc] = field(default_factory=list)
    engine: AsyncEngine | None = None
    control: psycopg.AsyncConnection[Any] = field(init=False)

    @property
    def config(self) -> str:
        return f"{self.nodes} node{'s' if self.nodes > 1 else ''}"

    @property
    def settings(self) -> str:
        return (
            f"DSM_CONCURRENCY={self.concurrency} DSM_CLAIM_BATCH={self.claim_batch} "
            f"DSM_DB_POOL_SIZE={self.db_pool_size}"
        )

    async def start(self) -> None:
        self.control = await connect_control(self.url)
        self.engine = create_engine(self.url, pool_size=PRODUCERS, application_name="dsm-bench")
        env = {
            "DSM_CONCURRENCY": str(self.concurrency),
            "DSM_CLAIM_BATCH": str(self.claim_batch),
            "DSM_DB_POOL_SIZE": str(self.db_pool_size),
        }
        self.procs = []
        for i in range(self.nodes):  # one at a time, as the product requires
            n = NodeProc(
                f"bench-{i + 1}",
                node_address(i),
                self.url,
                self.log_dir / f"bench-{i + 1}.log",
                env,
            )
            n.launch()
            await n.wait_ready()
            self.procs.append(n)
        await asyncio.sleep(1.0)
        for n in self.procs:
            n.idle_memory = memory_kib(n.pid)

    async def stop(self) -> None:
        for n in self.procs:
            await n.stop()
        if self.engine is not None:
            await self.engine.dispose()
        await self.control.close()

    def consumer_pids(self) -> list[int]:
        return [n.pid for n in self.procs]

    async def insert_backlog(self, n: int) -> tuple[int, int, float]:
        assert self.engine is not None
        pool = JobPool(self.engine)
        ids: list[int] = []
        async with self.engine.connect() as conn:
            tx = await conn.begin()
            for start in range(0, n, BACKLOG_CHUNK):
                jobs = [NewJob("noop", {}) for _ in range(min(BACKLOG_CHUNK, n - start))]
                ids += await pool._enqueue_plain(conn, jobs)  # what JobPool.enqueue runs
            await conn.execute(text("ANALYZE jobs"))
            await conn.execute(text("SELECT pg_notify('dsm_jobs', '')"))
            t0 = time.perf_counter()
            await tx.commit()
        return min(ids), max(ids), t0

    async def enqueue(self, n: int) -> tuple[int, int]:
        assert self.engine is not None
        pool = JobPool(self.engine)

        async def produce(sizes: list[int]) -> list[int]:
            out: list[int] = []
            for k in sizes:
                out += (await pool.enqueue([NewJob("noop", {}) for _ in range(k)])).ids
            return out

        parts = await asyncio.gather(*(produce(s) for s in _split(n, PRODUCERS, ENQUEUE_BATCH)))
        ids = [i for p in parts for i in p]
        return min(ids), max(ids)

    async def pending(self, lo: int, hi: int) -> bool:
        cur = await self.control.execute(
            "SELECT EXISTS (SELECT 1 FROM jobs WHERE id BETWEEN %s AND %s AND type = 'noop')",
            (lo, hi),
        )
        row = await cur.fetchone()
        return bool(row and row[0])

    async def explain_claim(self) -> str:
        """The claim statement's plan with a backlog present (a queue's claim plan must be checked
        with EXPLAIN: it decides whether a claim walks the ready index or the whole table)."""
        from dsm_node.db.queries import Q

        assert self.engine is not None
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                text("EXPLAIN " + Q.sql["claim_jobs"]), {"node_id": 1, "epoch": 1, "limit": 100}
            )
            plan = "\n".join(r[0] for r in rows)
            await conn.rollback()
        return plan


# -- peers ----------------------------------------------------------------------------------


@dataclass
class PeerProcess:
    argv: list[str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    idle_memory: dict[str, int] = field(default_factory=dict)

    def _spawn(self) -> subprocess.Popen[bytes]:
        with open(self.log_path, "ab") as log:  # the child keeps its own descriptor
            return subprocess.Popen(
                [sys.executable, "-m", "bench.peers", *self.argv],
                stdout=subprocess.PIPE,
                stderr=log,
                cwd=REPO,
            )

    async def start(self) -> None:
        self.proc = self._spawn()
        assert self.proc.stdout is not None
        line = await asyncio.to_thread(self.proc.stdout.readline)
        if line.strip() != b"ready":
            tail = self.log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"peer {self.argv[0]} did not start:\n{tail}")
        await asyncio.sleep(0.5)
        self.idle_memory = memory_kib(self.proc.pid)

    async def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                self.proc.kill()
            await asyncio.sleep(0.05)


@dataclass
class Pgqueuer:
    """pgqueuer consumers (``consumers`` x PgQueuer, batch ``batch``, asyncpg, uvloop)."""

    url: str
    log_dir: Path
    consumers: int
    batch: int
    label: str
    name: str = "pgqueuer"
    queue_tables: list[str] = field(default_factory=lambda: ["pgqueuer", "pgqueuer_log"])
    peer: PeerProcess | None = None
    control: psycopg.AsyncConnection[Any] = field(init=False)

    @property
    def config(self) -> str:
        return self.label

    @property
    def settings(self) -> str:
        return f"{self.consumers} consumers x batch {self.batch}, asyncpg, uvloop"

    async def install(self) -> None:
        import asyncpg
        from pgqueuer import AsyncpgDriver, Queries

        conn = await asyncpg.connect(dsn=self.url)
        try:
            q = Queries(AsyncpgDriver(conn))
            if not await q.schema_is_installed():
                await q.install()
        finally:
            await conn.close()

    async def start(self) -> None:
        self.control = await connect_control(self.url)
        self.peer = PeerProcess(
            [
                "pgqueuer",
                self.url,
                "--consumers",
                str(self.consumers),
                "--batch",
                str(self.batch),
            ],
            self.log_dir / f"pgqueuer-{self.consumers}x{self.batch}.log",
        )
        await self.peer.start()

    async def stop(self) -> None:
        if self.peer is not None:
            await self.peer.stop()
        await self.control.close()

    def consumer_pids(self) -> list[int]:
        return [self.peer.proc.pid] if self.peer and self.peer.proc else []

    async def insert_backlog(self, n: int) -> tuple[int, int, float]:
        import asyncpg
        from pgqueuer import AsyncpgDriver, Queries

        conn = await asyncpg.connect(dsn=self.url)
        try:
            q = Queries(AsyncpgDriver(conn))
            tx = conn.transaction()
            await tx.start()
            ids: list[int] = []
            for start in range(0, n, BACKLOG_CHUNK):
                k = min(BACKLOG_CHUNK, n - start)
                ids += await q.enqueue([PGQ_ENTRYPOINT] * k, [None] * k, [0] * k)
            await conn.execute("ANALYZE pgqueuer")
            t0 = time.perf_counter()
            await tx.commit()
        finally:
            await conn.close()
        return min(ids), max(ids), t0

    async def enqueue(self, n: int) -> tuple[int, int]:
        import asyncpg
        from pgqueuer import AsyncpgDriver, Queries

        conns = [await asyncpg.connect(dsn=self.url) for _ in range(PRODUCERS)]

        async def produce(conn: Any, sizes: list[int]) -> list[int]:
            q = Queries(AsyncpgDriver(conn))
            out: list[int] = []
            for k in sizes:
                out += await q.enqueue([PGQ_ENTRYPOINT] * k, [None] * k, [0] * k)
            return out

        try:
            parts = await asyncio.gather(
                *(
                    produce(c, s)
                    for c, s in zip(conns, _split(n, PRODUCERS, ENQUEUE_BATCH), strict=True)
                )
            )
        finally:
            for c in conns:
                await c.close()
        ids = [i for p in parts for i in p]
        return min(ids), max(ids)

    async def pending(self, lo: int, hi: int) -> bool:
        cur = await self.control.execute(
            "SELECT EXISTS (SELECT 1 FROM pgqueuer WHERE id BETWEEN %s AND %s)", (lo, hi)
        )
        row = await cur.fetchone()
        return bool(row and row[0])


@dataclass
class Procrastinate:
    """One procrastinate worker with ``concurrency`` (its default job retention: rows stay)."""

    url: str
    log_dir: Path
    concurrency: int
    name: str = "procrastinate"
    queue_tables: list[str] = field(
        default_factory=lambda: ["procrastinate_jobs", "procrastinate_events"]
    )
    peer: PeerProcess | None = None
    app: Any = None
    control: psycopg.AsyncConnection[Any] = field(init=False)

    @property
    def config(self) -> str:
        return f"concurrency {self.concurrency}"

    @property
    def settings(self) -> str:
        return f"1 worker, concurrency {self.concurrency}, psycopg, asyncio"

    async def install(self) -> None:
        app = procrastinate_app(self.url, pool_size=1)
        async with app.open_async():
            with_schema = await self._has_schema()
            if not with_schema:
                await app.schema_manager.apply_schema_async()

    async def _has_schema(self) -> bool:
        async with await psycopg.AsyncConnection.connect(self.url, autocommit=True) as c:
            cur = await c.execute("SELECT to_regclass('procrastinate_jobs') IS NOT NULL")
            row = await cur.fetchone()
            return bool(row and row[0])

    async def start(self) -> None:
        self.control = await connect_control(self.url)
        self.app = procrastinate_app(self.url, pool_size=PRODUCERS)
        await self.app.open_async()
        self.peer = PeerProcess(
            ["procrastinate", self.url, "--concurrency", str(self.concurrency)],
            self.log_dir / "procrastinate.log",
        )
        await self.peer.start()

    async def stop(self) -> None:
        if self.peer is not None:
            await self.peer.stop()
        if self.app is not None:
            await self.app.close_async()
        await self.control.close()

    def consumer_pids(self) -> list[int]:
        return [self.peer.proc.pid] if self.peer and self.peer.proc else []

    async def insert_backlog(self, n: int) -> tuple[int, int, float]:
        task = self.app.tasks["noop"]
        async with await psycopg.AsyncConnection.connect(self.url) as conn:
            deferrer = task.configure(connection=conn)
            ids: list[int] = []
            for start in range(0, n, BACKLOG_CHUNK):
                k = min(BACKLOG_CHUNK, n - start)
                ids += await deferrer.batch_defer_async(*({} for _ in range(k)))
            await conn.execute("ANALYZE procrastinate_jobs")
            t0 = time.perf_counter()
            await conn.commit()
        return min(ids), max(ids), t0

    async def enqueue(self, n: int) -> tuple[int, int]:
        task = self.app.tasks["noop"]

        async def produce(sizes: list[int]) -> list[int]:
            out: list[int] = []
            for k in sizes:
                out += await task.batch_defer_async(*({} for _ in range(k)))
            return out

        parts = await asyncio.gather(*(produce(s) for s in _split(n, PRODUCERS, ENQUEUE_BATCH)))
        ids = [i for p in parts for i in p]
        return min(ids), max(ids)

    async def pending(self, lo: int, hi: int) -> bool:
        cur = await self.control.execute(
            "SELECT EXISTS (SELECT 1 FROM procrastinate_jobs WHERE id BETWEEN %s AND %s "
            "AND status IN ('todo', 'doing') AND queue_name = %s)",
            (lo, hi, PROCRASTINATE_QUEUE),
        )
        row = await cur.fetchone()
        return bool(row and row[0])


def consumer_procs(system: Any) -> list[tuple[str, int, dict[str, int]]]:
    """(name, pid, memory read when idle after start) of each consumer process."""
    if isinstance(system, Dsm):
        return [(n.name, n.pid, n.idle_memory) for n in system.procs]
    peer = system.peer
    assert peer is not None and peer.proc is not None
    return [(system.name, peer.proc.pid, peer.idle_memory)]


def consumer_memory(system: Any, loaded_kib: dict[int, int]) -> list[dict[str, Any]]:
    """Per consumer process, in MiB: RSS when idle after start, the largest RSS sampled during
    the measured runs, and VmHWM (the peak since the process started, start-up included)."""
    out = []
    for name, pid, idle in consumer_procs(system):
        out.append(
            {
                "process": name,
                "idle_rss_mib": round(idle.get("VmRSS", 0) / 1024, 1),
                "idle_hwm_mib": round(idle.get("VmHWM", 0) / 1024, 1),
                "loaded_rss_mib": round(loaded_kib.get(pid, 0) / 1024, 1),
                "hwm_mib": round(memory_kib(pid).get("VmHWM", 0) / 1024, 1),
            }
        )
    return out
