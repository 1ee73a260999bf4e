"""Agents for tests: nodes with a heartbeat port, tokens, the real ``dsm agent run`` and
``dsm agents simulate`` processes, and a raw mutual-TLS client for hostile requests."""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.loopback import free_port, next_address
from tests.support.nodes import REPO, Cluster, NodeProcess, query, set_settings
from tests.support.waiting import wait_until


def start_node(
    cluster: Cluster, name: str, wait: bool = True, address: str | None = None, **env: str
) -> NodeProcess:
    """A node serving agents on a heartbeat port of its own (on its own address); a restarted
    node keeps its address and ports."""
    previous = cluster.nodes.get(name)
    address = address or (previous.address if previous else next_address())
    port = previous.port if previous else 0
    hb = previous.env_extra["DSM_HEARTBEAT_PORT"] if previous else str(free_port(address))
    n = NodeProcess(
        name,
        cluster.database_url,
        cluster.log_dir / f"{name}.{sum(p.name == name for p in cluster.started)}.log",
        env_extra={**env, "DSM_HEARTBEAT_PORT": hb},
        address=address,
        port=port,
    )
    cluster.nodes[name] = n
    cluster.started.append(n)
    n.start()
    return n.wait_ready() if wait else n


def heartbeat_port(node: NodeProcess) -> int:
    port = node.env_extra.get("DSM_HEARTBEAT_PORT")
    assert port, f"{node.name} serves no agents"
    return int(port)


def manager_of(node: NodeProcess) -> str:
    return f"{node.address}:{heartbeat_port(node)}"


def wait_serving(node: NodeProcess, timeout: float = 60) -> None:
    """Until the node's heartbeat port accepts connections (it opens after the join)."""

    def up() -> bool:
        try:
            with socket.create_connection((node.address, heartbeat_port(node)), timeout=2):
                return True
        except OSError:
            return False

    wait_until(up, timeout, f"{node.name} serving agents", node.log_tail)


def managers_listed(node: NodeProcess) -> int | None:
    """How many addresses the node's agents are given now (its ``/metrics``), None before its
    channel has refreshed the list."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with urllib.request.urlopen(node.url + "/metrics", context=ctx, timeout=30) as r:
        text = r.read().decode()
    for line in text.splitlines():
        if line.startswith("dsm_agent_manager_list_addresses "):
            return int(float(line.split()[1]))
    return None


def token(node: NodeProcess, uses: int = 1, expires_in: float = 3600) -> tuple[str, str]:
    status, body = node.request(
        "POST", "/api/agents/tokens", {"maxUses": uses, "expiresInSeconds": expires_in}
    )
    assert status == 201, body
    return body["token"], body["caPin"]


def agent_settings(url: str, interval: float, missed: int = 2, **more: Any) -> None:
    set_settings(
        url,
        agent_heartbeat_interval_seconds=interval,
        agent_missed_heartbeats_offline=missed,
        **more,
    )


def env() -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }


def dsm(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dsm_node", *args],
        env=env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@dataclass
class Simulator:
    """``dsm agents simulate`` as a child process; its status file is read by the tests."""

    managers: list[str]
    count: int
    interval: float
    events: int
    state_dir: Path
    token: str | None = None
    ca_pin: str | None = None
    extra: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def status_file(self) -> Path:
        return self.state_dir / "status.json"

    @property
    def log_path(self) -> Path:
        return self.state_dir / "simulate.log"

    def start(self) -> Simulator:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        args = [sys.executable, "-m", "dsm_node", "agents", "simulate"]
        for m in self.managers:
            args += ["--manager", m]
        args += [
            "--count",
            str(self.count),
            "--interval",
            str(self.interval),
            "--events",
            str(self.events),
            "--state-dir",
            str(self.state_dir),
            "--status-file",
            str(self.status_file),
            *self.extra,
        ]
        if self.token:
            args += ["--token", self.token, "--ca-pin", str(self.ca_pin)]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(args, env=env(), stdout=log, stderr=subprocess.STDOUT)
        return self

    def status(self) -> dict[str, Any]:
        if self.proc is not None and self.proc.poll() not in (None, 0):
            raise AssertionError(f"the simulator exited ({self.proc.returncode}):\n{self.log()}")
        try:
            return dict(json.loads(self.status_file.read_text()))
        except (OSError, ValueError):
            return {}

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""

    def stop(self) -> dict[str, Any]:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(120)
        return self.status()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def events_in_db(url: str) -> dict[int, list[int]]:
    """Sequence numbers stored per agent."""
    out: dict[int, list[int]] = {}
    for agent_id, seq in query(url, "SELECT agent_id, seq FROM agent_events ORDER BY 1, 2"):
        out.setdefault(int(agent_id), []).append(int(seq))
    return out


@dataclass
class AgentCerts:
    """Files of a test agent's identity for raw requests (see raw_request)."""

    directory: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="dsm-agent-")))

    def write(self, name: str, text: str) -> Path:
        p = self.directory / name
        p.write_text(text)
        return p


def raw_request(
    address: str,
    port: int,
    data: bytes,
    ca_pem: str | None = None,
    cert: tuple[Path, Path] | None = None,
    timeout: float = 30,
) -> tuple[int, dict[str, Any] | str]:
    """Sends exactly ``data`` on a new TLS connection (client certificate optional) and returns
    (status, JSON body or text). Raises ssl.SSLError when the handshake is refused."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    if ca_pem is None:
        ctx.verify_mode = ssl.CERT_NONE
    else:
        ctx.load_verify_locations(cadata=ca_pem)
    if cert is not None:
        ctx.load_cert_chain(*cert)
    with (
        socket.create_connection((address, port), timeout=timeout) as s,
        ctx.wrap_socket(s) as t,
    ):
        t.sendall(data)
        chunks = []
        while True:
            c = t.recv(65536)
            if not c:
                break
            chunks.append(c)
    raw = b"".join(chunks)
    head, _, body = raw.partition(b"\r\n\r\n")
    if not head:
        raise ConnectionError("no answer")
    status = int(head.split(b" ")[1])
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body.decode(errors="replace")


def post(path: str, body: bytes, content_type: str = "application/json") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body


__all__ = ["query"]
