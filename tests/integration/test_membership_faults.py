"""Membership under the worst-timed faults, with real node processes on a real PostgreSQL.

A node that stops (SIGSTOP: a VM pause) or loses its database link without a reset while it is
inside a transaction holding row locks must cost the cluster only that node: no peer may wait on
its locks, fence itself or be declared offline, and the frozen node is declared offline on time.
The node is frozen at the exact moment by its fault points (``dsm_node.faults``): after a
completion deleted job rows and while its heartbeat holds its own row, both uncommitted.

Also: a stored setting that breaks the cluster's arithmetic stops nothing and its repair is picked
up by itself; a sweep stuck inside its transaction delays neither heartbeats nor settings; a node
whose join took longer than the threshold is not declared offline on arrival.
"""

from __future__ import annotations

import re
import signal
import threading
import time
from pathlib import Path

import psycopg
import pytest

from dsm_node.db import migrating
from tests.support.nodes import Cluster, NodeProcess, query, set_settings
from tests.support.tcpproxy import Proxy
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

# The figures: heartbeat every second, offline after 6 s (fence point 4 s).
THRESHOLD = 6.0
INTERVAL = 1.0


class Producer(threading.Thread):
    """Submits small batches of jobs through the given nodes until stopped."""

    def __init__(self, nodes: list[NodeProcess], job: dict[str, object], every: float) -> None:
        super().__init__(daemon=True)
        self.nodes, self.job, self.every = nodes, job, every
        self.ids: list[int] = []
        self.halt = threading.Event()

    def run(self) -> None:
        i = 0
        while not self.halt.wait(self.every):
            node = self.nodes[i % len(self.nodes)]
            i += 1
            try:
                status, body = node.request("POST", "/api/jobs", {"jobs": [self.job] * 50})
            except OSError:
                continue
            if status == 201:
                self.ids += body["ids"]

    def stop(self) -> list[int]:
        self.halt.set()
        self.join(30)
        return self.ids


def statuses(url: str) -> dict[str, tuple[str, int]]:
    return {n: (s, int(e)) for n, s, e in query(url, "SELECT name, status, epoch FROM nodes")}


def frozen_sessions(url: str, name: str) -> dict[str, set[str]]:
    """The node's sessions idle inside a transaction, with the tables each holds locks on."""
    rows = query(
        url,
        "SELECT a.application_name, c.relname FROM pg_stat_activity a "
        "JOIN pg_locks l ON l.pid = a.pid JOIN pg_class c ON c.oid = l.relation "
        "WHERE a.application_name LIKE %s AND a.state LIKE 'idle in transaction%%' "
        "AND c.relkind = 'r'",
        (f"dsm-node:{name}%",),
    )
    out: dict[str, set[str]] = {}
    for app, rel in rows:
        out.setdefault(app, set()).add(rel)
    return out


def declared_offline(logs: str) -> list[str]:
    return re.findall(r"declared (\S+) offline", logs)


