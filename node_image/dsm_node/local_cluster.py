"""``dsm up``: a local multi-node cluster, one process per node on consecutive loopback addresses,
on an embedded PostgreSQL when no database URL is given. Nodes start one at a time (the original
product warns against launching two at once), each only after the previous one is ready; a node
that exits is restarted with backoff, as a service manager would.

Everything that can be checked is checked before anything starts, and a mistake ends in one line
naming the cause and the fix, with exit code 2: the arguments, a cluster already running on the
same state directory (a lock held for the life of ``dsm up``; the running cluster's certificate,
secrets and database are never touched), ports in use, an unreachable database, a PostgreSQL
already running on the embedded data directory.

The state directory holds secrets: it is ``0700`` (``0710`` with the database user's group as
root, so that PostgreSQL can reach its data directory), secret files are ``0600``, and only the
database's data directory belongs to the database user. A valid certificate is reused.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import datetime as dt
import errno
import fcntl
import ipaddress
import json
import os
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy.engine import make_url

from dsm_node import client, settings_store
from dsm_node.api import tls
from dsm_node.cluster.membership import Membership, NodeRecord
from dsm_node.config import database_url_problem
from dsm_node.db import admin
from dsm_node.db.engine import create_engine, libpq_url
from dsm_node.embedded_pg import EmbeddedPostgres, PostgresFailed, PostgresInUse, PostgresNotFound

RESTART_BACKOFF = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
STABLE_SECONDS = 60.0  # a node that ran this long starts its backoff afresh
CERT_MIN_REMAINING = dt.timedelta(days=30)
LOCK_FILE = "dsm-up.lock"


class UpError(Exception):
    """A reason ``dsm up`` cannot go on: one line with the cause and the fix."""


# -- checking what was asked (pure) -------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    nodes: int
    addresses: list[str]
    port: int
    database_url: str | None
    offline_threshold: float | None
    heartbeat_interval: float | None
    watch: bool
    agents: int = 0

    @property
    def heartbeat_port(self) -> int:
        return self.port + 1


def check_arguments(args: argparse.Namespace) -> Plan:
    """Validates the command line; raises UpError naming the argument and the fix."""
    if not 1 <= args.nodes <= 50:
        raise UpError(f"--nodes must be between 1 and 50, got {args.nodes}")
    if not 1 <= args.port <= 65534:
        raise UpError("--port must be between 1 and 65534 (the next port is for heartbeats)")
    try:
        first = ipaddress.IPv4Address(args.first_address)
    except ValueError:
        raise UpError(
            f"--first-address must be an IPv4 address, got {args.first_address!r}"
        ) from None
    last = int(first) + args.nodes - 1
    if last > int(ipaddress.IPv4Address("255.255.255.254")):
        raise UpError(f"--first-address {first} leaves no room for {args.nodes} node addresses")
    interval, threshold = args.heartbeat_interval, args.offline_threshold
    for flag, value, name in (
        ("--heartbeat-interval", interval, "heartbeat_interval_seconds"),
        ("--offline-threshold", threshold, "offline_threshold_seconds"),
    ):
        if value is not None and (problem := settings_store.field_problem(name, value)):
            raise UpError(f"{flag}: {problem.split(': ', 1)[1]}")
    effective = interval or settings_store.ClusterSettings().heartbeat_interval_seconds
    if threshold is not None and threshold < settings_store.MIN_THRESHOLD_INTERVALS * effective:
        raise UpError(
            f"--offline-threshold ({threshold:g}) must be at least "
            f"{settings_store.MIN_THRESHOLD_INTERVALS} heartbeat intervals ({effective:g} s)"
        )
    if args.database_url is not None:
        check_database_url(args.database_url)
    agents = getattr(args, "agents", 0) or 0
    if not 0 <= agents <= 10_000:
        raise UpError(f"--agents must be between 0 and 10000, got {agents}")
    return Plan(
        nodes=args.nodes,
        addresses=[str(ipaddress.IPv4Address(int(first) + i)) for i in range(args.nodes)],
        port=args.port,
        database_url=args.database_url or None,
        offline_threshold=threshold,
        heartbeat_interval=interval,
        watch=not args.no_watch,
        agents=agents,
    )


def check_database_url(url: str) -> None:
    """Parses a database URL the way the nodes will; raises UpError for a malformed one or an
    unsupported scheme."""
    if (problem := database_url_problem(url)) is not None:
        raise UpError(f"--database-url cannot be used: {problem}")


# -- the state directory ------------------------------------------------------------------


@contextlib.contextmanager
def state_lock(state: Path) -> Iterator[None]:
    """Holds the state directory for the life of this ``dsm up`` (released by the kernel even
    when the process is killed); refuses when another ``dsm up`` holds it."""
    secure_directory(state)
    fd = os.open(state / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise UpError(
                f"a cluster started by `dsm up` (PID {holder}) is already running on {state}: "
                "use it (dsm nodes list), stop it (Ctrl-C in its terminal, or kill "
                f"{holder}), or start another with DSM_STATE_DIR=<another directory> and "
                "another --port"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def secure_directory(path: Path) -> None:
    """Creates ``path`` if needed, owned by this user, closed to others (0700)."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = path.stat()
    if st.st_uid != os.getuid():  # older versions handed the whole state to the database user
        os.chown(path, os.getuid(), os.getgid())
    os.chmod(path, (path.stat().st_mode & 0o7010) | 0o700)  # keeps a group search bit (root)


