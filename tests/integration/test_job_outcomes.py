"""Every job gets an outcome, whatever the database does meanwhile: real node processes, a real
PostgreSQL, and outages shorter than the self-stop point (a node keeps its jobs through them).

- A node that could not write a job's outcome writes it later, with the job's fencing token.
- A running job past its deadline returns to the pool whoever owns it, and its owner's late
  finish cannot commit.
"""

from __future__ import annotations

import re
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from dsm_node.embedded_pg import EmbeddedPostgres
from tests.support.effects import (
    effects_per_job,
    node_status,
    pending,
    prepare,
    running,
    submit,
)
from tests.support.nodes import Cluster, query
from tests.support.tcpproxy import Proxy
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration


def running_count(url: str) -> int:
    return len(running(url, ("record_effect", "sleep")))


def proxied(url: str) -> tuple[Proxy, str]:
    port = int(re.search(r":(\d+)/", url).group(1))  # type: ignore[union-attr]
    proxy = Proxy(port)
    return proxy, url.replace(f":{port}/", f":{proxy.port}/")


def test_outcomes_lost_in_a_short_outage_are_recorded_afterwards(dsm_cluster: Cluster) -> None:
    """The database refuses a node for a few seconds, far below its self-stop point: the jobs
    that failed meanwhile, and whose failure could not be written, still end; none stays
    running."""
    url = dsm_cluster.database_url
    # Self-stop after 20 s without a heartbeat: the outage lasts until the node has logged a
    # failure it could not write, which on a loaded machine can take several seconds.
    prepare(url, threshold=30, interval=1)
    proxy, via_proxy = proxied(url)
    try:
        a = dsm_cluster.start("a", database_url=via_proxy)
        ids = submit(a, [{"type": "record_effect", "payload": {"sleep_after_write": 1.5}}] * 40)
        wait_until(lambda: running_count(url) >= 8, 30, "a runs jobs inside their transactions")
        proxy.refuse()
        wait_until(
            lambda: "could not record failure" in a.log_text(),
            30,
            "outcomes a could not write",
            a.log_tail,
        )
        proxy.restore()
        wait_until(lambda: pending(url) == 0, 60, "every job ends", a.log_tail)
        effects = effects_per_job(url)
        assert set(effects) == set(ids)
        assert all(len(v) == 1 for v in effects.values()), "an effect happened twice"
        assert "stopped claiming jobs" not in a.log_text(), "the outage was below the self-stop"
        assert node_status(url, "a") == "online"
    finally:
        proxy.close()


@pytest.fixture
def own_postgres() -> Iterator[EmbeddedPostgres]:
    """A PostgreSQL server of this test's own, which it may restart."""
    pg = EmbeddedPostgres(Path(tempfile.mkdtemp(prefix="dsm-restart-pg-")) / "data")
    try:
        pg.start()
    except Exception as e:  # no server binaries: the suite's own server would be missing too
        pytest.skip(f"cannot start a PostgreSQL server: {e}")
    try:
        yield pg
    finally:
        pg.stop("immediate")


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_jobs_end_after_a_postgresql_restart(
    own_postgres: EmbeddedPostgres, tmp_path: Path, mode: str
) -> None:
    with psycopg.connect(own_postgres.admin_url, autocommit=True) as conn:
        conn.execute("CREATE DATABASE dsm")
    url = own_postgres.url("dsm")
    cluster = Cluster(url, tmp_path)
    try:
        a = cluster.start("a")
        prepare(url, threshold=12, interval=1)
        b = cluster.start("b")
        ids = submit(a, [{"type": "record_effect", "payload": {"sleep_after_write": 1}}] * 60)
        ids += submit(b, [{"type": "sleep", "payload": {"seconds": 1}}] * 60)
        wait_until(lambda: running_count(url) >= 16, 30, "jobs running on both nodes", cluster.logs)
        own_postgres.stop(mode)
        own_postgres.start()
        wait_until(
            lambda: query(url, "SELECT count(*) FROM jobs")[0][0] == 0,
            90,
            "every job ends",
            cluster.logs,
        )
        effects = effects_per_job(url)
        assert len(effects) == 60 and all(len(v) == 1 for v in effects.values()), effects
        outcomes = dict(
            query(
                url,
                "SELECT outcome, count(*) FROM job_history WHERE id = ANY(%s) GROUP BY 1",
                (ids,),
            )
        )
        assert outcomes == {"succeeded": 120}, outcomes
    finally:
        cluster.close()


def test_a_job_past_its_deadline_returns_to_the_pool_while_its_owner_is_online(
    dsm_cluster: Cluster,
) -> None:
    """Its owner (paused, not long enough to be declared offline) cannot act: any node's sweep
    returns the job after its deadline, and the owner's late finish is fenced out."""
    url = dsm_cluster.database_url
    # a stays paused through b's start and b's sweep, which on a loaded machine can take tens of
    # seconds: a self-stop point of 40 s keeps that pause far from a takeover.
    prepare(url, threshold=60, interval=1)
    a = dsm_cluster.start("a")
    (job_id,) = submit(
        a,
        [
            {
                "type": "record_effect",
                "timeoutSeconds": 2,
                "payload": {"sleep_after_write": 600, "slow_nodes": ["a"]},
            }
        ],
    )
    wait_until(lambda: running_count(url) == 1, 30, "a runs the job")
    a.signal(signal.SIGSTOP)
    try:
        b = dsm_cluster.start("b")
        wait_until(
            lambda: effects_per_job(url) == {job_id: ["b"]},
            25,
            "b runs the job while its owner a is still paused",
            dsm_cluster.logs,
        )
        assert a.is_stopped()
    finally:
        a.signal(signal.SIGCONT)
    assert node_status(url, "a") == "online"
    wait_until(lambda: pending(url) == 0, 30, "the job is finished")
    # a wakes up past its deadline: its transaction rolls back, its outcome is fenced out
    wait_until(lambda: "another node holds it now" in a.log_text(), 30, "a gives up", a.log_tail)
    assert effects_per_job(url) == {job_id: ["b"]}
    assert "past their deadline" in b.log_text()
    assert query(url, "SELECT epoch FROM nodes WHERE name = 'a'") == [(1,)], "no takeover"
    assert "stopped claiming jobs" not in a.log_text()
