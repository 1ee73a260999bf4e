"""Pure rules: node status, fencing margin, query files, job-type registration, CLI input."""

from __future__ import annotations

import datetime as dt

import pytest
from pydantic import BaseModel

from dsm_node import cli
from dsm_node.cluster.status import NodeStatus, effective_status, fence_after
from dsm_node.db.queries import Q, parse
from dsm_node.jobs.registry import JobType, Periodic, Registry, UnknownJobType

NOW = dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.UTC)


@pytest.mark.parametrize(
    ("stored", "silent", "expected"),
    [
        ("online", 0, NodeStatus.ONLINE),
        ("online", 180, NodeStatus.ONLINE),
        ("online", 181, NodeStatus.OFFLINE),
        ("offline", 0, NodeStatus.OFFLINE),
        ("upgrade_required", 0, NodeStatus.UPGRADE_REQUIRED),
        ("upgrade_required", 999, NodeStatus.UPGRADE_REQUIRED),
        ("decommissioned", 0, NodeStatus.DECOMMISSIONED),
    ],
)
def test_effective_status(stored: str, silent: int, expected: NodeStatus) -> None:
    last = NOW - dt.timedelta(seconds=silent)
    assert effective_status(stored, last, NOW, 180) is expected


def test_statuses_are_spelled_as_the_specification() -> None:
    assert [s.value for s in NodeStatus] == [
        "Online",
        "Offline",
        "Offline (Upgrade Required)",
        "Decommissioned",
    ]


def test_a_node_fences_itself_well_before_its_peers_take_over() -> None:
    assert fence_after(180) == 120
    assert 0.5 * 6 < fence_after(6) < 6


def test_query_file_parsing() -> None:
    parsed = parse("-- name: a\n-- a comment\nSELECT 1;\n\n-- name: b\nSELECT :x\n")
    assert parsed == {"a": "SELECT 1", "b": "SELECT :x"}
    with pytest.raises(ValueError, match="twice"):
        parse("-- name: a\nSELECT 1;\n-- name: a\nSELECT 2;\n")
    with pytest.raises(AttributeError, match="no query named"):
        _ = Q.no_such_query
    assert "FOR UPDATE SKIP LOCKED" in Q.sql["claim_jobs"]


async def _noop(ctx: object, payload: object) -> None:
    return None


def test_registry_refuses_duplicates_and_bad_combinations() -> None:
    reg = Registry()
    reg.add(JobType("a", _noop))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="twice"):
        reg.add(JobType("a", _noop))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="local"):
        reg.add(JobType("b", _noop, local=True, transactional=True))  # type: ignore[arg-type]
    with pytest.raises(UnknownJobType, match="unknown job type 'zzz'"):
        reg.every(Periodic("p", "zzz", every=60))


def test_payload_models_give_readable_errors() -> None:
    class P(BaseModel):
        seconds: float

    jt = JobType("s", _noop, payload_model=P)  # type: ignore[arg-type]
    assert jt.validate({"seconds": 2}) == {"seconds": 2.0}
    with pytest.raises(ValueError, match=r"invalid payload for job type 's': seconds: "):
        jt.validate({"seconds": "soon"})
    # strict JSON types: a string of digits is not a number, nor is true
    for wrong in ("2", True):
        with pytest.raises(ValueError, match="seconds"):
            jt.validate({"seconds": wrong})
    with pytest.raises(ValueError, match="must be a JSON object"):
        jt.validate([1])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["jobs", "submit", "noop", "--payload", "{bad", "--server", "https://127.0.0.1:1"],
            "not valid JSON",
        ),
        (
            ["jobs", "submit", "noop", "--payload", "[1]", "--server", "https://127.0.0.1:1"],
            "JSON object",
        ),
        (
            ["jobs", "submit", "noop", "--count", "0", "--server", "https://127.0.0.1:1"],
            "at least 1",
        ),
        (["db", "upgrade", "--database-url", ""], "required"),
        (["node", "run", "--database-url", "postgresql://x/y", "--api-port", "99999"], "api_port"),
        (["up", "--nodes", "0"], "between 1 and 50"),
    ],
)
def test_cli_refuses_bad_input_before_doing_anything(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


def test_cli_reports_an_unreachable_server(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["nodes", "list", "--server", "https://127.0.0.1:1", "--insecure"]) == 1
    assert "cannot reach" in capsys.readouterr().err