def write_private(path: Path, text: str) -> None:
    """Writes a file only this user can read, atomically (readers never see half a file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def secret_file(path: Path) -> Path:
    """A random secret kept across runs (the cluster's data is encrypted with it), 0600."""
    secure_directory(path.parent)
    if not path.exists():
        write_private(path, secrets.token_urlsafe(24) + "\n")
    os.chmod(path, 0o600)
    return path


def certificate(directory: Path, names: list[str]) -> tuple[Path, Path, bool]:
    """The cluster's TLS pair: reused when valid (parses, matches its key, covers ``names``,
    and is not about to expire), made afresh otherwise. Returns (cert, key, reused)."""
    secure_directory(directory)
    cert, key = directory / "tls.crt", directory / "tls.key"
    if certificate_usable(cert, key, names):
        os.chmod(key, 0o600)
        return cert, key, True
    cert_pem, key_pem = tls.self_signed(names)
    write_private(key, key_pem.decode())
    write_private(cert, cert_pem.decode())
    os.chmod(cert, 0o644)
    return cert, key, False


def certificate_usable(cert: Path, key: Path, names: list[str]) -> bool:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        c = x509.load_pem_x509_certificate(cert.read_bytes())
        k = serialization.load_pem_private_key(key.read_bytes(), password=None)
    except (OSError, ValueError):
        return False
    same_key = c.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) == k.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if not same_key or c.not_valid_after_utc - dt.datetime.now(dt.UTC) < CERT_MIN_REMAINING:
        return False
    try:
        sans = c.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    covered = {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)}
    covered |= set(sans.get_values_for_type(x509.DNSName))
    return set(names) <= covered


# -- checks before anything starts --------------------------------------------------------


def check_ports(addresses: list[str], ports: list[int]) -> None:
    for address in addresses:
        for port in ports:
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind((address, port))
                except OSError as e:
                    if e.errno == errno.EADDRINUSE:
                        raise UpError(
                            f"port {port} on {address} is in use (another `dsm up`, or another "
                            f"program: ss -ltnp 'sport = :{port}'): stop it, or pass --port "
                            "with a free port"
                        ) from None
                    raise UpError(
                        f"cannot listen on {address}:{port} ({e.strerror}): pass "
                        "--first-address with an address of this machine"
                    ) from None


def check_database(url: str) -> None:
    u = make_url(url)
    where = f"{u.host}:{u.port or 5432}/{u.database}"
    try:
        with psycopg.connect(libpq_url(url), connect_timeout=5):
            pass
    except psycopg.Error as e:
        raise UpError(
            f"cannot connect to the database at {where}: {_first_line(e)}; check --database-url "
            "and that the server runs and accepts this user"
        ) from None


# -- supervising node processes -----------------------------------------------------------


