"""Typed states: every state that is stored or compared is an enum, and the places that spell
them elsewhere (the migrations' CHECK constraints, the metrics' label values) agree with it."""

from __future__ import annotations

import re
from pathlib import Path

from dsm_node import metrics
from dsm_node.cluster import clock
from dsm_node.cluster.status import StoredStatus
from dsm_node.jobs.states import AttemptEnd, JobState, Outcome, PublicState, public_state

MIGRATIONS = Path(__file__).resolve().parents[2] / "node_image" / "dsm_node" / "db" / "migrations"


def _check_values(column: str) -> set[str]:
    sql = (MIGRATIONS / "0001_initial.sql").read_text()
    m = re.search(rf"\b{column}\b[^,]*?CHECK \({column} IN \(([^)]*)\)\)", sql, re.S)
    assert m, column
    return {v.strip().strip("'") for v in m.group(1).split(",")}


def test_stored_enums_match_the_schema() -> None:
    assert _check_values("status") == {s.value for s in StoredStatus}
    assert _check_values("outcome") == {o.value for o in Outcome}
    assert _check_values("state") == {s.value for s in JobState}


def test_the_metrics_count_every_way_an_attempt_ends() -> None:
    assert tuple(e.value for e in AttemptEnd) == metrics.JOB_OUTCOMES


def test_public_states() -> None:
    assert public_state(None, Outcome.DISCARDED, 1, False) is PublicState.DISCARDED
    assert public_state(JobState.RUNNING, None, 1, False) is PublicState.RUNNING
    assert public_state(JobState.READY, None, 1, True) is PublicState.RETRYING
    assert public_state(JobState.READY, None, 0, True) is PublicState.SCHEDULED
    assert public_state(JobState.READY, None, 0, False) is PublicState.READY


def test_time_out_of_sync() -> None:
    assert clock.out_of_sync(29.0, 3600, "CET", 3600.0, "Europe/Paris") == ""
    assert "by +31.0 s" in clock.out_of_sync(31.0, 0, "UTC", 0.0, "UTC")
    both = clock.out_of_sync(-45.0, 0, "UTC", 3600.0, "CET")
    assert "by -45.0 s" in both and "time zone UTC (UTC+0)" in both and "CET (UTC+1)" in both