@pytest.mark.parametrize("fault", ["sigstop", "blackhole"])
def test_node_frozen_inside_a_transaction_costs_only_itself(
    dsm_cluster: Cluster, tmp_path: Path, fault: str
) -> None:
    url = dsm_cluster.database_url
    set_settings(url, heartbeat_interval_seconds=INTERVAL, offline_threshold_seconds=THRESHOLD)
    fault_file = tmp_path / "fault-a"
    port = int(re.search(r":(\d+)/", url).group(1))  # type: ignore[union-attr]
    proxy = Proxy(port)
    try:
        a = dsm_cluster.start(
            "a",
            DSM_TEST_FAULT_FILE=str(fault_file),
            database_url=url.replace(f":{port}/", f":{proxy.port}/"),
        )
        peers = [dsm_cluster.start(n) for n in ("b", "c", "d")]
        producer = Producer([a, *peers], {"type": "noop"}, every=0.2)
        producer.start()
        wait_until(
            lambda: query(url, "SELECT count(*) FROM job_history WHERE node_id = 1")[0][0] > 0,
            30,
            "a completes jobs",
        )
        # Freeze a at the worst moment: completed job rows deleted and its own row updated by
        # its heartbeat, neither committed.
        fault_file.write_text("completion heartbeat")
        wait_until(a.is_stopped, 30, "a stops inside its transactions", a.log_tail)
        held = frozen_sessions(url, "a")
        assert "jobs" in held.pop("dsm-node:a", set()), held  # the job pool's completion
        assert any("nodes" in tables for tables in held.values()), held  # its heartbeat
        if fault == "blackhole":
            proxy.cut()  # the link goes silent (no reset), then a runs on without it
            a.signal(signal.SIGCONT)
        before = statuses(url)

        # a is declared offline while still frozen or cut off, in time; its work is taken over.
        wait_until(
            lambda: statuses(url)["a"][0] == "offline",
            THRESHOLD * 4,
            "a declared offline",
            dsm_cluster.logs,
        )
        assert fault == "blackhole" or a.is_stopped()
        silent, reason = query(
            url,
            "SELECT extract(epoch FROM status_changed_at - last_heartbeat), status_reason "
            "FROM nodes WHERE name = 'a'",
        )[0]
        print(f"a declared offline after {float(silent):.2f} s of silence ({reason})")
        # The bound is threshold + one interval (sweeps run every interval); one more interval
        # of slack covers a sweep delayed by a loaded machine.
        assert float(silent) <= THRESHOLD + 2 * INTERVAL, (silent, reason)
        jobs_done = query(url, "SELECT count(*) FROM job_history")[0][0]
        wait_until(
            lambda: query(url, "SELECT count(*) FROM jobs WHERE owner_node = 1")[0][0] == 0,
            THRESHOLD * 2,
            "a's jobs back in the pool",
            dsm_cluster.logs,
        )
        time.sleep(2 * INTERVAL)

        # Release a (or its link) and watch the cluster settle for longer than a threshold.
        if fault == "sigstop":
            a.signal(signal.SIGCONT)
        else:
            proxy.restore()
        wait_until(
            lambda: statuses(url)["a"] == ("online", 2),
            THRESHOLD * 4,
            "a rejoins as a new incarnation",
            a.log_tail,
        )
        time.sleep(THRESHOLD + 2 * INTERVAL)
        ids = producer.stop()

        after = statuses(url)
        for p in peers:
            assert before[p.name] == after[p.name] == ("online", 1), (before, after)
            assert "stopped claiming jobs" not in p.log_text(), p.log_tail()
        logs = "".join(n.log_text() for n in [a, *peers])
        assert set(declared_offline(logs)) == {"a"}, declared_offline(logs)
        assert query(url, "SELECT count(*) FROM job_history")[0][0] > jobs_done
        wait_until(
            lambda: query(url, "SELECT count(*) FROM jobs")[0][0] == 0,
            60,
            "every job done",
            dsm_cluster.logs,
        )
        done = {
            r[0]
            for r in query(
                url,
                "SELECT id FROM job_history WHERE outcome = 'succeeded' AND id = ANY(%s)",
                (ids,),
            )
        }
        assert done == set(ids), f"{len(set(ids) - done)} jobs lost"
    finally:
        proxy.close()


def test_settings_are_reread_on_their_own_and_a_bad_value_stops_nothing(
    dsm_cluster: Cluster,
) -> None:
    """A stored threshold of 1e308 made every sweep fail ("timestamp out of range"), and settings
    were re-read only after a successful sweep, so restoring the value did not help. Now the node
    refuses the value (keeping the last good one, with one warning), keeps heartbeating, and picks
    up the restored value by itself."""
    url = dsm_cluster.database_url
    set_settings(url, heartbeat_interval_seconds=0.5, offline_threshold_seconds=5)
    a = dsm_cluster.start("a")
    b = dsm_cluster.start("b")
    set_settings(url, offline_threshold_seconds=1e308)
    bad = "refused; keeping 5.0"  # the stored value, then this
    wait_until(lambda: bad in a.log_text(), 30, "a notices the bad value", a.log_tail)
    wait_until(lambda: bad in b.log_text(), 30, "b notices the bad value", b.log_tail)
    beats = query(url, "SELECT last_heartbeat FROM nodes WHERE name = 'a'")[0][0]
    wait_until(
        lambda: query(url, "SELECT last_heartbeat FROM nodes WHERE name = 'a'")[0][0] > beats,
        10,
        "a keeps heartbeating",
    )
    time.sleep(2)  # several intervals with the bad value in place
    for n in (a, b):
        assert "heartbeat failed" not in n.log_text(), n.log_tail()
        assert "sweep failed" not in n.log_text(), n.log_tail()
        assert n.log_text().count(bad) == 1, "one warning, not one per refresh"
    set_settings(url, offline_threshold_seconds=5)
    b.kill()
    wait_until(
        lambda: statuses(url)["b"][0] == "offline",
        30,
        "a re-reads the restored threshold and declares b offline",
        a.log_tail,
    )


