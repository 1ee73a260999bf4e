"""Seeded fault injection (tests/support/chaos.py): the short form runs every kind of fault once
in ``make test``; ``make chaos`` runs the long form and prints the report.

    DSM_CHAOS_SEED     the seed (the schedule of faults and jobs follows from it)
    DSM_CHAOS_FAULTS   how many faults; 0 (default) runs every kind once
    DSM_CHAOS_REPORT   also write the report to this file
    DSM_CHAOS_LOGS     keep the nodes' logs in this directory (default: the test's tmp_path,
                       which pytest removes after a few runs)
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from dsm_node.embedded_pg import EmbeddedPostgres
from tests.support.chaos import Chaos, Config, Report

pytestmark = [pytest.mark.integration, pytest.mark.timeout(4 * 3600)]

DEFAULT_SEED = 20261201


@pytest.fixture
def chaos_postgres() -> Iterator[EmbeddedPostgres]:
    """A PostgreSQL server of the test's own: the chaos restarts it."""
    pg = EmbeddedPostgres(Path(tempfile.mkdtemp(prefix="dsm-chaos-pg-")) / "data")
    try:
        pg.start()
    except Exception as e:
        pytest.skip(f"cannot start a PostgreSQL server: {e}")
    try:
        with psycopg.connect(pg.admin_url, autocommit=True) as conn:
            conn.execute("CREATE DATABASE dsm")
        yield pg
    finally:
        pg.stop("immediate")


def run(pg: EmbeddedPostgres, tmp_path: Path, config: Config) -> Report:
    if logs := os.environ.get("DSM_CHAOS_LOGS"):
        tmp_path = Path(logs).resolve()
        tmp_path.mkdir(parents=True, exist_ok=True)
    chaos = Chaos(pg, "dsm", tmp_path, config)
    try:
        report = chaos.run()
    finally:
        chaos.close()
    text = report.text()
    print(text)
    print(f"node logs: {tmp_path}")
    (tmp_path / "chaos-report.txt").write_text(text + "\n")
    if path := os.environ.get("DSM_CHAOS_REPORT"):
        Path(path).write_text(text + "\n")
    return report


def test_faults_of_every_kind_keep_every_job_exactly_once(
    chaos_postgres: EmbeddedPostgres, tmp_path: Path
) -> None:
    config = Config(
        seed=int(os.environ.get("DSM_CHAOS_SEED") or DEFAULT_SEED),
        faults=int(os.environ.get("DSM_CHAOS_FAULTS") or 0),
    )
    report = run(chaos_postgres, tmp_path, config)
    assert len(report.faults) == (config.faults or len(config.kinds))
    assert report.acknowledged > 0 and report.effects > 0
    assert not report.violations, report.text()


def test_a_sign_in_flood_never_delays_a_heartbeat(
    chaos_postgres: EmbeddedPostgres, tmp_path: Path
) -> None:
    config = Config(seed=DEFAULT_SEED, faults=2, kinds=("signin_flood",))
    report = run(chaos_postgres, tmp_path, config)
    assert [r.fault.kind for r in report.faults] == ["signin_flood"] * 2
    assert not report.violations, report.text()
