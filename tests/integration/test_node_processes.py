"""Real node processes against a real PostgreSQL: exactly-once effects, takeover after SIGKILL,
fencing after SIGSTOP, self-fencing when cut off from the database, local and periodic jobs,
simultaneous start, graceful halt, and restarts that do not spend a job's attempts.

Timings are shortened through the cluster settings (heartbeat and offline threshold); assertions
are about behaviour and order, never about how fast something was.
"""

from __future__ import annotations

import datetime as dt
import re
import signal
import time

import pytest

from dsm_node.db import migrating
from dsm_node.embedded_pg import free_port
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

THRESHOLD = 5.0


def fast_settings(url: str, threshold: float = THRESHOLD) -> None:
    prepare(url, threshold)


def test_three_nodes_run_5000_jobs_each_effect_exactly_once(dsm_cluster: Cluster) -> None:
    url = dsm_cluster.database_url
    fast_settings(url, threshold=30)
    nodes = [dsm_cluster.start(f"node-{i}") for i in (1, 2, 3)]
    ids: list[int] = []
    for chunk in range(5):  # through different nodes, in batches
        ids += submit(nodes[chunk % 3], [{"type": "record_effect"}] * 1000)
    assert len(set(ids)) == 5000
    wait_until(lambda: pending(url) == 0, 120, "all jobs done", dsm_cluster.logs)
    effects = effects_per_job(url)
    assert set(effects) == set(ids)
    assert all(len(v) == 1 for v in effects.values()), "an effect happened twice"
    per_node = dict(query(url, "SELECT node, count(*) FROM test_effects GROUP BY node"))
    assert set(per_node) == {"node-1", "node-2", "node-3"}, per_node
    assert min(per_node.values()) >= 250, f"work was not spread: {per_node}"
    (done,) = query(
        url,
        "SELECT count(*) FROM job_history WHERE outcome = 'succeeded' AND type = 'record_effect'",
    )[0]
    assert done == 5000


def test_sigkilled_node_jobs_run_elsewhere_after_the_threshold(dsm_cluster: Cluster) -> None:
    url = dsm_cluster.database_url
    fast_settings(url)
    a = dsm_cluster.start("a")
    ids = submit(
        a, [{"type": "record_effect", "payload": {"sleep_before": 600, "slow_attempts": 1}}] * 20
    )
    wait_until(
        lambda: len(running(url)) == 20,
        30,
        "a holds all jobs",
    )
    b = dsm_cluster.start("b")
    a.kill()
    wait_until(lambda: pending(url) == 0, 60, "b finishes a's jobs", dsm_cluster.logs)
    effects = effects_per_job(url)
    assert set(effects) == set(ids) and all(v == ["b"] for v in effects.values())
    assert node_status(url, "a") == "offline"
    # takeover waited for the threshold after a's last heartbeat (both on the database's clock):
    # nothing was taken from a before it
    (waited,) = query(
        url,
        "SELECT extract(epoch FROM (SELECT min(at) FROM test_effects) - last_heartbeat) "
        "FROM nodes WHERE name = 'a'",
    )[0]
    assert float(waited) >= THRESHOLD, waited
    assert "declared a offline" in b.log_text()


def test_paused_node_cannot_finish_jobs_taken_over_and_rejoins(dsm_cluster: Cluster) -> None:
    url = dsm_cluster.database_url
    fast_settings(url)
    a = dsm_cluster.start("a")
    # a writes the effect, then is paused before it can commit the job
    ids = submit(
        a, [{"type": "record_effect", "payload": {"sleep_after_write": 3, "slow_attempts": 1}}] * 10
    )
    # Claimed is not enough (on a busy machine a can be frozen before any handler starts): wait
    # until effects are written inside transactions a has yet to commit.
    writing = (
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'dsm-node:a' "
        "AND state = 'idle in transaction' AND query LIKE 'INSERT INTO test_effects%'"
    )
    wait_until(
        lambda: len(running(url)) == 10 and query(url, writing)[0][0] > 0,
        30,
        "a holds all jobs and has written effects it has not committed",
    )
    a.signal(signal.SIGSTOP)
    wait_until(a.is_stopped, 10, "a is frozen")
    # On a busy machine a may have committed a job or two between the check above and the freeze;
    # those are a's, legitimately (and a COMMIT already sent may land a little later still).
    time.sleep(0.5)
    frozen = running(url)
    assert frozen, "a finished every job before it was frozen: the test proved nothing"
    b = dsm_cluster.start("b")
    wait_until(lambda: pending(url) == 0, 60, "b finishes the jobs", dsm_cluster.logs)
    assert node_status(url, "a") == "offline"
    a.signal(signal.SIGCONT)
    wait_until(
        lambda: "rejoining" in a.log_text(), 30, "a notices it was declared offline", a.log_tail
    )
    a.wait_ready(30)
    assert node_status(url, "a") == "online"
    (epoch,) = query(url, "SELECT epoch FROM nodes WHERE name = 'a'")[0]
    assert epoch == 2
    time.sleep(4)  # a's sleeping handlers wake up and try to finish
    effects = effects_per_job(url)
    assert set(effects) == set(ids)
    # One effect per job, by the node whose finish was recorded: a's late finishes were fenced
    # out. b took over what a held frozen; what a finished before, stays a's.
    finished_by = dict(
        query(
            url,
            "SELECT h.id, n.name FROM job_history h JOIN nodes n ON n.id = h.node_id "
            "WHERE h.id = ANY(%s)",
            (ids,),
        )
    )
    assert effects == {j: [finished_by[j]] for j in ids}, (effects, finished_by)
    assert any(effects[j] == ["b"] for j in frozen), effects
    assert all(effects[j] == ["a"] for j in set(ids) - frozen), effects
    assert "claim lost" in a.log_text() or "abandoned" in a.log_text()
    assert b.proc is not None and b.proc.poll() is None