@dataclass
class NodeProcess:
    """One node under supervision: restarted with backoff when it exits."""

    name: str
    address: str
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    failures: int = 0
    restart_at: float | None = None
    last_exit: int | None = None

    def start(self) -> None:
        with open(self.log_path, "ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dsm_node", "node", "run"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                # its own session: Ctrl-C reaches `dsm up` alone, which stops the nodes in order
                start_new_session=True,
            )
        self.started_at = time.monotonic()
        self.restart_at = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def check(self, now: float) -> str | None:
        """Notices an exit and schedules the restart; returns a warning to show, once."""
        if self.proc is None or self.restart_at is not None:
            return None
        code = self.proc.poll()
        if code is None:
            return None
        self.last_exit = code
        if now - self.started_at >= STABLE_SECONDS:
            self.failures = 0
        delay = RESTART_BACKOFF[min(self.failures, len(RESTART_BACKOFF) - 1)]
        self.failures += 1
        self.restart_at = now + delay
        tail = last_log_line(self.log_path)
        return (
            f"{self.name} (PID {self.proc.pid}) exited ({describe_exit(code)}), restarting in "
            f"{delay:g} s" + (f"; its log ends: {tail}" if tail else "")
        )

    def process_state(self, now: float) -> str:
        if self.restart_at is not None:
            left = max(0.0, self.restart_at - now)
            return f"exited ({describe_exit(self.last_exit)}), restarting in {left:.0f}s"
        return "running" if self.pid is not None else "stopped"


def describe_exit(code: int | None) -> str:
    if code is None:
        return "unknown"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"code {code}"


def last_log_line(path: Path) -> str:
    with contextlib.suppress(OSError):
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
        if lines:
            return lines[-1][-200:]
    return ""


def format_table(rows: list[NodeRecord], processes: dict[str, NodeProcess], now: float) -> str:
    """The live table: the database's view of each node and this machine's view of its
    process (pure)."""
    header = ("NAME", "PID", "PROCESS", "ADDRESS", "VERSION", "STATUS", "LAST HEARTBEAT")
    table = [header]
    seen = set()
    for n in rows:
        p = processes.get(n.name)
        seen.add(n.name)
        table.append(
            (
                n.name,
                str(p.pid or "-") if p else "-",
                p.process_state(now) if p else "-",
                f"{n.address}:{n.api_port}",
                n.version,
                str(n.status),
                f"{n.seconds_since_heartbeat:.0f}s ago",
            )
        )
    for name, p in processes.items():
        if name not in seen:
            table.append((name, str(p.pid or "-"), p.process_state(now), "", "", "", ""))
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in table
    )


def without_ages(table: str) -> str:
    """The table minus what changes every second (heartbeat ages, restart countdowns)."""
    out = []
    for line in table.splitlines():
        line = line.rsplit("  ", 1)[0] if line.endswith("ago") else line
        out.append(line.split(", restarting in")[0])
    return "\n".join(out)


@dataclass
class Screen:
    """What ``dsm up`` shows: the table, redrawn in place on a terminal, and the last warnings
    kept visible under it (elsewhere: the table when it changes, each warning once)."""

    live: bool
    warnings: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=6))
    last: str = ""
    last_warning: str = ""

    def warn(self, message: str, kind: str = "warning") -> None:
        if message == self.last_warning:
            return  # a condition that persists is shown once
        self.last_warning = message
        line = f"[{time.strftime('%H:%M:%S')}] {kind}: {message}"
        self.warnings.append(line)
        if not self.live:
            print(line, file=sys.stderr, flush=True)

    def show(self, table: str) -> None:
        shown = table if self.live else without_ages(table)
        if shown == self.last:
            return
        self.last = shown
        stamp = time.strftime("%H:%M:%S")
        if self.live:
            print("\033[2J\033[H", end="")
            print(f"[{stamp}] cluster status (Ctrl-C to stop)\n{table}\n")
            if self.warnings:
                print("\n".join(self.warnings))
            sys.stdout.flush()
        else:
            print(f"[{stamp}] cluster status\n{table}\n", flush=True)


