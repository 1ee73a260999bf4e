"""``dsm agent run``: one real agent process. Its state lives in a directory and survives
restarts: the identity (certificate, key, agent CA), the last manager list, configuration and
acknowledged sequence (``state.json``), and the events not yet acknowledged (``events.jsonl``).

It activates on first start (any manager in ``--manager``; the token and the CA pin come from
``dsm agents token create``), records an ``agent.started`` event at each start (and
``--events-per-heartbeat`` sample events before each heartbeat), and heartbeats until SIGTERM.
Each heartbeat is one log line.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
from dataclasses import asdict
from pathlib import Path
from typing import Any

from dsm_node import __version__
from dsm_node.agents import agent as agent_mod
from dsm_node.agents.agent import Agent, AgentError, DiskJournal, Identity, State, Unreachable

log = logging.getLogger("dsm.agent")


def parse_managers(values: list[str]) -> list[tuple[str, int]]:
    out = []
    for v in values:
        host, sep, port = v.rpartition(":")
        if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError(f"--manager takes HOST:PORT, got {v!r}")
        out.append((host.strip("[]"), int(port)))
    if not out:
        raise ValueError("give at least one --manager HOST:PORT")
    return out


def _save(path: Path, text: str) -> None:
    agent_mod._write_atomically(path, text)


def load_identity(state_dir: Path) -> Identity | None:
    path = state_dir / "identity.json"
    if not path.exists():
        return None
    return Identity(**json.loads(path.read_text()))


async def run(
    state_dir: Path,
    managers: list[tuple[str, int]],
    token: str | None,
    ca_pin: str | None,
    hostname: str | None,
    events_per_heartbeat: int,
    max_heartbeats: int | None = None,
    clock_offset: float = 0.0,
) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    identity = load_identity(state_dir)
    state_path = state_dir / "state.json"
    if identity is None:
        if not token or not ca_pin:
            log.error("not activated yet: pass --token and --ca-pin (dsm agents token create)")
            return 2
        name = hostname or socket.gethostname()
        while identity is None:
            try:
                identity, answer = await agent_mod.activate(managers, token, ca_pin, name)
            except AgentError as e:
                log.error("%s", e)
                return 3
            except Unreachable as e:
                log.warning("activation: %s; trying again in 10 s", e)
                if await _wait(stop, 10.0):
                    return 0
                continue
            _save(state_dir / "identity.json", json.dumps(asdict(identity)))
            listed = [(m["address"], int(m["port"])) for m in answer["managers"]["addresses"]]
            state = State(
                managers=listed or managers,
                managers_version=answer["managers"]["version"],
                mode=answer["managers"]["mode"],
                interval=float(answer["heartbeatIntervalSeconds"]),
            )
            _save(state_path, state.to_json())
            log.info("activated as agent %d (%s)", identity.agent_id, identity.hostname)
    state = State.from_json(state_path.read_text()) if state_path.exists() else State(managers)
    cert, key = agent_mod.identity_files(state_dir, identity)
    context = agent_mod.trust_ca(identity.ca, cert, key)
    journal = DiskJournal(state_dir)
    journal.append("agent.started", {"version": __version__, "pid": os.getpid()})
    agent = Agent(identity, state, journal, context, clock_offset=clock_offset)
    beats = 0
    while not stop.is_set():
        for i in range(events_per_heartbeat):
            journal.append("agent.sample", {"n": i})
        result = await agent.heartbeat()
        _save(state_path, state.to_json())
        beats += result.ok
        if result.ok:
            log.info(
                "heartbeat to %s: acknowledged %d (%d events sent, %d waiting), next in %.0f s",
                result.manager,
                result.acked,
                result.sent,
                journal.count(state.acked),
                state.interval,
            )
        elif result.fatal:
            log.error("stopping: %s", result.error)
            return 3
        else:
            log.warning(
                "heartbeat failed (%d managers tried): %s; %d events wait",
                result.tried,
                result.error,
                journal.count(state.acked),
            )
        if max_heartbeats is not None and beats >= max_heartbeats:
            return 0
        if await _wait(stop, agent.next_delay()):
            break
    log.info("stopped; %d events wait for the next start", journal.count(state.acked))
    return 0


async def _wait(stop: asyncio.Event, seconds: float) -> bool:
    """Sleeps; True when a stop was asked for meanwhile."""
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        return False
    return True


def record_event(state_dir: Path, type_: str, data: dict[str, Any]) -> int:
    """``dsm agent event``: appends an event for the running (or next) agent to send."""
    if not (state_dir / "identity.json").exists():
        raise ValueError(f"{state_dir} holds no activated agent")
    return DiskJournal(state_dir).append(type_, data)