def test_node_cut_off_from_the_database_stops_before_peers_take_over(
    dsm_cluster: Cluster, pg_server
) -> None:  # type: ignore[no-untyped-def]
    url = dsm_cluster.database_url
    fast_settings(url, threshold=6)
    port = int(re.search(r":(\d+)/", url).group(1))  # type: ignore[union-attr]
    proxy = Proxy(port)
    try:
        a = dsm_cluster.start("a", database_url=url.replace(f":{port}/", f":{proxy.port}/"))
        ids = submit(
            a, [{"type": "record_effect", "payload": {"sleep_before": 600, "slow_attempts": 1}}] * 8
        )
        wait_until(
            lambda: len(running(url)) == 8,
            30,
            "a holds all jobs",
        )
        b = dsm_cluster.start("b")
        proxy.cut()
        wait_until(lambda: pending(url) == 0, 60, "b finishes a's jobs", dsm_cluster.logs)
        (offline_at,) = query(url, "SELECT status_changed_at FROM nodes WHERE name = 'a'")[0]
        m = re.search(r"^(\S+)Z .*stopped claiming jobs", a.log_text(), re.MULTILINE)
        assert m, a.log_tail()
        fenced_at = dt.datetime.fromisoformat(m.group(1)).replace(tzinfo=dt.UTC)
        assert fenced_at < offline_at, (fenced_at, offline_at)
        assert all(v == ["b"] for v in effects_per_job(url).values())
        assert set(effects_per_job(url)) == set(ids)
        proxy.restore()
        wait_until(lambda: node_status(url, "a") == "online", 60, "a back online", a.log_tail)
        assert b.proc is not None and b.proc.poll() is None
    finally:
        proxy.close()


def test_local_jobs_run_once_on_each_online_node(dsm_cluster: Cluster) -> None:
    url = dsm_cluster.database_url
    fast_settings(url)
    a, b, c = (dsm_cluster.start(n) for n in "abc")
    c.kill()
    wait_until(lambda: node_status(url, "c") == "offline", 30, "c offline")
    status, body = a.request("POST", "/api/jobs", {"type": "clear_caches"})
    assert status == 201 and len(body["ids"]) == 2
    wait_until(lambda: query(url, "SELECT count(*) FROM jobs")[0][0] == 0, 30, "local jobs done")
    rows = query(
        url,
        "SELECT n.name, t.name, h.outcome FROM job_history h "
        "JOIN nodes n ON n.id = h.node_id JOIN nodes t ON t.id = h.target_node "
        "WHERE h.type = 'clear_caches'",
    )
    assert sorted(rows) == [("a", "a", "succeeded"), ("b", "b", "succeeded")]
    assert "cleared" in a.log_text() and "cleared" in b.log_text()


def test_periodic_job_runs_once_per_period_across_three_nodes(dsm_cluster: Cluster) -> None:
    url = dsm_cluster.database_url
    fast_settings(url)
    modules = "tests.support.jobtypes,tests.support.periodic"
    for n in ("a", "b", "c"):
        dsm_cluster.start(n, DSM_JOB_MODULES=modules)
    time.sleep(7)
    runs = query(url, "SELECT slot, job_id FROM periodic_runs WHERE name = 'test_tick'")
    assert len(runs) >= 3
    assert len({slot for slot, _ in runs}) == len(runs)
    wait_until(lambda: pending(url) == 0, 30, "periodic jobs done")
    effects = effects_per_job(url)
    assert all(len(effects[job_id]) == 1 for _, job_id in runs)


def test_two_nodes_started_at_the_same_instant_on_an_empty_database(
    dsm_cluster: Cluster, empty_database_url: str
) -> None:
    a = dsm_cluster.start("a", wait=False, database_url=empty_database_url)
    b = dsm_cluster.start("b", wait=False, database_url=empty_database_url)
    a.wait_ready()
    b.wait_ready()
    latest = migrating.load_migrations()[-1].version
    assert query(empty_database_url, "SELECT schema_version FROM dsm_schema") == [(latest,)]
    assert sorted(query(empty_database_url, "SELECT name, status FROM nodes")) == [
        ("a", "online"),
        ("b", "online"),
    ]
    logs = a.log_text() + b.log_text()
    assert logs.count("applying migration 0001_initial") == 1


