"""Pure rules of membership timing: the timeouts that follow from the heartbeat interval and the
offline threshold, the clamping of stored values, the reconciliation of stored settings, and which
database errors are worth retrying."""

from __future__ import annotations

import math

import psycopg
import pytest
import sqlalchemy.exc
from pydantic import BaseModel, Field, model_validator

from dsm_node.cluster import timing
from dsm_node.db.engine import SessionLimits, connection_options, database_unavailable
from dsm_node.settings_store import ClusterSettings

# (interval, threshold) pairs with the threshold at least three intervals, as the settings API
# requires, from the tests' shortest to the product's default and beyond.
SANE = [(0.5, 5.0), (1.0, 6.0), (1.0, 3.0), (10.0, 180.0), (60.0, 600.0), (0.1, 0.3)]


@pytest.mark.parametrize(("interval", "threshold"), SANE)
def test_a_frozen_nodes_locks_are_freed_before_its_peers_need_them(
    interval: float, threshold: float
) -> None:
    t, problems = timing.effective(interval, threshold)
    assert problems == []
    # its heartbeat's lock on its own row: freed before peers may declare it offline
    assert t.membership_session_timeout < t.offline_threshold
    # its completion's locks on job rows: freed at the fence point, so its jobs are back in the
    # pool within threshold + one interval of its last heartbeat (at most one interval before)
    assert t.job_idle_in_transaction_timeout == t.fence_after < t.offline_threshold
    assert t.heartbeat_interval + t.job_idle_in_transaction_timeout <= t.offline_threshold + 1e-9
    # a membership statement never waits on a lock past the next heartbeat, nor near the fence
    assert t.membership_lock_timeout <= t.heartbeat_interval
    assert t.membership_lock_timeout + t.heartbeat_interval < t.fence_after
    # a half-open connection is closed well before the node would fence itself
    idle, every, count = t.keepalive
    assert idle + every * count <= max(3, t.fence_after)  # keepalives count whole seconds
    assert t.tcp_user_timeout <= max(1.0, t.fence_after)


def test_session_settings_are_what_postgresql_accepts() -> None:
    t, _ = timing.effective(1.0, 6.0)
    assert t.membership_session() == {
        "lock_timeout": "1000ms",
        "statement_timeout": "2000ms",
        "idle_in_transaction_session_timeout": "2000ms",
        "tcp_keepalives_idle": "1",
        "tcp_keepalives_interval": "1",
        "tcp_keepalives_count": "2",
        "tcp_user_timeout": "2000ms",
    }
    assert t.job_session()["idle_in_transaction_session_timeout"] == "4000ms"
    assert "lock_timeout" not in t.job_session()
    assert t.client_tcp() == {
        "keepalives": 1,
        "keepalives_idle": 1,
        "keepalives_interval": 1,
        "keepalives_count": 2,
        "tcp_user_timeout": 2000,
    }
    options = connection_options(t.job_session())
    assert options.startswith("-c plan_cache_mode=force_custom_plan ")
    assert "-c idle_in_transaction_session_timeout=4000ms" in options


@pytest.mark.parametrize(
    ("interval", "threshold", "expected"),
    [
        (10.0, 1e308, (10.0, timing.MAX_THRESHOLD_SECONDS)),
        (10.0, math.inf, (10.0, 180.0)),
        (10.0, math.nan, (10.0, 180.0)),
        (10.0, -5.0, (10.0, 20.0)),
        (1e-6, 6.0, (timing.MIN_INTERVAL_SECONDS, 6.0)),
        (1e308, 180.0, (timing.MAX_INTERVAL_SECONDS, 2 * timing.MAX_INTERVAL_SECONDS)),
        (10.0, 5.0, (10.0, 20.0)),  # a threshold below two intervals would flap
        ("x", "y", (10.0, 180.0)),
    ],
)
def test_stored_values_out_of_bounds_are_clamped_and_reported(
    interval: object, threshold: object, expected: tuple[float, float]
) -> None:
    t, problems = timing.effective(interval, threshold)  # type: ignore[arg-type]
    assert (t.heartbeat_interval, t.offline_threshold) == expected
    assert problems, "a clamped value is reported"
    assert all("out of range" in p for p in problems)


def test_a_bad_stored_setting_keeps_the_last_good_value_and_the_rest_applies() -> None:
    last = ClusterSettings(heartbeat_interval_seconds=2.0, offline_threshold_seconds=20.0)
    got, problems = timing.reconcile_settings(
        ClusterSettings,
        {
            "heartbeat_interval_seconds": "often",
            "offline_threshold_seconds": 30,
            "not_a_setting": 1,
        },
        last,
    )
    assert got.heartbeat_interval_seconds == 2.0
    assert got.offline_threshold_seconds == 30.0
    assert len(problems) == 1 and "heartbeat_interval_seconds" in problems[0]
    fine, none = timing.reconcile_settings(ClusterSettings, {"offline_threshold_seconds": 60}, last)
    assert none == [] and fine.offline_threshold_seconds == 60


def test_a_rule_across_settings_keeps_the_last_good_settings() -> None:
    class Pair(BaseModel):
        low: float = Field(1.0, gt=0)
        high: float = 2.0

        @model_validator(mode="after")
        def ordered(self) -> Pair:
            if self.high <= self.low:
                raise ValueError("high must exceed low")
            return self

    last = Pair(low=1, high=5)
    got, problems = timing.reconcile_settings(Pair, {"low": 9, "high": 3}, last)
    assert got == last and len(problems) == 1


def test_session_limits_count_changes_only() -> None:
    limits = SessionLimits()
    assert limits.update({"lock_timeout": "1s"}, {"keepalives": 1})
    generation = limits.generation
    assert not limits.update({"lock_timeout": "1s"}, {"keepalives": 1})
    assert limits.generation == generation
    assert limits.update({"lock_timeout": "2s"}, {"keepalives": 1})
    assert limits.snapshot() == (generation + 1, {"lock_timeout": "2s"}, {"keepalives": 1})


def _psycopg_error(cls: type[psycopg.Error], sqlstate: str | None = None) -> psycopg.Error:
    e = cls("boom")
    if sqlstate is not None:
        e.sqlstate = sqlstate  # type: ignore[misc]
    return e


@pytest.mark.parametrize(
    ("error", "retry"),
    [
        (ConnectionRefusedError(), True),
        (TimeoutError(), True),
        (psycopg.OperationalError("server closed the connection"), True),
        (sqlalchemy.exc.OperationalError("x", {}, psycopg.OperationalError("gone")), True),
        (
            sqlalchemy.exc.InternalError("x", {}, _psycopg_error(psycopg.InternalError, "25P03")),
            True,
        ),
        (sqlalchemy.exc.DataError("x", {}, _psycopg_error(psycopg.DataError, "22021")), False),
        (sqlalchemy.exc.ProgrammingError("x", {}, _psycopg_error(psycopg.ProgrammingError)), False),
        (ValueError("bad"), False),
    ],
)
def test_only_errors_of_reach_are_retried(error: BaseException, retry: bool) -> None:
    assert database_unavailable(error) is retry
