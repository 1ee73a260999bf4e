"""``dsm agents simulate``: many agents in one process for load tests and demos, with the same
behaviour as ``dsm agent run`` (``agent.Agent``: random pick, failover, buffered events) and
events buffered in memory. Identities are kept in ``--state-dir`` so that a second run reuses
them instead of activating again.

A live progress line shows agents active (a heartbeat answered within the last two intervals),
heartbeats per second, errors and the 99th percentile of a heartbeat's time; ``--status-file``
receives, every second, the totals and each agent's view (its manager list, acknowledged and
recorded sequence), which the tests read.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import random
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dsm_node.agents import agent as agent_mod
from dsm_node.agents.agent import Agent, AgentError, Identity, MemoryJournal, State, Unreachable


@dataclass
class Totals:
    heartbeats: int = 0
    errors: int = 0
    failovers: int = 0
    events_sent: int = 0
    fatal: int = 0
    latencies: collections.deque[float] = field(
        default_factory=lambda: collections.deque(maxlen=20_000)
    )
    recent: collections.deque[float] = field(
        default_factory=lambda: collections.deque(maxlen=200_000)
    )
    last_error: str = ""


@dataclass
class Simulated:
    agent: Agent
    journal: MemoryJournal
    last_ok: float = 0.0
    last_manager: str = ""
    ok: int = 0
    failed: int = 0
    stopped: bool = False


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _identities(
    state_dir: Path,
    count: int,
    managers: list[tuple[str, int]],
    token: str | None,
    ca_pin: str | None,
    concurrency: int,
    say: Any,
) -> list[Identity]:
    d = state_dir / "identities"
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    found: list[Identity | None] = []
    for i in range(count):
        p = d / f"{i}.json"
        found.append(Identity(**json.loads(p.read_text())) if p.exists() else None)
    missing = [i for i, x in enumerate(found) if x is None]
    if missing and (not token or not ca_pin):
        raise AgentError(f"{len(missing)} agents need activation: pass --token and --ca-pin")
    gate = asyncio.Semaphore(concurrency)
    done = [0]

    async def one(i: int) -> None:
        async with gate:
            for attempt in range(30):
                try:
                    ident, _ = await agent_mod.activate(
                        managers, token or "", ca_pin or "", f"sim-{i:05d}"
                    )
                    break
                except Unreachable:
                    await asyncio.sleep(min(10.0, 0.5 * (attempt + 1)))
            else:
                raise AgentError(f"agent {i}: no manager could be reached for activation")
            agent_mod._write_atomically(d / f"{i}.json", json.dumps(asdict(ident)))
            found[i] = ident
            done[0] += 1
            say(f"activating: {done[0]}/{len(missing)}")

    await asyncio.gather(*(one(i) for i in missing))
    return [x for x in found if x is not None]


async def simulate(
    managers: list[tuple[str, int]],
    count: int,
    interval: float | None,
    events: int,
    state_dir: Path,
    token: str | None = None,
    ca_pin: str | None = None,
    duration: float | None = None,
    status_file: Path | None = None,
    connections: int = 256,
    seed: int | None = None,
    live: bool | None = None,
    resume_sessions: bool = True,
) -> dict[str, Any]:
    live = sys.stderr.isatty() if live is None else live
    last_line = [0.0]

    def say(text: str, force: bool = False) -> None:
        now = time.monotonic()
        if live:
            print(f"\r\033[K{text}", end="", file=sys.stderr, flush=True)
        elif force or now - last_line[0] >= 5:
            last_line[0] = now
            print(text, file=sys.stderr, flush=True)

    rng = random.Random(seed)
    identities = await _identities(state_dir, count, managers, token, ca_pin, 32, say)
    say(f"{len(identities)} agents ready; preparing their TLS contexts", force=True)
    certs = state_dir / "certs"
    sims: list[Simulated] = []
    for i, ident in enumerate(identities):
        cert, key = agent_mod.identity_files(certs / str(i), ident)
        journal = MemoryJournal()
        state = State(list(managers), interval=interval or 600.0)
        a = Agent(
            ident,
            state,
            journal,
            agent_mod.trust_ca(ident.ca, cert, key),
            random.Random(rng.random()),
            resume_sessions=resume_sessions,
        )
        sims.append(Simulated(a, journal))
    totals = Totals()
    gate = asyncio.Semaphore(connections)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    started = time.monotonic()

    async def life(s: Simulated) -> None:
        await _sleep(stop, s.agent.rng.uniform(0, interval or 1.0))
        while not stop.is_set():
            for _ in range(events):
                s.journal.append("sim.sample", {"agent": s.agent.identity.agent_id})
            async with gate:
                r = await s.agent.heartbeat()
            now = time.monotonic()
            if r.ok:
                s.ok += 1
                s.last_ok = now
                s.last_manager = r.manager or ""
                totals.heartbeats += 1
                totals.events_sent += r.sent
                totals.latencies.append(r.seconds)
                totals.recent.append(now)
                if r.tried > 1:
                    totals.failovers += 1
            else:
                s.failed += 1
                totals.errors += 1
                totals.last_error = r.error or ""
                if r.fatal:
                    totals.fatal += 1
                    s.stopped = True
                    return
            if interval is not None:
                s.agent.state.interval = interval
            await _sleep(stop, s.agent.next_delay())

    def snapshot(final: bool = False) -> dict[str, Any]:
        now = time.monotonic()
        window = 5.0
        rate = sum(1 for t in totals.recent if t >= now - window) / min(
            window, max(0.001, now - started)
        )
        horizon = 2 * (interval or max(s.agent.state.interval for s in sims))
        active = sum(1 for s in sims if s.last_ok and now - s.last_ok <= horizon)
        lat = list(totals.latencies)
        doc = {
            "agents": len(sims),
            "active": active,
            "heartbeats": totals.heartbeats,
            "heartbeatsPerSecond": round(rate, 1),
            "errors": totals.errors,
            "failovers": totals.failovers,
            "fatal": totals.fatal,
            "eventsSent": totals.events_sent,
            "resumedSessions": sum(s.agent.resumed for s in sims),
            "p50Seconds": round(percentile(lat, 0.5), 4),
            "p99Seconds": round(percentile(lat, 0.99), 4),
            "lastError": totals.last_error,
            "elapsedSeconds": round(now - started, 1),
        }
        if final or status_file is not None:
            doc["perAgent"] = [
                {
                    "agentId": s.agent.identity.agent_id,
                    "managersVersion": s.agent.state.managers_version,
                    "managers": [f"{a}:{p}" for a, p in s.agent.state.managers],
                    "mode": s.agent.state.mode,
                    "acked": s.agent.state.acked,
                    "recorded": s.journal.highest(),
                    "waiting": s.journal.count(s.agent.state.acked),
                    "lastManager": s.last_manager,
                    "ok": s.ok,
                    "failed": s.failed,
                    "stopped": s.stopped,
                }
                for s in sims
            ]
        return doc

    async def report() -> None:
        while not stop.is_set():
            doc = snapshot()
            say(
                f"agents {doc['active']}/{doc['agents']} active | {doc['heartbeatsPerSecond']:.1f}"
                f" heartbeats/s | errors {doc['errors']} | failovers {doc['failovers']} | "
                f"p99 {doc['p99Seconds'] * 1000:.0f} ms"
            )
            if status_file is not None:
                agent_mod._write_atomically(status_file, json.dumps(doc))
            await _sleep(stop, 1.0)

    tasks = [asyncio.create_task(life(s)) for s in sims]
    reporter = asyncio.create_task(report())
    if duration is not None:
        await _sleep(stop, duration)
        stop.set()
    else:
        await stop.wait()
    await asyncio.gather(*tasks, return_exceptions=True)
    reporter.cancel()
    final = snapshot(final=True)
    if status_file is not None:
        agent_mod._write_atomically(status_file, json.dumps(final))
    if live:
        print(file=sys.stderr)
    return final


async def _sleep(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), max(0.0, seconds))
