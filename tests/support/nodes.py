"""Real node processes for tests: each a ``dsm node run`` child on its own 127.x address."""

from __future__ import annotations

import itertools
import json
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest

from dsm_node.embedded_pg import free_port

REPO = Path(__file__).resolve().parents[2]
LOCAL_SECRET = "test-local-secret-shared-by-every-node"
API_KEY = "test-api-key-0123456789abcdef"
_hosts = itertools.count(2)


def next_address() -> str:
    """A fresh loopback address per node: 127.0.<pid-derived>.<n>."""
    n = next(_hosts)
    return f"127.{(os.getpid() // 250) % 250 + 1}.{n // 250}.{n % 250 + 1}"


@dataclass
class NodeProcess:
    name: str
    database_url: str
    log_path: Path
    env_extra: dict[str, str] = field(default_factory=dict)
    address: str = field(default_factory=next_address)
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> NodeProcess:
        self.port = self.port or free_port(self.address)
        env = {
            **os.environ,
            "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "DSM_DATABASE_URL": self.database_url,
            "DSM_NODE_NAME": self.name,
            "DSM_BIND_ADDRESS": self.address,
            "DSM_API_PORT": str(self.port),
            "DSM_HEARTBEAT_PORT": "0",
            "DSM_JOB_MODULES": "tests.support.jobtypes",
            "DSM_SHUTDOWN_GRACE_SECONDS": "5",
            "DSM_LOCAL_SECRET": LOCAL_SECRET,
            "DSM_BOOTSTRAP_API_KEY": API_KEY,
            **self.env_extra,
        }
        with open(self.log_path, "ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dsm_node", "node", "run"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self

    @property
    def url(self) -> str:
        return f"https://{self.address}:{self.port}"

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        raw: bytes | None = None,
        headers: dict[str, str | None] | None = None,
        timeout: float = 30,
    ) -> tuple[int, Any]:
        """Calls the node's API, authenticated with the bootstrap API key unless ``headers``
        override Authorization (None drops it)."""
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        merged = {"Authorization": f"Bearer {API_KEY}", **(headers or {})}
        for k, v in merged.items():
            if v is None:
                continue
            req.add_header(k, v)
        try:
            with urllib.request.urlopen(req, context=ctx, timeout=timeout) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            text = e.read()
            try:
                return e.code, json.loads(text)
            except json.JSONDecodeError:
                return e.code, text.decode(errors="replace")

    def wait_ready(self, timeout: float = 60) -> NodeProcess:
        wait_until(lambda: self._ready(), timeout, f"{self.name} ready", self.log_tail)
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(
                f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}"
            )
        try:
            return self.request("GET", "/readyz")[0] == 200
        except OSError:
            return False

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def is_stopped(self) -> bool:
        """True while the process is stopped (SIGSTOP, or a fault point stopped it)."""
        assert self.proc is not None
        try:
            stat = Path(f"/proc/{self.proc.pid}/stat").read_text()
        except FileNotFoundError:
            return False
        return stat.rsplit(")", 1)[1].split()[0] in ("T", "t")

    def stop(self, timeout: float = 30) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
        return self.proc.wait(timeout)

    def kill(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])


def wait_until(
    cond: Callable[[], Any],
    timeout: float,
    what: str,
    detail: Callable[[], str] | None = None,
    interval: float = 0.1,
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            extra = ("\n" + detail()) if detail else ""
            raise AssertionError(f"timed out after {timeout} s waiting for {what}{extra}")
        time.sleep(interval)


def query(url: str, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(sql, params)
        return cur.fetchall() if cur.description is not None else []


def set_settings(url: str, **values: float) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        for k, v in values.items():
            conn.execute(
                "INSERT INTO settings (key, value) VALUES (%s, %s::jsonb) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (k, json.dumps(v)),
            )


class Cluster:
    """Starts nodes one at a time and always cleans them up; logs are attached on failure."""

    def __init__(self, database_url: str, log_dir: Path) -> None:
        self.database_url = database_url
        self.log_dir = log_dir
        self.nodes: dict[str, NodeProcess] = {}  # the latest process of each name
        self.started: list[NodeProcess] = []  # every process, for cleanup

    def start(self, name: str, wait: bool = True, **env: str) -> NodeProcess:
        n = NodeProcess(
            name,
            env.pop("database_url", self.database_url),
            # one log per process: a restarted node's log starts empty
            self.log_dir / f"{name}.{sum(p.name == name for p in self.started)}.log",
            env_extra=env,
        )
        self.nodes[name] = n
        self.started.append(n)
        n.start()
        return n.wait_ready() if wait else n

    def close(self) -> None:
        for n in self.started:
            if n.proc is not None and n.proc.poll() is None:
                n.kill()

    def logs(self) -> str:
        return "\n".join(f"--- {name} ---\n{n.log_tail(80)}" for name, n in self.nodes.items())


@pytest.fixture
def dsm_cluster(
    database_url: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Cluster]:
    c = Cluster(database_url, tmp_path)
    yield c
    c.close()
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        print(c.logs())
