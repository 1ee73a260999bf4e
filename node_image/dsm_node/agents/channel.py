"""The heartbeat channel: the agent protocol on the heartbeat port (4120), over mutual TLS, on a
thread of its own with its own event loop and database connections.

Why a thread of its own: thousands of TLS handshakes a second must not delay the node's own
heartbeat (membership) or its job pool, nor the API; like ``api.serving``, this loop competes with
them only for the interpreter lock, which OpenSSL releases during its public-key work.

The port serves the agent protocol and nothing else (``docs/agent-protocol.md``): three paths,
one request per connection, a strict subset of HTTP/1.1 parsed here (request head within 8 KiB and
``head_timeout``, ``Content-Length`` bodies within ``body_timeout``). The TLS handshake accepts no
certificate at all (activation) or one that chains to the agent CA and is within its validity;
whether it is revoked is checked in the transaction that records the heartbeat.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import Counter, Gauge, Histogram

from dsm_node import logs, metrics
from dsm_node.agents import managers, pki, protocol
from dsm_node.agents.committing import GroupCommitter
from dsm_node.agents.protocol import ProtocolError
from dsm_node.agents.store import Accepted, AgentStore, BatchResult, Pending
from dsm_node.cluster.lease import Phase
from dsm_node.db.engine import SessionLimits, create_engine, database_unavailable
from dsm_node.services import Shared
from dsm_node.threads import LoopThread

if TYPE_CHECKING:
    from dsm_node.config import NodeConfig

log = logging.getLogger("dsm.agents")
REFUSALS = logs.LogBudget(log)
MAX_HEAD = 8192
REFRESH_SECONDS = 1.0
# An answer sent before the body has arrived (413, 431, 400 on the head, 408) is followed by a
# lingering close, as RFC 9112 section 9.6 asks: closing a socket with unread bytes makes the kernel
# send a reset, which destroys the answer in the client's receive queue. The bytes still arriving
# are read and dropped until the announced body is complete, the client closes, or either bound.
LINGER_SECONDS = 2.0
LINGER_BYTES = 4 * 1024 * 1024

HEARTBEATS = Counter(
    "dsm_agent_heartbeats",
    "Agent heartbeats answered by this node, by outcome",
    ["outcome"],
    registry=metrics.REGISTRY,
)
for _outcome in ("accepted", "refused"):  # at 0 from the start, so rate() sees the first one
    HEARTBEATS.labels(_outcome)
EVENTS_STORED = Counter(
    "dsm_agent_events_stored", "Agent events stored by this node", registry=metrics.REGISTRY
)
BATCH_SIZE = Histogram(
    "dsm_agent_batch_heartbeats",
    "Heartbeats per group-commit transaction",
    registry=metrics.REGISTRY,
    buckets=(1, 2, 5, 10, 25, 50, 100, 250, 500, 1000),
)
MANAGERS_LISTED = Gauge(
    "dsm_agent_manager_list_addresses",
    "Addresses in the manager list this node gives agents (refreshed every second)",
    registry=metrics.REGISTRY,
)
HEARTBEAT_SECONDS = Histogram(
    "dsm_agent_heartbeat_duration_seconds",
    "Time from a heartbeat's complete request to its answer (includes the group commit)",
    registry=metrics.REGISTRY,
    buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5),
)

_REASONS = {
    200: "OK",
    201: "Created",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    409: "Conflict",
    411: "Length Required",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
}
_ROUTES: dict[str, tuple[str, int]] = {
    protocol.PATH_CA: ("GET", 0),
    protocol.PATH_ACTIVATE: ("POST", protocol.MAX_ACTIVATION_BODY),
    protocol.PATH_HEARTBEAT: ("POST", protocol.MAX_HEARTBEAT_BODY),
}


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()

    def encode(self) -> bytes:
        head = [f"HTTP/1.1 {self.status} {_REASONS.get(self.status, 'Error')}"]
        head.append(f"Content-Type: {self.content_type}")
        head.append(f"Content-Length: {len(self.body)}")
        head.append("Connection: close")
        head += [f"{k}: {v}" for k, v in self.headers]
        return ("\r\n".join(head) + "\r\n\r\n").encode() + self.body


def refusal(e: ProtocolError) -> Answer:
    doc: dict[str, Any] = {"error": str(e), "code": e.code, **e.extra}
    headers = (("Retry-After", "2"),) if e.status == 503 else ()
    return Answer(e.status, protocol.dumps(doc), headers=headers)


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    body: bytes
    peercert: dict[str, Any] | None
    peer: str


Handler = Callable[[Request], Awaitable[Answer]]


class ChannelProtocol(asyncio.Protocol):
    """One connection: a request head, maybe a body, one answer, then close."""

    def __init__(
        self,
        handle: Handler,
        head_timeout: float,
        body_timeout: float,
        linger: float = LINGER_SECONDS,
        linger_bytes: int = LINGER_BYTES,
    ) -> None:
        self._handle = handle
        self._head_timeout, self._body_timeout = head_timeout, body_timeout
        self._linger, self._linger_bytes = linger, linger_bytes
        self._buf = bytearray()
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._want: int | None = None  # body length, once the head is parsed
        self._head_done = False
        self._announced: int | None = None  # Content-Length, even when refused as too large
        self._method = self._path = ""
        self._done = False
        self._linger_left = 0  # bytes still dropped before closing; > 0 only while lingering

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._arm(self._head_timeout, "no request head")

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._transport = None

    def _arm(self, seconds: float, what: str) -> None:
        self._disarm()
        self._timer = asyncio.get_running_loop().call_later(seconds, self._too_slow, what)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _too_slow(self, what: str) -> None:
        self._timer = None
        if self._transport is None or self._done:
            return
        if self._want is not None:
            self._answer(refusal(ProtocolError(408, "timeout", f"{what} within the time limit")))
        else:
            self._transport.abort()

    def data_received(self, data: bytes) -> None:
        if self._linger_left > 0:
            self._linger_left -= len(data)
            if self._linger_left <= 0 and self._transport is not None:
                self._disarm()
                self._transport.close()
            return
        if self._done:
            return
        self._buf += data
        if self._want is None:
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buf) > MAX_HEAD:
                    self._refuse(431, "too_large", f"the request head exceeds {MAX_HEAD} bytes")
                return
            if end > MAX_HEAD:
                self._refuse(431, "too_large", f"the request head exceeds {MAX_HEAD} bytes")
                return
            head = bytes(self._buf[:end])
            del self._buf[: end + 4]
            self._head_done = True
            try:
                self._want = self._parse_head(head)
            except ProtocolError as e:
                self._answer(refusal(e))
                return
            self._arm(self._body_timeout, "no complete body")
        if len(self._buf) > self._want:
            self._refuse(400, "malformed_http", "more bytes than Content-Length announced")
            return
        if len(self._buf) == self._want:
            self._disarm()
            self._done = True
            assert self._transport is not None
            request = Request(
                self._method,
                self._path,
                bytes(self._buf),
                self._transport.get_extra_info("peercert"),
                str((self._transport.get_extra_info("peername") or ("?",))[0]),
            )
            asyncio.get_running_loop().create_task(self._run(request))

    def _parse_head(self, head: bytes) -> int:
        try:
            text = head.decode("ascii")
        except UnicodeDecodeError:
            raise ProtocolError(400, "malformed_http", "the request head is not ASCII") from None
        lines = text.split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or parts[2] not in ("HTTP/1.1", "HTTP/1.0"):
            raise ProtocolError(400, "malformed_http", "expected 'METHOD PATH HTTP/1.1'")
        method, path = parts[0], parts[1]
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep or not name or name != name.strip() or "\x00" in line:
                raise ProtocolError(400, "malformed_http", "a malformed header line")
            key = name.lower()
            if key in headers and key in ("content-length", "transfer-encoding", "content-type"):
                raise ProtocolError(400, "malformed_http", f"header {name} given twice")
            headers[key] = value.strip()
        self._method, self._path = method, path.split("?", 1)[0]
        route = _ROUTES.get(self._path)
        if route is None:
            raise ProtocolError(404, "not_found", f"no agent protocol path {self._path[:100]!r}")
        if method != route[0]:
            raise ProtocolError(405, "method_not_allowed", f"{self._path} takes {route[0]}")
        if "transfer-encoding" in headers:
            raise ProtocolError(411, "length_required", "send Content-Length, not chunked bodies")
        raw_length = headers.get("content-length")
        if raw_length is None:
            if route[1]:
                raise ProtocolError(411, "length_required", "a POST needs Content-Length")
            return 0
        if not raw_length.isdigit() or not raw_length.isascii() or len(raw_length) > 12:
            raise ProtocolError(400, "malformed_http", "Content-Length is not a number")
        length = self._announced = int(raw_length)
        if length > route[1]:
            raise ProtocolError(
                413, "too_large", f"the body exceeds {route[1]} bytes for {self._path}"
            )
        if route[1]:
            ctype = headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype != "application/json":
                raise ProtocolError(415, "not_json", "send Content-Type: application/json")
        return length

    def _refuse(self, status: int, code: str, message: str) -> None:
        self._answer(refusal(ProtocolError(status, code, message)))

    async def _run(self, request: Request) -> None:
        try:
            answer = await self._handle(request)
        except ProtocolError as e:
            answer = refusal(e)
        except Exception as e:
            if database_unavailable(e):
                answer = refusal(ProtocolError(503, "database_unavailable", "database unavailable"))
            else:
                log.exception("agent request %s %s failed", request.method, request.path)
                answer = Answer(
                    500, protocol.dumps({"error": "internal error", "code": "internal"})
                )
        if answer.status >= 400:
            REFUSALS.log(
                logging.INFO,
                "%s %s from %s: %d %s",
                request.method,
                request.path,
                request.peer,
                answer.status,
                answer.body[:300].decode(errors="replace"),
            )
        self._answer(answer)

    def _answer(self, answer: Answer) -> None:
        self._done = True
        self._disarm()
        if self._transport is None or self._transport.is_closing():
            return
        self._transport.write(answer.encode())
        unread = self._unread()
        if unread <= 0:
            self._transport.close()
            return
        self._linger_left = unread
        self._buf.clear()
        self._timer = asyncio.get_running_loop().call_later(self._linger, self._transport.close)

    def _unread(self) -> int:
        """Bytes the client may still send: the rest of its head (as many as the linger allows)
        or of the body it announced (``_buf`` holds the body's bytes once the head is parsed)."""
        if not self._head_done:
            return self._linger_bytes
        return min((self._announced or 0) - len(self._buf), self._linger_bytes)


class Host(Protocol):
    """The node as the channel sees it (``node.Node`` is one): its phase, the id its heartbeats
    and its agents' are recorded under (a rejoin may change it), and its services once joined."""

    @property
    def phase(self) -> Phase: ...

    @property
    def node_id(self) -> int | None: ...

    def shared(self) -> Shared | None: ...


@dataclass
class View:
    """What every answer repeats, refreshed each second: the manager list and the config."""

    managers: dict[str, Any]
    config: dict[str, Any]
    config_fingerprint: str
    interval: float


class AgentService:
    """The handlers, on the channel's loop."""

    def __init__(
        self,
        host: Host,
        shared: Shared,
        store: AgentStore,
        ca: pki.Authority,
        config: NodeConfig,
    ) -> None:
        self.host, self.shared, self.store, self.ca = host, shared, store, ca
        self.committer = GroupCommitter(
            self.record,
            max_batch=config.agent_batch_max,
            max_wait=config.agent_batch_wait_seconds,
            committers=config.agent_committers,
        )
        self.committer.on_batch = _observe_batch
        self.view = self._view([])
        self._ca_pem = ca.certificate_pem.encode()

    def _view(self, online: list[tuple[str, int]]) -> View:
        settings = self.shared.settings.current()
        config = managers.agent_config(settings)
        return View(
            managers.manager_list(settings, online).document(),
            config,
            protocol.fingerprint(config),
            settings.agent_heartbeat_interval_seconds,
        )

    async def refresh(self) -> None:
        threshold = self.shared.settings.current().offline_threshold_seconds
        self.view = self._view(await self.store.online_heartbeat_addresses(threshold))
        MANAGERS_LISTED.set(len(self.view.managers["addresses"]))

    async def handle(self, request: Request) -> Answer:
        if request.path == protocol.PATH_HEARTBEAT:
            return await self.heartbeat(request)
        if request.path == protocol.PATH_ACTIVATE:
            return await self.activate(request)
        return Answer(200, self._ca_pem, "application/x-pem-file")

    def _ready(self) -> int:
        node_id = self.host.node_id
        if self.host.phase is not Phase.ONLINE or node_id is None:
            raise ProtocolError(503, "not_ready", f"this node is not serving ({self.host.phase})")
        return node_id

    async def record(self, batch: list[Pending]) -> BatchResult:
        """One group commit, under the node's current registration."""
        try:
            node_id = self._ready()
        except ProtocolError as e:
            return BatchResult([e] * len(batch), 0)
        return await self.store.record(batch, node_id)

    async def activate(self, request: Request) -> Answer:
        act = protocol.parse_activation(request.body)
        self._ready()
        agent_id, cert = await self.store.activate(
            act.token, act.hostname, act.csr, self.ca, self.shared.node_name
        )
        log.info("agent %d (%s) activated from %s", agent_id, act.hostname, request.peer)
        v = self.view
        return Answer(
            201,
            protocol.dumps(
                {
                    "protocol": protocol.PROTOCOL_VERSION,
                    "agentId": agent_id,
                    "certificate": cert,
                    "caCertificate": self.ca.certificate_pem,
                    "heartbeatIntervalSeconds": v.interval,
                    "managers": v.managers,
                }
            ),
        )

    async def heartbeat(self, request: Request) -> Answer:
        started = time.monotonic()
        who = pki.identity_of(request.peercert)
        if who is None:
            HEARTBEATS.labels("refused").inc()
            raise ProtocolError(
                401,
                "certificate_required",
                "a heartbeat needs the agent's client certificate from activation",
            )
        not_after = (request.peercert or {}).get("notAfter")
        if isinstance(not_after, str) and ssl.cert_time_to_seconds(not_after) < time.time():
            # a resumed TLS session skips the handshake's validity check: check here
            HEARTBEATS.labels("refused").inc()
            raise ProtocolError(403, "certificate_expired", "the agent's certificate has expired")
        hb = protocol.parse_heartbeat(request.body)
        if hb.agent_id != who[0]:
            HEARTBEATS.labels("refused").inc()
            raise ProtocolError(
                403,
                "agent_mismatch",
                f"the certificate is agent {who[0]}'s, the heartbeat says {hb.agent_id}",
            )
        offset = hb.clock - time.time()
        if abs(offset) > protocol.MAX_CLOCK_OFFSET_SECONDS:
            HEARTBEATS.labels("refused").inc()
            raise ProtocolError(
                400,
                "clock_unusable",
                f"the agent's clock is {offset / 86400:+.0f} days from the manager's: fix it",
            )
        self._ready()
        outcome = await self.committer.submit(Pending(who[0], who[1], hb))
        if not isinstance(outcome, Accepted):
            HEARTBEATS.labels("refused").inc()
            raise outcome
        HEARTBEATS.labels("accepted").inc()
        HEARTBEAT_SECONDS.observe(time.monotonic() - started)
        v = self.view
        fresh = hb.config_fingerprint == v.config_fingerprint
        return Answer(
            200,
            protocol.dumps(
                {
                    "protocol": protocol.PROTOCOL_VERSION,
                    "ackedSequence": outcome.acked,
                    "nextIntervalSeconds": v.interval,
                    "configFingerprint": v.config_fingerprint,
                    "config": None if fresh else v.config,
                    "managers": v.managers,
                    "serverTime": time.time(),
                }
            ),
        )


def server_context(ca: pki.Authority, chain_pem: str, key_pem: str) -> ssl.SSLContext:
    """TLS for the heartbeat port: the node's certificate from the agent CA; client certificates
    optional at the handshake, verified against the agent CA when presented."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    d = Path(tempfile.mkdtemp(prefix="dsm-agent-tls-"))
    cert_file, key_file = d / "tls.crt", d / "tls.key"
    key_file.touch(mode=0o600)
    key_file.write_text(key_pem)
    cert_file.write_text(chain_pem)
    try:
        ctx.load_cert_chain(cert_file, key_file)
    finally:
        key_file.unlink()
        cert_file.unlink()
        d.rmdir()
    ctx.load_verify_locations(cadata=ca.certificate_pem)
    ctx.verify_mode = ssl.CERT_OPTIONAL
    # An agent keeps one session per node (the latest): OpenSSL's default of two TLS 1.3 tickets
    # per handshake makes one for nothing, 14-27% of a full handshake's server CPU
    # (`python -m bench.tls_floor --tickets 1,2`; docs/benchmarks.md).
    ctx.num_tickets = 1
    return ctx


class AgentChannel(LoopThread):
    """Serves the agent protocol on the heartbeat port, on its own thread (see the module
    docstring). ``start`` returns once listening, or raises what stopped it (a port in use)."""

    def __init__(self, host: Host, config: NodeConfig) -> None:
        super().__init__("dsm-agents", log)
        self.host, self.config = host, config

    async def _serve(self) -> None:
        cfg, host = self.config, self.host
        shared, node_id = host.shared(), host.node_id
        if shared is None or node_id is None:
            raise RuntimeError("the node has not joined the cluster")
        loop = asyncio.get_running_loop()
        engine = create_engine(
            cfg.database_url,
            pool_size=cfg.agent_committers + 2,
            max_overflow=2,
            application_name=f"dsm-node:{cfg.node_name}:agents",
            # a frozen peer holding an agent's row must not hold heartbeats for long
            limits=SessionLimits(
                {
                    "lock_timeout": "5s",
                    "statement_timeout": "30s",
                    "idle_in_transaction_session_timeout": "30s",
                }
            ),
        )
        store = AgentStore(engine)
        try:
            ca = await store.authority(shared.keys)
            chain, key = pki.node_certificate(
                ca, cfg.node_name, [cfg.address, cfg.node_name, "localhost"]
            )
            ctx = server_context(ca, chain, key)
            service = AgentService(host, shared, store, ca, cfg)
            await service.refresh()
            service.committer.start()
            server = await loop.create_server(
                lambda: ChannelProtocol(
                    service.handle,
                    cfg.http_header_timeout_seconds,
                    cfg.http_body_timeout_seconds,
                ),
                cfg.bind_address,
                cfg.heartbeat_port,
                ssl=ctx,
                ssl_handshake_timeout=cfg.tls_handshake_timeout_seconds,
                reuse_address=True,
                backlog=4096,
            )
        except BaseException:
            await engine.dispose()
            raise
        try:
            await store.set_heartbeat_port(node_id, cfg.heartbeat_port)
            log.info(
                "serving agents on %s:%d (mutual TLS, agent CA %s)",
                cfg.bind_address,
                cfg.heartbeat_port,
                ca.pin,
            )
            self._serving()
            refresher = asyncio.create_task(self._refresh_forever(service))
            await self._stop.wait()
            refresher.cancel()
            server.close()
            try:
                await store.set_heartbeat_port(node_id, None)
            except Exception as e:
                log.warning("could not withdraw the heartbeat port: %s", e)
            await service.committer.stop()
        finally:
            await engine.dispose()

    async def _refresh_forever(self, service: AgentService) -> None:
        failing = False
        while True:
            await asyncio.sleep(REFRESH_SECONDS)
            try:
                await service.refresh()
                failing = False
            except Exception as e:
                if not failing:
                    log.warning("could not refresh the manager list: %s", e)
                failing = True


def _observe_batch(size: int, stored: int, seconds: float) -> None:
    BATCH_SIZE.observe(size)
    EVENTS_STORED.inc(stored)
