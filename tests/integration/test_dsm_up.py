"""``dsm up`` as a new user meets it, run as a subprocess against real processes: one cluster per
state directory (a second ``dsm up`` refuses before touching anything), private state, mistakes
reported in one line before anything starts, and nodes restarted when they die."""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from dsm_node.embedded_pg import EmbeddedPostgres
from tests.support.dsmcli import DsmUp, dsm
from tests.support.loopback import free_port, next_address
from tests.support.nodes import query
from tests.support.postgres import Server
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

FAST = ("--heartbeat-interval", "0.5", "--offline-threshold", "5")


def first_address(nodes: int) -> str:
    """Consecutive addresses of this test's own range, the first one returned."""
    addresses = [next_address() for _ in range(nodes)]
    first = addresses[0]
    assert int(addresses[-1].rsplit(".", 1)[1]) - int(first.rsplit(".", 1)[1]) == nodes - 1
    return first


@pytest.fixture
def reachable_dir() -> Iterator[Path]:
    """A directory PostgreSQL's own user can reach when the tests run as root (pytest's tmp_path
    lies under a directory closed to other users)."""
    d = Path(tempfile.mkdtemp(prefix="dsm-up-test-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def up_db(pg_server: Server, pg_template: str) -> Iterator[str]:
    name = f"up_{os.getpid()}_{free_port()}"
    url = pg_server.create(name, template=pg_template)
    yield url
    pg_server.drop(name)


def private_files(state: Path) -> dict[str, bytes]:
    found = {}
    for path in sorted(state.rglob("*")):
        if (
            path.is_file()
            and "pg" not in path.relative_to(state).parts[:1]
            and "logs" not in path.parts
        ):
            found[str(path.relative_to(state))] = path.read_bytes()
    return found


def test_a_second_dsm_up_refuses_and_touches_nothing(tmp_path: Path, up_db: str) -> None:
    """Issue 9: a second `dsm up` (another database, another port) overwrote the running
    cluster's certificate, and the running cluster's `dsm` then failed certificate checks."""
    state = tmp_path / "state"
    port = free_port()
    first = DsmUp(
        state,
        "--nodes",
        "1",
        "--database-url",
        up_db,
        "--port",
        str(port),
        "--first-address",
        first_address(1),
        *FAST,
    )
    try:
        first.wait_for(lambda out: "nodes online" in out, 120, "the first cluster online")
        before = private_files(state)
        assert {"tls/tls.crt", "tls/tls.key", "context.json"} <= set(before)
        second = dsm(
            state,
            "up",
            "--nodes",
            "2",
            "--database-url",
            "postgresql://someone:else@127.0.0.1:1/other",
            "--port",
            str(free_port()),
            "--first-address",
            first_address(2),
        )
        assert second.returncode == 2, second
        (line,) = second.stderr.strip().splitlines()
        assert "already running" in line and "DSM_STATE_DIR" in line, line
        assert "Traceback" not in second.stdout + second.stderr
        assert private_files(state) == before
        listed = dsm(state, "nodes", "list")
        assert listed.returncode == 0 and "Online" in listed.stdout, listed
    finally:
        first.cleanup()
    assert first.proc.returncode == 0, first.output


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def conf_port_lines(state: Path) -> int:
    text = (state / "pg" / "postgresql.conf").read_text()
    return len(re.findall(r"^\s*port\s*=", text, re.MULTILINE))


def test_embedded_cluster_state_is_private_survives_restarts_and_restarts_killed_nodes(
    reachable_dir: Path,
) -> None:
    state = reachable_dir
    port = free_port()
    args = ("--nodes", "2", "--port", str(port), "--first-address", first_address(2), *FAST)
    up = DsmUp(state, *args)
    try:
        up.wait_for(lambda out: "nodes online" in out, 180, "two nodes online")
        # private state: the directory closed to others, secrets 0600, only the data directory
        # belongs to the database user
        as_root = os.getuid() == 0
        assert mode(state) & 0o077 == (0o010 if as_root else 0), oct(mode(state))
        for secret in (
            "secrets/local-secret",
            "secrets/api-key",
            "secrets/admin-password",
            "context.json",
            "tls/tls.key",
        ):
            assert mode(state / secret) == 0o600, (secret, oct(mode(state / secret)))
        for private_dir in ("secrets", "tls", "logs"):
            assert mode(state / private_dir) == 0o700, private_dir
        assert state.stat().st_uid == os.getuid()
        if as_root:
            db_user = pwd.getpwuid((state / "pg").stat().st_uid).pw_name
            assert db_user in ("postgres", "nobody")
            others = [
                p
                for p in state.rglob("*")
                if "pg" not in p.relative_to(state).parts[:1]
                and p.name != "pg.log"
                and p.stat().st_uid != 0
            ]
            assert others == [], others
        # every node's PID is shown; a SIGKILLed node is restarted and says so
        pids = up.wait_for(
            lambda out: re.findall(r"starting (node-\d) on \S+ \(PID (\d+)", out), 10, "PIDs"
        )
        victim = int(dict(pids)["node-2"])
        os.kill(victim, signal.SIGKILL)
        up.wait_for(
            lambda out: re.search(
                rf"node-2 \(PID {victim}\) exited \(killed by SIGKILL\), restarting", out
            ),
            60,
            "the exit noticed",
        )
        restarted = up.wait_for(
            lambda out: re.search(r"node-2 restarted \(PID (\d+)\)", out), 60, "restart"
        )
        new_pid = int(restarted.group(1))
        assert new_pid != victim
        up.wait_for(
            lambda out: re.search(rf"node-2\s+{new_pid}\s+running\s+\S+\s+\S+\s+Online", out),
            120,
            "the restarted node Online with its new PID in the table",
        )
        cert = (state / "tls" / "tls.crt").read_bytes()
        assert conf_port_lines(state) == 0
    finally:
        up.cleanup()
    assert up.proc.returncode == 0, up.output
    # a second start reuses the certificate and the secrets, and adds no port line
    secrets_before = private_files(state)
    again = DsmUp(state, *args)
    try:
        again.wait_for(lambda out: "nodes online" in out, 180, "online again")
        assert "(reused)" in again.output
        assert (state / "tls" / "tls.crt").read_bytes() == cert
        kept = ("secrets/", "tls/")
        assert {k: v for k, v in private_files(state).items() if k.startswith(kept)} == {
            k: v for k, v in secrets_before.items() if k.startswith(kept)
        }
        assert conf_port_lines(state) == 0
    finally:
        again.cleanup()


def test_old_port_lines_are_removed(reachable_dir: Path) -> None:
    """Earlier versions appended `port = N` to postgresql.conf at every start."""
    tmp_path = reachable_dir
    pg = EmbeddedPostgres(tmp_path / "data")
    pg.start()
    pg.stop()
    conf = tmp_path / "data" / "postgresql.conf"
    conf.write_text(conf.read_text() + "port = 1\nport = 2\nport = 3\n")
    pg.port = free_port()
    pg.start()
    try:
        assert not re.search(r"^\s*port\s*=", conf.read_text(), re.MULTILINE)
        assert "#port = 5432" in conf.read_text()  # PostgreSQL's own comment stays
        assert query(pg.admin_url, "SELECT current_setting('port')")[0][0] == str(pg.port)
    finally:
        pg.stop()


def one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The command failed with exit code 2 and said why in exactly one line."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def nothing_written(state: Path) -> None:
    for name in ("tls", "secrets", "context.json", "logs", "pg"):
        assert not (state / name).exists(), name


@pytest.mark.parametrize(
    ("database_url", "words"),
    [
        ("postgresql://user@host:notaport/db", "malformed"),
        ("postgresql//missing-colon", "malformed"),
        ("mysql://user:pw@127.0.0.1/db", "scheme 'mysql' is not supported"),
        ("", "empty"),
    ],
)
def test_a_bad_database_url_is_one_line(tmp_path: Path, database_url: str, words: str) -> None:
    state = tmp_path / "state"
    line = one_error_line(
        dsm(
            state,
            "up",
            "--database-url",
            database_url,
            "--port",
            str(free_port()),
            "--first-address",
            first_address(3),
        )
    )
    assert words in line and "postgresql://" in line, line
    nothing_written(state)


def test_an_unreachable_database_is_one_line(tmp_path: Path) -> None:
    state = tmp_path / "state"
    url = f"postgresql://dsm:dsm@127.0.0.1:{free_port()}/dsm"
    line = one_error_line(
        dsm(
            state,
            "up",
            "--database-url",
            url,
            "--port",
            str(free_port()),
            "--first-address",
            first_address(3),
        )
    )
    assert "cannot connect to the database" in line and "--database-url" in line, line
    nothing_written(state)


def test_the_api_port_in_use_is_one_line(tmp_path: Path, up_db: str) -> None:
    state = tmp_path / "state"
    address = first_address(2)
    with socket.socket() as busy:
        busy.bind((address, 0))
        busy.listen()
        port = busy.getsockname()[1]
        line = one_error_line(
            dsm(
                state,
                "up",
                "--nodes",
                "2",
                "--database-url",
                up_db,
                "--port",
                str(port),
                "--first-address",
                address,
            )
        )
    assert f"port {port} on {address} is in use" in line and "--port" in line, line
    nothing_written(state)


def test_a_second_postgresql_on_the_data_directory_is_one_line(reachable_dir: Path) -> None:
    """A PostgreSQL left running on the embedded data directory (a killed `dsm up`, or one
    started by hand)."""
    state = reachable_dir
    other = EmbeddedPostgres(state / "pg").start()
    try:
        pid = other.running_pid()
        line = one_error_line(
            dsm(state, "up", "--port", str(free_port()), "--first-address", first_address(3))
        )
        assert f"PID {pid}" in line and str(state / "pg") in line and "kill" in line, line
        assert not (state / "tls").exists() and not (state / "secrets").exists()
    finally:
        other.stop()


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("--nodes", "0"), "--nodes"),
        (("--offline-threshold", "2", "--heartbeat-interval", "1"), "at least 3 heartbeat"),
        (("--offline-threshold", "20"), "at least 3 heartbeat"),  # default interval 10 s
        (("--heartbeat-interval", "0.1"), "--heartbeat-interval"),
        (("--first-address", "localhost"), "--first-address"),
        (("--port", "70000"), "--port"),
    ],
)
def test_bad_arguments_are_one_line(tmp_path: Path, args: tuple[str, ...], words: str) -> None:
    state = tmp_path / "state"
    line = one_error_line(dsm(state, "up", *args))
    assert words in line, line
    assert not state.exists()