# -- the command ----------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    try:
        plan = check_arguments(args)
    except UpError as e:
        return _fail(str(e))
    state = client.state_dir()
    try:
        with state_lock(state):
            return _run_locked(plan, state)
    except UpError as e:
        return _fail(str(e))


def _run_locked(plan: Plan, state: Path) -> int:
    # Checks first: nothing is written before all of them pass.
    check_ports(plan.addresses, [plan.port, plan.heartbeat_port])
    pg = EmbeddedPostgres(state / "pg") if plan.database_url is None else None
    try:
        if pg is not None:
            pg.check_can_start()
        else:
            assert plan.database_url is not None
            check_database(plan.database_url)
    except (PostgresNotFound, PostgresInUse, PostgresFailed) as e:
        raise UpError(str(e)) from None

    names = ["localhost", *plan.addresses]
    cert, key, reused = certificate(state / "tls", names)
    secrets_dir = state / "secrets"
    local_secret = secret_file(secrets_dir / "local-secret")
    api_key = secret_file(secrets_dir / "api-key")
    admin_password = secret_file(secrets_dir / "admin-password")
    secure_directory(state / "logs")
    write_private(
        client.context_file(),
        json.dumps(
            {
                "server": f"https://{plan.addresses[0]}:{plan.port}",
                "caFile": str(cert),
                "apiKey": api_key.read_text().strip(),
            }
        ),
    )
    print(f"==> certificate {cert} ({'reused' if reused else 'new'})")
    print(
        f"==> console https://{plan.addresses[0]}:{plan.port}/ (any node): sign in as 'admin' "
        f"with the password in {admin_password}; the dsm command uses "
        f"the API key in {api_key}"
    )

    interrupted = False

    def on_signal(*_: Any) -> None:
        nonlocal interrupted
        interrupted = True

    signal.signal(signal.SIGTERM, on_signal)
    nodes: list[NodeProcess] = []
    simulator: subprocess.Popen[bytes] | None = None
    try:
        url = plan.database_url
        if pg is not None:
            print(f"==> starting embedded PostgreSQL in {pg.datadir}")
            try:
                pg.start()
            except PostgresFailed as e:
                return _fail(f"PostgreSQL did not start: {e}", 1)
            admin.create_database(pg.admin_url, "dsm")
            url = pg.url("dsm")
        assert url is not None
        for i, address in enumerate(plan.addresses, 1):
            node = NodeProcess(
                f"node-{i}",
                address,
                _node_env(
                    plan,
                    url,
                    f"node-{i}",
                    address,
                    cert,
                    key,
                    local_secret,
                    api_key,
                    admin_password,
                ),
                state / "logs" / f"node-{i}.log",
            )
            node.start()
            nodes.append(node)
            print(
                f"==> starting {node.name} on https://{address}:{plan.port} "
                f"(PID {node.pid}, log: {node.log_path})",
                flush=True,
            )
            if not _wait_ready(node, plan.port, cert, lambda: interrupted):
                if interrupted:
                    return 130
                return _fail(
                    f"{node.name} did not become ready: {last_log_line(node.log_path) or 'no log'}"
                    f" (log: {node.log_path})",
                    1,
                )
        print(
            f"==> {len(nodes)} nodes online. Try: dsm nodes list | dsm jobs submit noop --count 100"
            " | dsm jobs stats.  Ctrl-C stops the cluster.",
            flush=True,
        )
        if plan.agents:
            simulator = _start_agents(plan, state)
        _supervise(plan, url, nodes, lambda: interrupted)
    except KeyboardInterrupt:
        pass
    finally:
        if simulator is not None and simulator.poll() is None:
            simulator.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                simulator.wait(30)
        _stop_all(nodes, pg)
    return 0


def _start_agents(plan: Plan, state: Path) -> subprocess.Popen[bytes]:
    """Simulated agents (issue 11): a token through the API, then ``dsm agents simulate`` on
    every node's heartbeat port, its progress in the agents log."""
    token = client.Client.from_args(None, None, False).request(
        "POST", "/api/agents/tokens", {"maxUses": plan.agents, "expiresInSeconds": 3600}
    )
    args = [sys.executable, "-m", "dsm_node", "agents", "simulate", "--count", str(plan.agents)]
    args += ["--interval", "10", "--events", "2", "--state-dir", str(state / "agents")]
    args += ["--token", token["token"], "--ca-pin", token["caPin"]]
    for address in plan.addresses:
        args += ["--manager", f"{address}:{plan.heartbeat_port}"]
    log_path = state / "logs" / "agents.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    print(
        f"==> {plan.agents} simulated agents (PID {proc.pid}, progress: {log_path}); "
        "try: dsm agents list | dsm agents show 1 | dsm agents events 1",
        flush=True,
    )
    return proc


