"""Helpers shared by the benchmarks: the PostgreSQL server, /proc readings, statistics, output."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from dsm_node.embedded_pg import EmbeddedPostgres

# Durable on purpose: every figure here is for commits that survive a crash.
DURABLE_SETTINGS = {
    "fsync": "on",
    "synchronous_commit": "on",
    "full_page_writes": "on",
    "shared_preload_libraries": "'pg_stat_statements'",
    "pg_stat_statements.max": "1000",
    "max_connections": "300",
}


def say(message: str) -> None:
    print(f"==> {message}", flush=True)


# -- PostgreSQL -------------------------------------------------------------------------------


@dataclass
class Server:
    """The benchmark's private PostgreSQL 15: one database per system, dropped with the server."""

    pg: EmbeddedPostgres

    @classmethod
    def start(cls) -> Server:
        root = Path(tempfile.mkdtemp(prefix="dsm-bench-pg-"))
        pg = EmbeddedPostgres(root / "data", extra_settings=DURABLE_SETTINGS).start()
        pg.wait_ready()
        return cls(pg)

    def stop(self) -> None:
        self.pg.stop("fast")
        shutil.rmtree(self.pg.datadir.parent, ignore_errors=True)

    def url(self, database: str) -> str:
        return self.pg.url(database)

    def create_database(self, name: str) -> str:
        with psycopg.connect(self.pg.admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{name}"')
        with psycopg.connect(self.url(name), autocommit=True) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        return self.url(name)

    def settings(self) -> dict[str, str]:
        names = [
            "server_version",
            "fsync",
            "synchronous_commit",
            "wal_sync_method",
            "shared_buffers",
            "max_wal_size",
        ]
        out = {}
        with psycopg.connect(self.pg.admin_url, autocommit=True) as conn:
            for n in names:
                row = conn.execute(f"SHOW {n}").fetchone()
                out[n] = str(row[0]) if row else ""
        return out

    def postmaster_pid(self) -> int:
        return int((self.pg.datadir / "postmaster.pid").read_text().splitlines()[0])

    def pids(self) -> list[int]:
        """The postmaster and every process it forked (backends, WAL writer, checkpointer...)."""
        root = self.postmaster_pid()
        return [root] + [p for p in all_pids() if parent_pid(p) == root]


# -- /proc ------------------------------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")


def all_pids() -> list[int]:
    return [int(d) for d in os.listdir("/proc") if d.isdigit()]


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2 :].split()


def parent_pid(pid: int) -> int:
    fields = _stat_fields(pid)
    return int(fields[1]) if fields else -1


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process has used so far (0 once it is gone)."""
    fields = _stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / _TICK if fields else 0.0


class CpuMeter:
    """CPU seconds spent by groups of processes between start() and stop()."""

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self.groups = groups
        self.before = {g: {p: cpu_seconds(p) for p in ps} for g, ps in groups.items()}

    def stop(self, groups: dict[str, list[int]]) -> dict[str, float]:
        out = {}
        for g, ps in groups.items():
            start = self.before.get(g, {})
            out[g] = sum(max(0.0, cpu_seconds(p) - start.get(p, 0.0)) for p in ps)
        return out


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS (now) and VmHWM (peak) of a process, in KiB."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    except OSError:
        pass
    return out


class RssSampler:
    """Samples VmRSS of some processes every ``interval`` seconds; keeps each one's maximum."""

    def __init__(self, pids: list[int], interval: float = 0.02) -> None:
        self.pids = pids
        self.interval = interval
        self.peak: dict[int, int] = dict.fromkeys(pids, 0)
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            self._sample()
            await asyncio.sleep(self.interval)

    def _sample(self) -> None:
        for p in self.pids:
            self.peak[p] = max(self.peak[p], memory_kib(p).get("VmRSS", 0))

    def start(self) -> RssSampler:
        self._task = asyncio.create_task(self._run())
        return self

    async def stop(self) -> dict[int, int]:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._sample()
        return self.peak


# -- statistics ---------------------------------------------------------------------------------


def summary(values: list[float]) -> dict[str, Any]:
    """Median, min, max and the interquartile range of several runs."""
    if not values:
        return {"runs": 0}
    vs = sorted(values)
    if len(vs) >= 2:
        quartiles = statistics.quantiles(vs, n=4, method="inclusive")
        q1, q3 = quartiles[0], quartiles[2]
    else:
        q1 = q3 = vs[0]
    return {
        "runs": len(vs),
        "median": statistics.median(vs),
        "min": vs[0],
        "max": vs[-1],
        "q1": q1,
        "q3": q3,
        "values": values,
    }


def fmt_rate(v: float) -> str:
    return f"{v:,.0f}"


def table(rows: list[list[str]], right: set[int] | None = None) -> str:
    """A plain-text (and Markdown-compatible) table."""
    right = right or set()
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]

    def line(r: list[str]) -> str:
        cells = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ]
        return "| " + " | ".join(cells) + " |"

    sep = (
        "|"
        + "|".join(
            ("-" * (w + 1) + ":") if i in right else "-" * (w + 2) for i, w in enumerate(widths)
        )
        + "|"
    )
    return "\n".join([line(rows[0]), sep, *(line(r) for r in rows[1:])])


def python_version() -> str:
    return sys.version.split()[0]
