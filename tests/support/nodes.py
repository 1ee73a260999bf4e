"""Real node processes for tests: the one node launcher.

Offers :class:`NodeProcess` (one ``dsm node run`` child on a loopback address of its own, with its
own log file; its HTTPS API called with the bootstrap API key), :class:`Cluster` (nodes started
one at a time and always cleaned up; the ``dsm_cluster`` fixture of tests/conftest.py hands one
to a test), and two database shortcuts every node test needs: :func:`query` and
:func:`set_settings` (the cluster's timing, shortened before the first node joins).

Nodes load the test job types (``tests.support.jobtypes``) and trust one local secret and one
bootstrap API key (:data:`LOCAL_SECRET`, :data:`API_KEY`); a test changes any of that through
``env_extra`` (a value of None removes the variable). No pytest here: ``bench/`` starts its nodes
with the same launcher.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from tests.support import rawhttp
from tests.support.loopback import free_port, next_address
from tests.support.processes import ChildProcess
from tests.support.waiting import wait_until

REPO = Path(__file__).resolve().parents[2]
LOCAL_SECRET = "test-local-secret-shared-by-every-node"
API_KEY = "test-api-key-0123456789abcdef"


@dataclass
class NodeProcess:
    name: str
    database_url: str
    log_path: Path
    env_extra: dict[str, str | None] = field(default_factory=dict)
    address: str = field(default_factory=next_address)
    port: int = 0
    child: ChildProcess | None = None

    def environment(self) -> dict[str, str]:
        """The node's environment: this process's, the test defaults, then ``env_extra``."""
        env: dict[str, str | None] = {
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
        return {k: v for k, v in env.items() if v is not None}

    def start(self) -> NodeProcess:
        self.port = self.port or free_port(self.address)
        argv = [sys.executable, "-m", "dsm_node", "node", "run"]
        self.child = ChildProcess(argv, self.log_path, env=self.environment()).start()
        return self

    @property
    def proc(self) -> subprocess.Popen[bytes] | None:
        return None if self.child is None else self.child.proc

    @property
    def pid(self) -> int:
        assert self.child is not None, f"{self.name} was not started"
        return self.child.pid

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
        ctx = rawhttp.tls_context()
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
        """Until ``/readyz`` answers 200; fails at once, with the log, if the process exits."""
        wait_until(self._ready, timeout, f"{self.name} ready", self.log_tail)
        return self

    def _ready(self) -> bool:
        assert self.child is not None and self.child.proc is not None
        if self.child.proc.poll() is not None:
            raise AssertionError(
                f"{self.name} exited with {self.child.proc.returncode}:\n{self.log_tail()}"
            )
        try:
            return self.request("GET", "/readyz")[0] == 200
        except OSError:
            return False

    def signal(self, sig: signal.Signals) -> None:
        assert self.child is not None
        self.child.signal(sig)

    def is_stopped(self) -> bool:
        """True while the process is stopped (SIGSTOP, or a fault point stopped it)."""
        try:
            stat = Path(f"/proc/{self.pid}/stat").read_text()
        except FileNotFoundError:
            return False
        return stat.rsplit(")", 1)[1].split()[0] in ("T", "t")

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM and the exit code; ``subprocess.TimeoutExpired`` if it does not exit."""
        assert self.child is not None
        return self.child.terminate(timeout)

    def kill(self) -> None:
        assert self.child is not None
        self.child.kill()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])


def query(url: str, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
    """Run one statement (autocommit); its rows, or [] for a statement without any."""
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(sql, params)
        return cur.fetchall() if cur.description is not None else []


def set_settings(url: str, **values: float) -> None:
    """Store cluster settings (``heartbeat_interval_seconds=0.5``...); a node seeds settings only
    where none exist, so values stored before the first join are the cluster's."""
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
            env_extra=dict(env),
        )
        self.nodes[name] = n
        self.started.append(n)
        n.start()
        return n.wait_ready() if wait else n

    def close(self) -> None:
        for n in self.started:
            if n.child is not None:
                n.child.kill()

    def logs(self) -> str:
        return "\n".join(f"--- {name} ---\n{n.log_tail(80)}" for name, n in self.nodes.items())
