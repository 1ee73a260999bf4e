"""A private PostgreSQL server started from the machine's server binaries.

``dsm up`` uses it when no database URL is given, and the test suite uses it so that every test
runs against a real server. It runs as the current user on a loopback address with durable commits
(fsync stays on: the job pool's figures mean nothing without it). Nothing is installed as a system
service; stopping the object stops the server.

As root, PostgreSQL (which refuses to run as root) runs as the ``postgres`` user (or ``nobody``).
Only the data directory and its log file are handed to that user; the directory holding them
keeps its owner and gets the service user's group with search permission only (``0710``), so the
server can reach its data directory and nothing else in it. The port is given on the command line
at each start (``postgresql.conf`` is written once).
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
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


class PostgresInUse(RuntimeError):
    """Another PostgreSQL server runs on this data directory."""


class PostgresFailed(RuntimeError):
    """initdb or pg_ctl failed; the message carries PostgreSQL's own explanation."""


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

    def running_pid(self) -> int | None:
        """The PID of a live server on this data directory, from its postmaster.pid."""
        try:
            pid = int((self.datadir / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None  # a stale file: PostgreSQL removes it itself at start
        except PermissionError:
            pass
        with contextlib.suppress(OSError):
            if b"postgres" not in Path(f"/proc/{pid}/cmdline").read_bytes():
                return None  # the PID was reused by another program
        return pid

    def check_can_start(self) -> None:
        """Raises (with the cause and the fix) when this server cannot start: no binaries, a
        server already running on the data directory, or a directory the service user cannot
        reach."""
        find_bindir()
        if (pid := self.running_pid()) is not None:
            raise PostgresInUse(
                f"a PostgreSQL server (PID {pid}) is already running on {self.datadir}: another "
                "`dsm up` uses this state directory, or one was killed and left its database "
                f"running; stop it (kill {pid}) or choose another DSM_STATE_DIR"
            )
        if os.getuid() == 0:
            user = _service_user()
            self.datadir.parent.mkdir(parents=True, exist_ok=True)
            self._let_service_user_reach(user)
            probe = subprocess.run(
                ["test", "-x", str(self.datadir.parent)], preexec_fn=_demote, check=False
            )
            if probe.returncode != 0:
                raise PostgresFailed(
                    f"PostgreSQL runs as user {user.pw_name!r}, which cannot reach "
                    f"{self.datadir.parent} (a directory above it is closed to other users); "
                    "choose a state directory under /var/lib or /tmp (DSM_STATE_DIR)"
                )

    def _let_service_user_reach(self, user: pwd.struct_passwd) -> None:
        """Search permission (no read) for the service user's group on the parent directory."""
        parent = self.datadir.parent
        st = parent.stat()
        if st.st_gid != user.pw_gid:
            os.chown(parent, st.st_uid, user.pw_gid)
        os.chmod(parent, (st.st_mode & 0o700) | 0o010)

    def start(self) -> EmbeddedPostgres:
        bindir = find_bindir()
        self.datadir.parent.mkdir(parents=True, exist_ok=True)
        self.check_can_start()
        as_root = os.getuid() == 0
        user = _service_user() if as_root else None
        if not (self.datadir / "PG_VERSION").exists():
            self.datadir.mkdir(mode=0o700, exist_ok=True)
            if user is not None:
                os.chown(self.datadir, user.pw_uid, user.pw_gid)
            scratch = Path(tempfile.mkdtemp(prefix="dsm-initdb-"))
            try:
                pwfile = scratch / "pw"
                pwfile.write_text(self.password)
                if user is not None:
                    os.chown(scratch, user.pw_uid, user.pw_gid)
                    os.chown(pwfile, user.pw_uid, user.pw_gid)
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
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
            settings = {**SERVER_SETTINGS, **self.extra_settings}
            with open(self.datadir / "postgresql.conf", "a") as conf:
                for k, v in settings.items():
                    conf.write(f"{k} = {v}\n")
        _drop_port_lines(self.datadir / "postgresql.conf")
        self.logfile.touch(mode=0o600)
        if user is not None:
            os.chown(self.logfile, user.pw_uid, user.pw_gid)
        self._run(
            [
                str(bindir / "pg_ctl"),
                "-D",
                str(self.datadir),
                "-l",
                str(self.logfile),
                "-o",
                f"-p {self.port}",
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
            hint = _explanation(proc.stderr + "\n" + log)
            raise PostgresFailed(
                f"{Path(argv[0]).name} failed ({proc.returncode}): {hint}"
                f" (PostgreSQL's log: {self.logfile})"
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


def _drop_port_lines(conf: Path) -> None:
    """Removes ``port = N`` lines: the port is given at each start (older versions of this module
    appended a line at every start)."""
    text = conf.read_text()
    kept = [ln for ln in text.splitlines(keepends=True) if not _PORT_LINE.match(ln)]
    if len(kept) != len(text.splitlines(keepends=True)):
        conf.write_text("".join(kept))


_PORT_LINE = re.compile(r"^\s*port\s*=")


def _explanation(output: str) -> str:
    """PostgreSQL's own explanation in its output (FATAL/ERROR/HINT lines), on one line."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    important = [ln for ln in lines if re.search(r"\b(FATAL|ERROR|HINT|DETAIL)\b", ln)]
    chosen = important[-3:] or lines[-2:]
    return " ".join(chosen)[:600] or "no output"


def _has_c_utf8() -> bool:
    out = subprocess.run(["locale", "-a"], capture_output=True, text=True, check=False).stdout
    return any(line.lower() in ("c.utf8", "c.utf-8") for line in out.splitlines())
