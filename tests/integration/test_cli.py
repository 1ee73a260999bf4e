"""The ``dsm`` command as a user meets it: help that shows how to connect and what to type,
``--output`` anywhere, command groups that explain themselves, shell completion generated from
the command's own arguments, one-line errors naming the cause, and ``jobs get`` naming the node."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.dsmcli import dsm
from tests.support.nodes import API_KEY, Cluster
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration


def one_error_line(proc: subprocess.CompletedProcess[str], code: int = 2) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def test_help_shows_how_to_connect_and_examples(tmp_path: Path) -> None:
    out = dsm(tmp_path, "--help").stdout
    for words in (
        "DSM_API_KEY",
        "--api-key",
        "DSM_SERVER",
        "DSM_CA_FILE",
        "examples:",
        "dsm jobs submit noop",
        "completion",
        "--output",
    ):
        assert words in out, words
    for command in (("nodes", "list"), ("jobs", "get"), ("up",)):
        sub = dsm(tmp_path, *command, "--help").stdout
        assert "--output" in sub or command == ("up",), command
        assert "DSM_API_KEY" in sub or command == ("up",), command


@pytest.mark.parametrize(
    ("group", "commands"),
    [
        ("jobs", ("submit", "get", "stats")),
        ("nodes", ("list", "decommission")),
        ("master-key", ("rotate",)),
        ("db", ("upgrade",)),
        ("node", ("run",)),
    ],
)
def test_a_command_group_alone_prints_its_help(
    tmp_path: Path, group: str, commands: tuple[str, ...]
) -> None:
    proc = dsm(tmp_path, group)
    assert proc.returncode == 2
    assert f"usage: dsm {group}" in proc.stdout
    for c in commands:
        assert c in proc.stdout


def test_connection_mistakes_are_one_line(tmp_path: Path) -> None:
    line = one_error_line(dsm(tmp_path, "nodes", "list", "--server", "127.0.0.1:4119"))
    assert "https://" in line and "'127.0.0.1:4119'" in line and "--server" in line
    line = one_error_line(dsm(tmp_path, "nodes", "list", DSM_SERVER="http://127.0.0.1:4119"))
    assert "https://" in line and "DSM_SERVER" in line
    missing = tmp_path / "no-such-ca.pem"
    line = one_error_line(
        dsm(tmp_path, "nodes", "list", "--server", "https://127.0.0.1:1", "--ca-file", str(missing))
    )
    assert str(missing) in line and "does not exist" in line and "--ca-file" in line
    line = one_error_line(dsm(tmp_path, "nodes", "list"))
    assert "no server" in line


@pytest.mark.parametrize(
    ("env", "words"),
    [
        ({"DSM_DATABASE_URL": "postgresql://u@h:port/db"}, "malformed"),
        ({"DSM_DATABASE_URL": "sqlite:///x.db"}, "not supported"),
        (
            {"DSM_DATABASE_URL": "postgresql://u@h/db", "DSM_HEARTBEAT_INTERVAL_SECONDS": "0.1"},
            "heartbeat_interval_seconds",
        ),
        (
            {"DSM_DATABASE_URL": "postgresql://u@h/db", "DSM_OFFLINE_THRESHOLD_SECONDS": "20"},
            "at least 3 times",
        ),
    ],
)
def test_node_configuration_mistakes_are_one_line(
    tmp_path: Path, env: dict[str, str], words: str
) -> None:
    line = one_error_line(dsm(tmp_path, "node", "run", **env))
    assert "invalid node configuration" in line and words in line, line


def test_output_goes_anywhere_and_jobs_get_names_the_node(
    tmp_path: Path, dsm_cluster: Cluster
) -> None:
    node = dsm_cluster.start("cli-node")
    status, body = node.request("POST", "/api/jobs", {"type": "noop"})
    assert status == 201, body
    job_id = body["ids"][0]
    wait_until(
        lambda: node.request("GET", f"/api/jobs/{job_id}")[1]["state"] == "succeeded",
        60,
        "the job done",
    )
    conn = ("--server", node.url, "--insecure")
    before = dsm(
        tmp_path, "--output", "json", *conn, "--api-key", API_KEY, "jobs", "get", str(job_id)
    )
    after = dsm(tmp_path, "jobs", "get", str(job_id), *conn, "-o", "json", DSM_API_KEY=API_KEY)
    assert before.returncode == after.returncode == 0, (before.stderr, after.stderr)
    job = json.loads(before.stdout)
    assert json.loads(after.stdout) == job
    assert job["node"] == "cli-node" and isinstance(job["nodeId"], int)
    text = dsm(tmp_path, "jobs", "get", str(job_id), *conn, DSM_API_KEY=API_KEY)
    assert text.returncode == 0
    assert f"node: cli-node (id {job['nodeId']})" in text.stdout, text.stdout
    # the flag given after the command wins over nothing, and a later flag over an earlier one
    listed = dsm(tmp_path, "-o", "text", "nodes", "list", *conn, "-o", "json", DSM_API_KEY=API_KEY)
    assert json.loads(listed.stdout)[0]["name"] == "cli-node"


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
def test_bash_completion_follows_the_command_tree(tmp_path: Path) -> None:
    script = dsm(tmp_path, "completion", "bash")
    assert script.returncode == 0
    (tmp_path / "dsm.bash").write_text(script.stdout)

    def complete(line: str) -> set[str]:
        words = line.split(" ")
        program = (
            f"source {tmp_path / 'dsm.bash'}\n"
            f"COMP_WORDS=({' '.join(repr(w) for w in words)})\n"
            f"COMP_CWORD={len(words) - 1}\n"
            "_dsm\n"
            'printf "%s\\n" "${COMPREPLY[@]}"\n'
        )
        proc = subprocess.run(["bash", "-c", program], capture_output=True, text=True, check=True)
        return set(proc.stdout.split())

    assert complete("dsm ") >= {"up", "nodes", "jobs", "master-key", "alerts", "completion"}
    assert complete("dsm jo") == {"jobs"}
    assert complete("dsm jobs s") == {"submit", "stats"}
    assert complete("dsm --output json jobs g") == {"get"}
    assert complete("dsm --output ") == {"text", "json"}
    assert {"--api-key", "--server", "--output"} <= complete("dsm nodes list --")
    assert complete("dsm jobs submit --max") == {"--max-attempts"}
