"""A real HAProxy (Debian's package, installed by hack/install-haproxy.sh) in TCP mode on loopback:
passthrough, no TLS termination, as the original product's load-balancer guidance requires."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.loopback import free_port


def binary() -> str:
    found = shutil.which("haproxy") or (
        "/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None
    )
    if found is None:
        import os

        if os.environ.get("CI") == "true":
            pytest.fail("HAProxy is required: run hack/install-haproxy.sh (make deps does)")
        pytest.skip("HAProxy not installed: run hack/install-haproxy.sh (make deps does)")
    return found


@dataclass
class Balancer:
    address: str
    backends: dict[str, tuple[str, int]]
    directory: Path
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    def config(self) -> str:
        servers = "\n".join(
            f"    server {name} {a}:{p} check inter 500 fall 2 rise 1"
            for name, (a, p) in self.backends.items()
        )
        return f"""global
    # each connection holds two descriptors; the tests' limit is 20,000
    maxconn 4000
defaults
    mode tcp
    timeout connect 3s
    timeout client 60s
    timeout server 60s
    retries 3
    option redispatch
frontend agents
    bind {self.address}:{self.port}
    default_backend nodes
backend nodes
    balance roundrobin
{servers}
"""

    def start(self) -> Balancer:
        self.port = self.port or free_port(self.address)
        cfg = self.directory / "haproxy.cfg"
        cfg.write_text(self.config())
        with open(self.directory / "haproxy.log", "ab") as log:  # the child keeps its own
            self.proc = subprocess.Popen(
                [binary(), "-db", "-f", str(cfg)], stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise AssertionError((self.directory / "haproxy.log").read_text())
            try:
                socket.create_connection((self.address, self.port), timeout=1).close()
                return self
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