def test_a_stuck_sweep_delays_neither_heartbeats_nor_settings(
    dsm_cluster: Cluster, tmp_path: Path
) -> None:
    """a's sweep hangs inside its transaction (holding the rows it marked); a keeps heartbeating
    and re-reading settings, and b keeps sweeping."""
    url = dsm_cluster.database_url
    set_settings(url, heartbeat_interval_seconds=0.5, offline_threshold_seconds=6)
    fault_file = tmp_path / "fault-a"
    a = dsm_cluster.start("a", DSM_TEST_FAULT_FILE=str(fault_file))
    b = dsm_cluster.start("b")
    c = dsm_cluster.start("c")
    fault_file.write_text("sweep=hang")
    wait_until(lambda: "sweep hangs" in a.log_text(), 30, "a's sweep hangs", a.log_tail)
    set_settings(url, offline_threshold_seconds=7)
    wait_until(
        lambda: "offline threshold 7 s" in a.log_text(),
        30,
        "a re-reads the settings while its sweep is stuck",
        a.log_tail,
    )
    c.kill()
    wait_until(lambda: statuses(url)["c"][0] == "offline", 30, "b declares c offline", b.log_tail)
    for _ in range(4):  # longer than the threshold with a's sweep stuck: a's heartbeat goes on
        beat = query(url, "SELECT last_heartbeat FROM nodes WHERE name = 'a'")[0][0]
        wait_until(
            lambda beat=beat: (
                query(url, "SELECT last_heartbeat FROM nodes WHERE name = 'a'")[0][0] > beat
            ),
            10,
            "a heartbeats",
            a.log_tail,
        )
        time.sleep(2)
    assert "sweep waiting on the database" in a.log_text()
    assert statuses(url)["a"] == ("online", 1)
    for n in (a, b):
        assert "stopped claiming jobs" not in n.log_text(), n.log_tail()
        assert "heartbeat failed" not in n.log_text(), n.log_tail()
    fault_file.unlink()
    wait_until(lambda: "sweep goes on" in a.log_text(), 30, "a's sweep resumes", a.log_tail)
    assert statuses(url)["a"] == ("online", 1)


def test_a_node_whose_join_took_long_is_not_declared_offline_on_arrival(
    dsm_cluster: Cluster,
) -> None:
    """Joining is one transaction (under the schema lock, with key derivation): on a loaded
    machine, or behind another node's migration, it can take longer than the threshold. The new
    incarnation's first heartbeat is dated when it registers, not when its join began."""
    url = dsm_cluster.database_url
    set_settings(url, heartbeat_interval_seconds=0.5, offline_threshold_seconds=4)
    a = dsm_cluster.start("a")
    with psycopg.connect(url, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (migrating.SCHEMA_LOCK_ID,))
        b = dsm_cluster.start("b", wait=False)
        wait_until(
            lambda: (
                query(
                    url,
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'dsm-node:b' "
                    "AND wait_event_type = 'Lock'",
                )[0][0]
                > 0
            ),
            30,
            "b waits for the schema lock",
            b.log_tail,
        )
        time.sleep(6)  # longer than the threshold
    b.wait_ready()
    time.sleep(3)  # several of a's sweeps
    assert statuses(url)["b"] == ("online", 1), b.log_tail()
    assert "declared b offline" not in a.log_text()


def test_a_node_stopped_while_starting_shows_offline_at_once(
    dsm_cluster: Cluster, tmp_path: Path
) -> None:
    """SIGTERM after the node registered itself Online but before its services were built: it
    still says goodbye (Offline, local jobs dropped) instead of leaving its peers to wait out the
    offline threshold."""
    url = dsm_cluster.database_url
    set_settings(url, heartbeat_interval_seconds=0.5, offline_threshold_seconds=120)
    fault_file = tmp_path / "fault-a"
    fault_file.write_text("startup=hang")
    a = dsm_cluster.start("a", wait=False, DSM_TEST_FAULT_FILE=str(fault_file))
    wait_until(lambda: "startup hangs" in a.log_text(), 60, "a hangs after joining", a.log_tail)
    assert statuses(url)["a"] == ("online", 1)
    assert a.stop() == 0, a.log_tail()
    assert statuses(url)["a"] == ("offline", 1), a.log_tail()
    assert "marked offline" in a.log_text()