def test_dsm_up_agents_starts_simulated_agents_that_heartbeat_and_stop_with_it(
    tmp_path: Path, up_db: str
) -> None:
    """Issue 11: ``dsm up --agents N`` shows a newcomer agents heartbeating to the nodes (through
    the nodes' heartbeat ports, listed by ``dsm agents list``), and Ctrl-C stops them with the
    cluster."""
    state = tmp_path / "state"
    up = DsmUp(
        state,
        "--nodes",
        "2",
        "--database-url",
        up_db,
        "--port",
        str(free_port()),
        "--first-address",
        first_address(2),
        "--agents",
        "3",
        *FAST,
    )
    try:
        line = up.wait_for(
            lambda out: re.search(r"3 simulated agents \(PID (\d+)", out), 180, "the agents started"
        )
        simulator = int(line.group(1))

        def online() -> list[dict[str, object]] | None:
            r = dsm(state, "agents", "list", "--output", "json")
            assert r.returncode == 0, r
            agents = json.loads(r.stdout)["agents"]
            heard = [a for a in agents if a["status"] == "Online" and a["lastNode"]]
            return agents if len(agents) == 3 and len(heard) == 3 else None

        agents = wait_until(online, 180, "3 agents Online", lambda: up.output[-2000:])
        assert len({a["hostname"] for a in agents}) == 3
        # Ctrl-C (SIGTERM here) stops the simulator with the nodes
        assert up.stop(120) == 0, up.output
        assert not up.is_our_node(simulator), "the simulator outlived dsm up"
    finally:
        up.cleanup()
