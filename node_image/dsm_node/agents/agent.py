"""One agent's behaviour, shared by ``dsm agent run`` (one agent, state on disk) and
``dsm agents simulate`` (many agents in one process, state in memory): activation, heartbeats,
the manager list with random pick and failover, buffered events.

Each heartbeat is a new TLS connection to a manager picked at random from the list; when it
cannot connect (TCP, TLS, a timeout, a 503) it tries another, until one answers or none can be
reached, and then it waits for its next heartbeat (see ``heartbeat_delay``). Events recorded
meanwhile stay in the journal and are sent later, oldest first; only an acknowledgement removes
them, so a lost answer means the same events are sent again (the node stores them once).
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import os
import random
import ssl
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from dsm_node import __version__
from dsm_node.agents import pki, protocol

CONNECT_TIMEOUT = 10.0
ANSWER_TIMEOUT = 30.0
JITTER = 0.1  # heartbeats come 90-100% of the interval apart
LOAD_BALANCER_TRIES = 3


def heartbeat_delay(interval: float, rng: random.Random) -> float:
    """The wait before the next heartbeat: a random point in the last tenth of the interval.
    Random, so that agents that lost their node together do not come back in lockstep; never
    longer than the interval, so that an agent whose node died is re-homed within one interval
    (plus its failover) and is never late by its own choice."""
    return interval * rng.uniform(1 - JITTER, 1)


class AgentError(RuntimeError):
    """The agent cannot go on (activation refused, certificate revoked): the message says why."""


class Unreachable(Exception):
    """This manager could not be reached or could not serve (try another)."""


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes
    session: ssl.SSLSession | None = None
    resumed: bool = False

    def json(self) -> Any:
        return json.loads(self.body)


# -- the wire ---------------------------------------------------------------------------------


async def exchange(
    address: str,
    port: int,
    context: ssl.SSLContext,
    method: str,
    path: str,
    body: bytes = b"",
    session: ssl.SSLSession | None = None,
) -> Reply:
    """One request on a new TLS connection. Raises Unreachable for anything that means "try
    another manager": connection or handshake failures, timeouts, a truncated answer.

    TLS runs over memory buffers here (``ssl.SSLObject``) rather than asyncio's TLS transport,
    because only this way can a connection offer a saved TLS session: a manager that issued it
    resumes the session (no certificate signatures or verification, about half of a handshake's
    cost on both sides) and still sees this agent's certificate, which the session carries.
    ``Reply.session`` is the session to offer the same manager next time."""
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT):
            reader, writer = await asyncio.open_connection(address, port)
    except (OSError, TimeoutError) as e:
        raise Unreachable(f"{address}:{port}: {type(e).__name__}: {e}") from None
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(
        incoming,
        outgoing,
        server_hostname=None if _is_ip(address) else address,
        session=session if session is not None else None,
    )

    async def flush() -> None:
        data = outgoing.read()
        if data:
            writer.write(data)
            await writer.drain()

    async def fill() -> bool:
        data = await reader.read(65536)
        if not data:
            incoming.write_eof()
            return False
        incoming.write(data)
        return True

    head = f"{method} {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n"
    if method == "POST":
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    chunks: list[bytes] = []
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT):
            while True:
                try:
                    tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    await flush()
                    if not await fill():
                        raise ConnectionResetError("closed during the TLS handshake") from None
        tls.write(head.encode() + b"\r\n" + body)
        await flush()
        async with asyncio.timeout(ANSWER_TIMEOUT):
            while True:
                try:
                    chunk = tls.read(65536)
                except ssl.SSLWantReadError:
                    await flush()
                    if not await fill():
                        break
                    continue
                except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                    break
                if not chunk:
                    break
                chunks.append(chunk)
    except (OSError, ssl.SSLError, TimeoutError) as e:
        raise Unreachable(f"{address}:{port}: {type(e).__name__}: {e}") from None
    finally:
        writer.close()
    raw = b"".join(chunks)
    head_end = raw.find(b"\r\n\r\n")
    if head_end < 0:
        raise Unreachable(f"{address}:{port}: no answer")
    status_line = raw[: raw.find(b"\r\n")].split(b" ")
    try:
        status = int(status_line[1])
    except (IndexError, ValueError):
        raise Unreachable(f"{address}:{port}: not an HTTP answer") from None
    return Reply(status, raw[head_end + 4 :], tls.session, tls.session_reused)


def _is_ip(address: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(address)
    except ValueError:
        return False
    return True


def trust_nothing() -> ssl.SSLContext:
    """For fetching the CA before activation: the CA is checked against the pin instead."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def trust_ca(
    ca_pem: str, cert_file: Path | None = None, key_file: Path | None = None
) -> ssl.SSLContext:
    """Verifies managers against the agent CA (not host names: see docs/agent-protocol.md)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=ca_pem)
    if cert_file is not None and key_file is not None:
        ctx.load_cert_chain(cert_file, key_file)
    return ctx


# -- identity and activation -------------------------------------------------------------------


@dataclass(frozen=True)
class Identity:
    agent_id: int
    hostname: str
    certificate: str
    key: str
    ca: str


def pin_of_pem(ca_pem: str) -> str:
    return pki.pin_of(x509.load_pem_x509_certificate(ca_pem.encode()))


async def activate(
    managers: list[tuple[str, int]],
    token: str,
    ca_pin: str,
    hostname: str,
    rng: random.Random | None = None,
) -> tuple[Identity, dict[str, Any]]:
    """Activates on any manager that answers (random pick, failover); returns the identity and
    the activation answer. Raises AgentError when activation is refused, Unreachable when no
    manager could be reached."""
    order = list(managers)
    (rng or random).shuffle(order)
    failures = []
    for address, port in order:
        try:
            ca_reply = await exchange(address, port, trust_nothing(), "GET", protocol.PATH_CA)
            if ca_reply.status != 200:
                raise Unreachable(f"{address}:{port}: {ca_reply.status} for the CA")
            ca_pem = ca_reply.body.decode()
            try:
                pin = pin_of_pem(ca_pem)
            except ValueError:
                raise AgentError(f"{address}:{port} sent no certificate for its CA") from None
            if pin != ca_pin.lower():
                raise AgentError(
                    f"{address}:{port} presents an agent CA with pin {pin}, not the {ca_pin} "
                    "given with the token: refusing to send the token"
                )
            key = pki.new_key()
            body = protocol.dumps(
                {
                    "protocol": protocol.PROTOCOL_VERSION,
                    "token": token,
                    "hostname": hostname,
                    "csr": pki.csr_for(key, hostname),
                }
            )
            reply = await exchange(
                address, port, trust_ca(ca_pem), "POST", protocol.PATH_ACTIVATE, body
            )
        except Unreachable as e:
            failures.append(str(e))
            continue
        if reply.status == 503:
            failures.append(f"{address}:{port}: 503")
            continue
        if reply.status != 201:
            raise AgentError(f"activation refused by {address}:{port}: {_error_of(reply)}")
        answer = reply.json()
        return (
            Identity(
                int(answer["agentId"]), hostname, answer["certificate"], pki.key_pem(key), ca_pem
            ),
            answer,
        )
    raise Unreachable("no manager could be reached: " + "; ".join(failures))


def _error_of(reply: Reply) -> str:
    try:
        doc = reply.json()
        return f"{reply.status} {doc.get('code')}: {doc.get('error')}"
    except (ValueError, AttributeError):
        return f"{reply.status} {reply.body[:200]!r}"


# -- events ------------------------------------------------------------------------------------


class Journal(Protocol):
    """Where an agent's events wait for their acknowledgement."""

    def append(self, type_: str, data: dict[str, Any], at: float | None = None) -> int: ...

    def pending(self, acked: int, limit: int) -> list[dict[str, Any]]: ...

    def acknowledge(self, acked: int) -> None: ...

    def renumber_from(self, first: int) -> None: ...

    def count(self, acked: int) -> int: ...

    def highest(self) -> int: ...