def _node_env(
    plan: Plan,
    url: str,
    name: str,
    address: str,
    cert: Path,
    key: Path,
    local_secret: Path,
    api_key: Path,
    admin_password: Path,
) -> dict[str, str]:
    env = {
        **os.environ,
        "DSM_DATABASE_URL": url,
        "DSM_NODE_NAME": name,
        "DSM_BIND_ADDRESS": address,
        "DSM_API_PORT": str(plan.port),
        "DSM_HEARTBEAT_PORT": str(plan.heartbeat_port),
        "DSM_TLS_CERT_FILE": str(cert),
        "DSM_TLS_KEY_FILE": str(key),
        "DSM_LOCAL_SECRET_FILE": str(local_secret),
        "DSM_BOOTSTRAP_API_KEY_FILE": str(api_key),
        "DSM_ADMIN_PASSWORD_FILE": str(admin_password),
    }
    if plan.offline_threshold:
        env["DSM_OFFLINE_THRESHOLD_SECONDS"] = str(plan.offline_threshold)
    if plan.heartbeat_interval:
        env["DSM_HEARTBEAT_INTERVAL_SECONDS"] = str(plan.heartbeat_interval)
    return env


def _supervise(plan: Plan, url: str, nodes: list[NodeProcess], stopping: Any) -> None:
    screen = Screen(live=sys.stdout.isatty() and plan.watch)
    processes = {n.name: n for n in nodes}
    next_table = 0.0
    while not stopping():
        now = time.monotonic()
        for node in nodes:
            if (warning := node.check(now)) is not None:
                screen.warn(warning)
            if node.restart_at is not None and now >= node.restart_at and not stopping():
                node.start()
                screen.warn(f"{node.name} restarted (PID {node.pid})", kind="info")
        if now >= next_table:
            rows, problem = _node_rows(url)
            if problem:
                screen.warn(problem)
            screen.show(format_table(rows, processes, now))
            next_table = now + 2.0
        time.sleep(0.5)


def _stop_all(nodes: list[NodeProcess], pg: Any) -> None:
    print("\n==> stopping nodes", flush=True)
    for node in nodes:
        if node.proc is not None and node.proc.poll() is None:
            node.proc.send_signal(signal.SIGTERM)
    for node in nodes:
        if node.proc is None:
            continue
        try:
            node.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            node.proc.kill()
            node.proc.wait()
        print(f"    {node.name} stopped ({describe_exit(node.proc.returncode)})", flush=True)
    if pg is not None:
        print("==> stopping PostgreSQL", flush=True)
        with contextlib.suppress(Exception):
            pg.stop()


def _fail(message: str, code: int = 2) -> int:
    print(f"error: {message}", file=sys.stderr, flush=True)
    return code


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def _wait_ready(node: NodeProcess, port: int, cert: Path, stopping: Any) -> bool:
    ctx = ssl.create_default_context(cafile=str(cert))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not stopping():
        if node.proc is None or node.proc.poll() is not None:
            return False
        try:
            url = f"https://{node.address}:{port}/readyz"
            with urllib.request.urlopen(url, context=ctx, timeout=2):
                return True
        except Exception:
            time.sleep(0.3)
    return False


def _node_rows(url: str) -> tuple[list[NodeRecord], str | None]:
    async def go() -> list[NodeRecord]:
        engine = create_engine(url, pool_size=1)
        try:
            s = await settings_store.read(engine)
            return await Membership(engine).list_nodes(s.offline_threshold_seconds)
        finally:
            await engine.dispose()

    try:
        return asyncio.run(go()), None
    except Exception as e:
        return [], f"database unreachable: {_first_line(e)}"
