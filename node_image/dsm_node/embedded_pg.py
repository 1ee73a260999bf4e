"""A private PostgreSQL server started from the machine's server binaries.

``dsm up`` uses it when no database URL is given, and the test suite uses it so that every test
runs against a real server. It runs as the current user on a loopback address with durable commits
(fsync stays on: the job pool's figures mean nothing without it). Nothing is installed as a system
service; stopping the object stops the server.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

SERVER_SETTINGS = {
    # Enough connections for several nodes, each with a pool, plus tests and benchmarks.
    "max_connections": "300",
    "shared_buffers": "256MB",
    # The job pool writes fast; small max_wal_size caused a checkpoint storm in measurements.
    "max_wal_size": "2GB",
    "listen_addresses": "'127.0.0.1'",
    "unix_socket_directories": "''",
    "log_min_messages": "warning",
}


class PostgresNotFound(RuntimeError):
    """PostgreSQL server binaries (initdb, pg_ctl) were not found; run hack/install-postgres.sh."""


def find_bindir() -> Path:
    """Returns the directory holding initdb and pg_ctl, newest PostgreSQL first."""
    candidates: list[str] = []
    if env := os.environ.get("DSM_PG_BINDIR"):
        candidates.append(env)
    candidates += sorted(
        glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]), reverse=True
    )
    candidates.append("/usr/local/pgsql/bin")
    if which := shutil.which("pg_ctl"):
        candidates.append(str(Path(which).resolve().parent))
    for c in candidates:
        if (Path(c) / "initdb").exists() and (Path(c) / "pg_ctl").exists():
            return Path(c)
    raise PostgresNotFound(PostgresNotFound.__doc__)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _demote() -> None:
    """PostgreSQL refuses to run as root; as root we run it as the 'postgres' or 'nobody' user."""
    if os.getuid() == 0:
        user = _service_user()
        os.setgid(user.pw_gid)
        os.setuid(user.pw_uid)


def _service_user() -> pwd.struct_passwd:
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise RuntimeError("running as root and neither a 'postgres' nor a 'nobody' user exists")


@dataclass
class EmbeddedPostgres:
    """One PostgreSQL server in ``datadir`` listening on 127.0.0.1:``port``."""

    datadir: Path
    port: int = field(default_factory=free_port)
    user: str = "dsm"
    password: str = "dsm"
    extra_settings: dict[str, str] = field(default_factory=dict)

    @property
    def admin_url(self) -> str:
        return self.url("postgres")

    def url(self, database: str) -> str:
        return f"postgresql://{self.user}:{self.password}@127.0.0.1:{self.port}/{database}"

    @property
    def logfile(self) -> Path:
        return self.datadir.parent / f"{self.datadir.name}.log"

    def start(self) -> EmbeddedPostgres:
        bindir = find_bindir()
        self.datadir.parent.mkdir(parents=True, exist_ok=True)
        if os.getuid() == 0:
            u = _service_user()
            os.chown(self.datadir.parent, u.pw_uid, u.pw_gid)
        if not (self.datadir / "PG_VERSION").exists():
            pwfile = self.datadir.parent / f".{self.datadir.name}.pw"
            pwfile.write_text(self.password)
            if os.getuid() == 0:
                os.chown(pwfile, u.pw_uid, u.pw_gid)
            self._run(
                [
                    str(bindir / "initdb"),
                    "-D",
                    str(self.datadir),
                    "-U",
                    self.user,
                    "--pwfile",
                    str(pwfile),
                    "-A",
                    "scram-sha-256",
                    "-E",
                    "UTF8",
                    "--locale",
                    "C.UTF-8" if _has_c_utf8() else "C",
                ],
            )
            pwfile.unlink()
            settings = {**SERVER_SETTINGS, **self.extra_settings, "port": str(self.port)}
            with open(self.datadir / "postgresql.conf", "a") as conf:
                for k, v in settings.items():
                    conf.write(f"{k} = {v}\n")
        else:
            with open(self.datadir / "postgresql.conf", "a") as conf:
                conf.write(f"port = {self.port}\n")
        self._run(
            [
                str(bindir / "pg_ctl"),
                "-D",
                str(self.datadir),
                "-l",
                str(self.logfile),
                "-w",
                "-t",
                "60",
                "start",
            ],
        )
        return self

    def stop(self, mode: str = "fast") -> None:
        if not (self.datadir / "postmaster.pid").exists():
            return
        bindir = find_bindir()
        self._run([str(bindir / "pg_ctl"), "-D", str(self.datadir), "-m", mode, "-w", "stop"])

    def _run(self, argv: list[str]) -> None:
        proc = subprocess.run(argv, capture_output=True, text=True, preexec_fn=_demote, check=False)
        if proc.returncode != 0:
            log = self.logfile.read_text()[-2000:] if self.logfile.exists() else ""
            raise RuntimeError(
                f"{Path(argv[0]).name} failed ({proc.returncode}): {proc.stderr.strip()}\n{log}"
            )

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.1)
        raise TimeoutError(f"PostgreSQL did not accept connections on port {self.port}")


def _has_c_utf8() -> bool:
    out = subprocess.run(["locale", "-a"], capture_output=True, text=True, check=False).stdout
    return any(line.lower() in ("c.utf8", "c.utf-8") for line in out.splitlines())