@dataclass
class MemoryJournal:
    events: list[dict[str, Any]] = field(default_factory=list)
    next_seq: int = 1

    def append(self, type_: str, data: dict[str, Any], at: float | None = None) -> int:
        seq = self.next_seq
        self.next_seq += 1
        self.events.append({"seq": seq, "at": at or time.time(), "type": type_, "data": data})
        return seq

    def pending(self, acked: int, limit: int) -> list[dict[str, Any]]:
        return [e for e in self.events if e["seq"] > acked][:limit]

    def acknowledge(self, acked: int) -> None:
        self.events = [e for e in self.events if e["seq"] > acked]

    def renumber_from(self, first: int) -> None:
        for i, e in enumerate(self.events):
            e["seq"] = first + i
        self.next_seq = first + len(self.events)

    def count(self, acked: int) -> int:
        return sum(1 for e in self.events if e["seq"] > acked)

    def highest(self) -> int:
        return self.next_seq - 1


class DiskJournal:
    """Events as JSON lines in ``events.jsonl``, appended with fsync under a lock (``dsm agent
    event`` may append while the agent runs); acknowledged lines are dropped on compaction."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "events.jsonl"
        self.path.touch(exist_ok=True)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.path.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _read(self) -> list[dict[str, Any]]:
        out = []
        for line in self.path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue  # a line torn by a crash mid-append was never acknowledged as recorded
        return out

    def append(self, type_: str, data: dict[str, Any], at: float | None = None) -> int:
        with self._locked():
            events = self._read()
            seq = (events[-1]["seq"] + 1) if events else self._floor() + 1
            line = json.dumps({"seq": seq, "at": at or time.time(), "type": type_, "data": data})
            with open(self.path, "a") as f:
                f.write(line + "\n")
                f.flush()
                os.fsync(f.fileno())
            return int(seq)

    def _floor(self) -> int:
        floor = self.path.with_name("events.floor")
        return int(floor.read_text()) if floor.exists() else 0

    def pending(self, acked: int, limit: int) -> list[dict[str, Any]]:
        with self._locked():
            return [e for e in self._read() if e["seq"] > acked][:limit]

    def count(self, acked: int) -> int:
        with self._locked():
            return sum(1 for e in self._read() if e["seq"] > acked)

    def highest(self) -> int:
        with self._locked():
            events = self._read()
            return int(events[-1]["seq"]) if events else self._floor()

    def acknowledge(self, acked: int) -> None:
        with self._locked():
            events = self._read()
            keep = [e for e in events if e["seq"] > acked]
            if len(keep) == len(events):
                return
            floor = max([acked] + [e["seq"] for e in events])
            _write_atomically(self.path.with_name("events.floor"), str(floor))
            _write_atomically(self.path, "".join(json.dumps(e) + "\n" for e in keep))

    def renumber_from(self, first: int) -> None:
        with self._locked():
            events = self._read()
            for i, e in enumerate(events):
                e["seq"] = first + i
            _write_atomically(self.path.with_name("events.floor"), str(first - 1))
            _write_atomically(self.path, "".join(json.dumps(e) + "\n" for e in events))


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# -- state and behaviour -----------------------------------------------------------------------


@dataclass
class State:
    """What an agent remembers between heartbeats (and, for ``dsm agent run``, restarts)."""

    managers: list[tuple[str, int]]
    managers_version: str = ""
    mode: str = "nodeList"
    interval: float = 600.0
    config: dict[str, Any] = field(default_factory=dict)
    config_fingerprint: str = ""
    acked: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> State:
        doc = json.loads(text)
        doc["managers"] = [(str(a), int(p)) for a, p in doc["managers"]]
        return cls(**doc)


@dataclass(frozen=True)
class Result:
    ok: bool
    manager: str | None = None
    tried: int = 0
    acked: int = 0
    sent: int = 0
    error: str | None = None
    fatal: bool = False
    seconds: float = 0.0


class Agent:
    """The behaviour of one agent; ``heartbeat`` is one heartbeat with failover."""

    def __init__(
        self,
        identity: Identity,
        state: State,
        journal: Journal,
        context: ssl.SSLContext,
        rng: random.Random | None = None,
        clock_offset: float = 0.0,
        resume_sessions: bool = True,
    ) -> None:
        self.identity, self.state, self.journal = identity, state, journal
        self.context = context
        self.rng = rng or random.Random()
        self.clock_offset = clock_offset
        self.status = "ok"
        self.counters: dict[str, int] = {"heartbeats": 0}
        # TLS sessions by manager address, offered again next time (see exchange)
        self.sessions: dict[tuple[str, int], ssl.SSLSession] = {}
        self.resume_sessions = resume_sessions  # False: every handshake a full one (benchmarks)
        self.resumed = 0

    def next_delay(self) -> float:
        return heartbeat_delay(self.state.interval, self.rng)

    def body(self) -> tuple[bytes, int]:
        limit = int(self.state.config.get("maxEventsPerHeartbeat", protocol.MAX_EVENTS))
        events = self.journal.pending(self.state.acked, max(1, min(limit, protocol.MAX_EVENTS)))
        doc = {
            "protocol": protocol.PROTOCOL_VERSION,
            "agentId": self.identity.agent_id,
            "status": self.status,
            "clock": time.time() + self.clock_offset,
            "version": __version__,
            "configFingerprint": self.state.config_fingerprint,
            "managersVersion": self.state.managers_version,
            "counters": self.counters,
            "events": events,
        }
        return protocol.dumps(doc), len(events)

    async def heartbeat(self) -> Result:
        started = time.monotonic()
        order = list(self.state.managers)
        self.rng.shuffle(order)  # a random pick, then the others in random order
        if self.state.mode == "loadBalancer":
            # each new connection may land on another node: a balancer gets a few tries
            order = order * LOAD_BALANCER_TRIES
        failures: list[str] = []
        for tried, (address, port) in enumerate(order, 1):
            body, sent = self.body()
            try:
                reply = await exchange(
                    address,
                    port,
                    self.context,
                    "POST",
                    protocol.PATH_HEARTBEAT,
                    body,
                    self.sessions.get((address, port)),
                )
            except Unreachable as e:
                self.sessions.pop((address, port), None)
                failures.append(str(e))
                continue
            if reply.session is not None and self.resume_sessions:
                self.sessions[(address, port)] = reply.session
            self.resumed += reply.resumed
            if reply.status == 503:
                failures.append(f"{address}:{port}: 503 {_error_of(reply)}")
                continue
            where = f"{address}:{port}"
            elapsed = time.monotonic() - started
            if reply.status == 200:
                self._take(reply.json())
                self.counters["heartbeats"] += 1
                return Result(True, where, tried, self.state.acked, sent, seconds=elapsed)
            return self._refused(reply, where, tried, elapsed)
        return Result(
            False,
            None,
            len(order),
            self.state.acked,
            error="no manager could be reached: " + "; ".join(failures[-3:]),
            seconds=time.monotonic() - started,
        )

    def _refused(self, reply: Reply, where: str, tried: int, elapsed: float) -> Result:
        try:
            doc = reply.json()
        except ValueError:
            doc = {}
        code = doc.get("code") if isinstance(doc, dict) else None
        if code == "sequence_gap" and isinstance(doc.get("expectedSequence"), int):
            # the node holds fewer events than this agent thought acknowledged: resend from there
            self.state.acked = int(doc["expectedSequence"]) - 1
        fatal = code in ("deactivated", "unknown_agent")
        return Result(
            False,
            where,
            tried,
            self.state.acked,
            error=_error_of(reply),
            fatal=fatal,
            seconds=elapsed,
        )

    def _take(self, answer: dict[str, Any]) -> None:
        acked = int(answer["ackedSequence"])
        if acked > self.journal.highest():
            # The node acknowledges more than this agent ever recorded (it lost its state and
            # started again at 1): its events were taken for retries. Keep them, numbered above
            # the acknowledgement, for the next heartbeat.
            self.journal.renumber_from(acked + 1)
        else:
            self.journal.acknowledge(acked)
        self.state.acked = acked
        self.state.interval = float(answer.get("nextIntervalSeconds", self.state.interval))
        if answer.get("config") is not None:
            self.state.config = answer["config"]
            self.state.config_fingerprint = str(answer.get("configFingerprint", ""))
        managers = answer.get("managers") or {}
        if managers.get("addresses"):
            self.state.managers = [
                (str(m["address"]), int(m["port"])) for m in managers["addresses"]
            ]
            self.state.managers_version = str(managers.get("version", ""))
            self.state.mode = str(managers.get("mode", "nodeList"))


def fingerprint_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def identity_files(directory: Path, identity: Identity) -> tuple[Path, Path]:
    """Writes the certificate and key (0600) for the TLS context; returns their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / "agent.crt", directory / "agent.key"
    key.touch(mode=0o600)
    os.chmod(key, 0o600)
    key.write_text(identity.key)
    cert.write_text(identity.certificate)
    return cert, key


def load_key_check(identity: Identity) -> None:
    serialization.load_pem_private_key(identity.key.encode(), password=None)
