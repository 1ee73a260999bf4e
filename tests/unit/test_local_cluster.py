"""``dsm up``'s pure parts: argument checks, the certificate reuse rule, restart backoff, and the
live table."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest

from dsm_node import local_cluster as lc
from dsm_node.api import tls
from dsm_node.cluster.membership import NodeRecord
from dsm_node.cluster.status import NodeStatus, StoredStatus


def args(**overrides: Any) -> argparse.Namespace:
    base: dict[str, Any] = {
        "nodes": 3,
        "port": 4119,
        "first_address": "127.0.0.1",
        "heartbeat_interval": None,
        "offline_threshold": None,
        "database_url": None,
        "no_watch": False,
    }
    return argparse.Namespace(**{**base, **overrides})


def test_a_plan_from_good_arguments() -> None:
    plan = lc.check_arguments(args(first_address="127.5.0.9", nodes=3))
    assert plan.addresses == ["127.5.0.9", "127.5.0.10", "127.5.0.11"]
    assert plan.heartbeat_port == 4120 and plan.database_url is None


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        ({"nodes": 51}, "--nodes"),
        ({"port": 65535}, "--port"),
        ({"first_address": "255.255.255.250", "nodes": 10}, "no room"),
        ({"first_address": "::1"}, "IPv4"),
        ({"heartbeat_interval": 0.2}, "--heartbeat-interval"),
        ({"offline_threshold": 1e308}, "--offline-threshold"),
        ({"heartbeat_interval": 5, "offline_threshold": 14}, "at least 3"),
        ({"database_url": "mysql://a@b/c"}, "not supported"),
        ({"database_url": "postgresql://a@b:x/c"}, "malformed"),
    ],
)
def test_bad_arguments(overrides: dict[str, Any], words: str) -> None:
    with pytest.raises(lc.UpError, match=words):
        lc.check_arguments(args(**overrides))


def test_a_valid_certificate_is_reused_and_a_bad_one_replaced(tmp_path: Path) -> None:
    names = ["localhost", "127.0.0.1", "127.0.0.2"]
    cert, key, reused = lc.certificate(tmp_path / "tls", names)
    assert not reused and stat.S_IMODE(key.stat().st_mode) == 0o600
    original = cert.read_bytes()
    assert lc.certificate(tmp_path / "tls", names)[2]  # reused
    assert lc.certificate(tmp_path / "tls", names[:2])[2]  # fewer nodes: still covered
    assert cert.read_bytes() == original
    # more nodes than it covers, a key of another pair, an expiring or unreadable one: replaced
    assert not lc.certificate_usable(cert, key, [*names, "127.0.0.3"])
    _, other_key = tls.self_signed(names)
    (tmp_path / "k2").write_bytes(other_key)
    assert not lc.certificate_usable(cert, tmp_path / "k2", names)
    short_cert, short_key = tls.self_signed(names, days=10)
    (tmp_path / "c3").write_bytes(short_cert)
    (tmp_path / "k3").write_bytes(short_key)
    assert not lc.certificate_usable(tmp_path / "c3", tmp_path / "k3", names)
    key.write_text("garbage")
    assert not lc.certificate(tmp_path / "tls", names)[2]


def test_secrets_are_private_and_kept(tmp_path: Path) -> None:
    path = lc.secret_file(tmp_path / "secrets" / "s")
    value = path.read_text()
    os.chmod(path, 0o644)  # as an older version left it
    assert lc.secret_file(path).read_text() == value
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


class FakeProc:
    def __init__(self, code: int | None, pid: int = 42) -> None:
        self.code, self.pid = code, pid

    def poll(self) -> int | None:
        return self.code


def test_restarts_back_off_and_reset_after_a_stable_run(tmp_path: Path) -> None:
    node = lc.NodeProcess("node-1", "127.0.0.1", {}, tmp_path / "log")
    delays = []
    now = 1000.0
    for _ in range(8):
        node.proc = FakeProc(-9)  # type: ignore[assignment]
        node.started_at, node.restart_at = now, None
        warning = node.check(now + 1)
        assert warning is not None and "killed by SIGKILL" in warning
        assert node.check(now + 1) is None  # said once
        assert node.restart_at is not None
        delays.append(node.restart_at - (now + 1))
        now += 100
        node.started_at = now
    assert delays[:6] == list(lc.RESTART_BACKOFF)
    assert delays[6] == delays[7] == lc.RESTART_BACKOFF[-1]
    node.proc, node.restart_at = FakeProc(1), None  # type: ignore[assignment]
    node.started_at = now
    node.check(now + lc.STABLE_SECONDS + 1)
    assert node.restart_at == now + lc.STABLE_SECONDS + 1 + lc.RESTART_BACKOFF[0]


def test_the_table_shows_pids_and_restarts() -> None:
    running = lc.NodeProcess("node-1", "127.0.0.1", {}, Path("/dev/null"))
    running.proc = subprocess.Popen(["sleep", "30"])
    dead = lc.NodeProcess("node-2", "127.0.0.2", {}, Path("/dev/null"))
    dead.proc = FakeProc(-9)  # type: ignore[assignment]
    dead.last_exit, dead.restart_at = -9, 13.0
    try:
        at = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
        rows = [
            NodeRecord(
                id=i,
                name=n,
                address=a,
                api_port=4119,
                version="0.1.0",
                stored_status=StoredStatus.ONLINE,
                status=s,
                status_reason="registered",
                last_heartbeat=at,
                seconds_since_heartbeat=1.2,
                started_at=at,
                status_changed_at=at,
                clock_skew_seconds=None,
                time_zone=None,
            )
            for i, n, a, s in (
                (1, "node-1", "127.0.0.1", NodeStatus.ONLINE),
                (2, "node-2", "127.0.0.2", NodeStatus.OFFLINE),
            )
        ]
        table = lc.format_table(rows, {"node-1": running, "node-2": dead}, now=10.0)
        lines = table.splitlines()
        assert lines[0].split()[:3] == ["NAME", "PID", "PROCESS"]
        assert f"node-1  {running.proc.pid}" in lines[1] and "running" in lines[1]
        assert "exited (killed by SIGKILL), restarting in 3s" in lines[2]
        assert "restarting in" not in lc.without_ages(table) and "ago" not in lc.without_ages(table)
    finally:
        running.proc.kill()
        running.proc.wait()


def test_warnings_stay_under_the_redrawn_table(capsys: pytest.CaptureFixture[str]) -> None:
    screen = lc.Screen(live=True)
    screen.show("NAME\nnode-1  running")
    screen.warn("node-2 (PID 7) exited (killed by SIGKILL), restarting in 1 s")
    screen.warn("node-2 (PID 7) exited (killed by SIGKILL), restarting in 1 s")  # shown once
    screen.show("NAME\nnode-1  running\nnode-2  exited")
    screen.show("NAME\nnode-1  running\nnode-2  running")
    frames = capsys.readouterr().out.split("\033[2J\033[H")[1:]
    assert len(frames) == 3
    for frame in frames[1:]:  # every redraw after the warning still shows it, once, under the table
        assert frame.count("exited (killed by SIGKILL)") == 1
        assert frame.index("warning: node-2") > frame.index("NAME")


def test_off_a_terminal_each_warning_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    screen = lc.Screen(live=False)
    screen.warn("database unreachable: connection refused")
    screen.warn("database unreachable: connection refused")
    screen.show("NAME  LAST HEARTBEAT\nnode-1  1s ago")
    screen.show("NAME  LAST HEARTBEAT\nnode-1  2s ago")  # only an age changed: not printed again
    out = capsys.readouterr()
    assert out.err.count("database unreachable") == 1
    assert out.out.count("cluster status") == 1