def test_sigterm_releases_jobs_and_shows_offline_at_once(dsm_cluster: Cluster) -> None:
    url = dsm_cluster.database_url
    fast_settings(url, threshold=60)  # far longer than the test: no takeover can explain it
    a = dsm_cluster.start("a", DSM_SHUTDOWN_GRACE_SECONDS="1")
    (job_id,) = submit(
        a, [{"type": "record_effect", "payload": {"sleep_before": 600, "slow_nodes": ["a"]}}]
    )
    mine = f"FROM jobs WHERE id = {int(job_id)}"  # not the node's periodic jobs
    wait_until(lambda: query(url, f"SELECT state {mine}") == [("running",)], 30, "running")
    assert a.stop() == 0
    assert node_status(url, "a") == "offline"
    assert query(url, f"SELECT state, owner_node {mine}") == [("ready", None)]
    b = dsm_cluster.start("b")
    wait_until(lambda: pending(url) == 0, 30, "b runs the released job", b.log_tail)
    assert effects_per_job(url) == {job_id: ["b"]}


def test_restarts_do_not_spend_a_jobs_attempts(dsm_cluster: Cluster, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A job released at a graceful shutdown was not a failure: restarts never dead-letter it.
    Here a job allowed two attempts is released by three restarts, then fails once for real, and
    still has its second attempt."""
    url = dsm_cluster.database_url
    fast_settings(url, threshold=60)  # no takeover during the test: only releases
    marker = tmp_path / "failed-once"
    job = {
        "type": "record_effect",
        "maxAttempts": 2,
        "payload": {"sleep_before": 600, "slow_nodes": ["a"], "fail_marker": str(marker)},
    }
    a = dsm_cluster.start("a", DSM_SHUTDOWN_GRACE_SECONDS="0.5")
    (job_id,) = submit(a, [job])
    # this job's row only: the node's periodic jobs (the agents' watch every 5 s) come and go
    state = f"SELECT state FROM jobs WHERE id = {int(job_id)}"
    for restart in range(3):
        wait_until(lambda: query(url, state) == [("running",)], 30, "a runs the job")
        assert a.stop() == 0
        assert query(url, state) == [("ready",)]
        if restart < 2:
            a = dsm_cluster.start("a", DSM_SHUTDOWN_GRACE_SECONDS="0.5")
    dsm_cluster.start("b")
    wait_until(lambda: pending(url) == 0, 60, "b runs the job to its end", dsm_cluster.logs)
    assert marker.exists(), "the job's first real run failed on purpose"
    outcome, attempt, error = query(
        url, "SELECT outcome, attempt, error FROM job_history WHERE id = %s", (job_id,)
    )[0]
    assert (outcome, attempt) == ("succeeded", 2), (outcome, attempt, error)
    assert effects_per_job(url) == {job_id: ["b"]}


def test_a_port_in_use_stops_the_node_with_a_reason_and_it_leaves(dsm_cluster: Cluster) -> None:
    """Each of the node's listeners, on its own thread, reports a taken port to the node's
    thread: exit code 2 with the port named; refused on the heartbeat port (after joining), the
    node also marks itself Offline on the way out."""
    url = dsm_cluster.database_url
    fast_settings(url, threshold=60)
    hb_port = free_port("127.0.0.1")
    a = dsm_cluster.start("a", DSM_HEARTBEAT_PORT=str(hb_port))
    api_clash = dsm_cluster.start(
        "b", wait=False, DSM_BIND_ADDRESS=a.address, DSM_API_PORT=str(a.port)
    )
    assert api_clash.child is not None and api_clash.child.proc is not None
    assert api_clash.child.proc.wait(60) == 2, api_clash.log_tail()
    assert f"cannot listen on {a.address} port {a.port}" in api_clash.log_text()
    assert "b" not in {n for (n,) in query(url, "SELECT name FROM nodes")}

    hb_clash = dsm_cluster.start(
        "c",
        wait=False,
        DSM_BIND_ADDRESS=a.address,
        DSM_API_PORT=str(free_port(a.address)),
        DSM_HEARTBEAT_PORT=str(hb_port),
    )
    assert hb_clash.child is not None and hb_clash.child.proc is not None
    assert hb_clash.child.proc.wait(60) == 2, hb_clash.log_tail()
    assert f"cannot serve agents on {a.address} port {hb_port}" in hb_clash.log_text()
    assert node_status(url, "c") == "offline", hb_clash.log_tail()
    wait_until(lambda: a.request("GET", "/readyz")[0] == 200, 30, "a still ready", a.log_tail)
