"""End to end: the operator (its own process) drives a StatefulSet whose pods are real node-runtime
processes started by the mini kubelet (tests/k8s/kubelet.py) from the pods' own command,
environment and Secrets, each on its own 127.x address, against a real PostgreSQL.

Readiness is the nodes' own ``/readyz`` probed by the kubelet, so launches, upgrades and scale-down
below are the real nodes' behaviour. Assertions are about behaviour and order, never speed.
"""

from __future__ import annotations

import itertools
import os
import signal
import threading
import time
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from dsm_node.db import migrating
from tests.k8s import containers
from tests.k8s.kubelet import KubeletEvent, MiniKubelet
from tests.support.e2e import (
    V2_MIGRATIONS,
    JobProducer,
    Manager,
    OperatorProcess,
    node_request,
)
from tests.support.nodes import query
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]
# The schema version the test-only "next version" reaches.
V2_SCHEMA = migrating.load_migrations([V2_MIGRATIONS])[-1].version

UPGRADE_REQUIRED = "Offline (Upgrade Required)"


def concurrent_starts(events: Iterable[KubeletEvent]) -> list[str]:
    """Processes spawned while another process of the namespace was still starting (spawned and
    not yet Ready): the product forbids starting two nodes at once."""
    starting: dict[str, str] = {}  # uid -> pod
    violations = []
    for e in sorted(events, key=lambda e: e.at):
        if e.kind == "spawned":
            others = [p for uid, p in starting.items() if uid != e.uid]
            if others:
                violations.append(f"{e.pod} spawned while {others} still starting")
            starting[e.uid] = e.pod
        elif e.kind in ("ready", "exited", "killed", "deleted", "terminating"):
            starting.pop(e.uid, None)
    return violations


def first(events: Iterable[KubeletEvent], kind: str) -> dict[str, KubeletEvent]:
    """pod name -> its first event of ``kind`` (per pod name, across uids)."""
    out: dict[str, KubeletEvent] = {}
    for e in sorted(events, key=lambda e: e.at):
        if e.kind == kind and e.pod not in out:
            out[e.pod] = e
    return out


def launch(manager: Manager, kubelet: MiniKubelet, nodes: int) -> None:
    manager.apply(nodes=nodes, version="0.1.0")
    wait_until(
        lambda: manager.all_online(nodes, "0.1.0"),
        300,
        f"{nodes} nodes Online in the resource's status",
        lambda: f"status: {manager.status()}\n",
    )


RUNTIMES = pytest.mark.parametrize("manager", ["process", "image"], indirect=True)
"""Run a test twice: nodes and operator as local processes, then from their images in podman."""


@RUNTIMES
def test_three_nodes_come_up_one_at_a_time(manager: Manager, kubelet: MiniKubelet) -> None:
    launch(manager, kubelet, 3)

    status = manager.status()
    assert [(n["name"], n["status"], n["podReady"]) for n in status["nodes"]] == [
        ("mgr-0", "Online", True),
        ("mgr-1", "Online", True),
        ("mgr-2", "Online", True),
    ]
    ready = manager.condition("Ready")
    assert ready["status"] == "True", ready
    assert ready["observedGeneration"] == manager.resource()["metadata"]["generation"]
    assert manager.condition("Degraded")["status"] == "False"
    assert status["currentVersion"] == "0.1.0"

    # The nodes table: registered in ordinal order, each after the previous pod turned Ready.
    rows = query(
        manager.database_url,
        "SELECT name, extract(epoch FROM started_at)::float8, status, version FROM nodes "
        "ORDER BY started_at",
    )
    assert [(r[0], r[2], r[3]) for r in rows] == [
        ("mgr-0", "online", "0.1.0"),
        ("mgr-1", "online", "0.1.0"),
        ("mgr-2", "online", "0.1.0"),
    ]
    registered = {r[0]: r[1] for r in rows}
    events = kubelet.events_of(manager.namespace)
    spawned, became_ready = first(events, "spawned"), first(events, "ready")
    for prev, nxt in (("mgr-0", "mgr-1"), ("mgr-1", "mgr-2")):
        assert became_ready[prev].at < spawned[nxt].at < registered[nxt], (
            f"{nxt} started before {prev} was Ready: ready {became_ready[prev].at:.3f}, "
            f"spawned {spawned[nxt].at:.3f}, registered {registered[nxt]:.3f}"
        )
    assert concurrent_starts(events) == []
    # every process ran once: no restarts, no kills
    assert [e.pod for e in events if e.kind == "spawned"] == ["mgr-0", "mgr-1", "mgr-2"]
    assert_runtime(manager, kubelet)
    assert kubelet.errors == []


def assert_runtime(manager: Manager, kubelet: MiniKubelet) -> None:
    """The nodes really ran the way the test says: from the node image in podman, as the pod's
    user, or as local processes."""
    for pod in manager.pods():
        container = pod["status"]["containerStatuses"][0]
        pid = kubelet.pid_of(manager.namespace, pod["metadata"]["name"])
        assert pid is not None
        uids = next(
            line.split()[1:]
            for line in Path(f"/proc/{pid}/status").read_text().splitlines()
            if line.startswith("Uid:")
        )
        if manager.runtime == "image":
            assert container["containerID"].startswith("podman://"), container
            assert container["image"].startswith("localhost/dsm-node-e2e:"), container
            assert container["imageID"], container
            assert set(uids) == {"10001"}, uids  # runAsUser of the pod's securityContext
            name = container["containerID"].removeprefix("podman://")
            read_only = containers.podman(
                "inspect", "--format", "{{.HostConfig.ReadonlyRootfs}}", name
            ).stdout.strip()
            assert read_only == "true", f"{name}: read-only root {read_only}"
        else:
            assert container["containerID"].startswith("local://"), container
    operator = manager.operator
    assert operator is not None
    if manager.runtime == "image":  # the operator too, as the chart runs it (UID 10002)
        assert operator.container_name is not None
        pid = containers.pid(operator.container_name)
        assert pid is not None
        status = Path(f"/proc/{pid}/status").read_text()
        assert "\nUid:\t10002\t10002\t10002\t10002\n" in status
    else:
        assert operator.container_name is None


class Observer(threading.Thread):
    """Samples, every ~0.1 s, the node statuses seen in the database, through a node's API and in
    the resource's status, so the test can show states that only last a while."""

    def __init__(self, manager: Manager) -> None:
        super().__init__(daemon=True, name="observer")
        self.manager = manager
        self.db: dict[str, set[str]] = defaultdict(set)
        self.api: dict[str, set[str]] = defaultdict(set)
        self.resource: dict[str, set[str]] = defaultdict(set)
        self.rollout_states: set[str] = set()
        self.stop_event = threading.Event()
        self.key = manager.api_key()

    def run(self) -> None:
        while not self.stop_event.wait(0.1):
            try:
                for name, (row_status, _) in self.manager.db_nodes().items():
                    self.db[name].add(row_status)
                status = self.manager.status()
                self.rollout_states.add((status.get("rollout") or {}).get("state", ""))
                for n in status.get("nodes") or []:
                    self.resource[n["name"]].add(n["status"])
                for ip in self.manager.ready_pod_ips()[:1]:
                    code, body = node_request(ip, self.key, "GET", "/api/nodes")
                    if code == 200:
                        for n in body["nodes"]:
                            self.api[n["name"]].add(n["status"])
            except Exception:  # a sample may fail while pods come and go
                continue

    def stop(self) -> None:
        self.stop_event.set()
        self.join(timeout=10)


@RUNTIMES
def test_upgrade_takes_over_one_node_at_a_time_and_loses_no_job(
    manager: Manager, kubelet: MiniKubelet
) -> None:
    launch(manager, kubelet, 3)
    url = manager.database_url
    producer = JobProducer(manager)
    producer.start()
    wait_until(lambda: len(producer.ids) >= 50, 60, "jobs flowing before the upgrade")
    observer = Observer(manager)
    observer.start()
    upgrade_started = time.time()

    manager.patch_spec(version="0.2.0")
    try:
        wait_until(
            lambda: manager.all_online(3, "0.2.0"),
            600,
            "3 nodes Online at 0.2.0",
            lambda: f"status: {manager.status()}\nDB: {manager.db_nodes()}",
        )
        time.sleep(2)  # jobs keep flowing on the upgraded cluster
    finally:
        producer.stop()
        observer.stop()

    # The first replaced node migrated the schema (the test-only migration) and took over.
    assert query(url, "SELECT schema_version, software_version FROM dsm_schema") == [
        (V2_SCHEMA, "0.2.0")
    ]
    assert query(url, "SELECT to_regclass('test_agent_groups') IS NOT NULL") == [(True,)]
    logs = kubelet.logs(manager.namespace, lines=10_000)
    assert logs.count(f"schema migrated to version {V2_SCHEMA}") == 1, "exactly one node migrated"
    assert "took over the cluster at version 0.2.0" in logs
    # One disruption at a time: every pod replaced exactly once, each deletion after the previous
    # replacement was Ready, and never two nodes starting at once. The order is the planner's and
    # not fixed here: outdated pods that are not Ready go first, then the lowest ordinal. Once the
    # first replacement takes over, the other two turn Offline (Upgrade Required) -- unready --
    # in whichever order the operator happens to observe (on a busy machine mgr-2 may be seen
    # unready before mgr-1). tests/operator/test_operator_planning.py fixes the rule itself.
    events = [e for e in kubelet.events_of(manager.namespace) if e.at >= upgrade_started]
    terminations = [e for e in events if e.kind == "terminating"]
    order = [e.pod for e in terminations]
    assert sorted(order) == ["mgr-0", "mgr-1", "mgr-2"], f"each pod replaced once: {order}"
    new_ready = [e for e in events if e.kind == "ready"]
    for prev, term in itertools.pairwise(terminations):
        replacement_ready = [e for e in new_ready if e.pod == prev.pod and e.at > prev.at]
        assert replacement_ready and replacement_ready[0].at < term.at, (
            f"{term.pod} deleted before the new {prev.pod} was Ready (order {order})"
        )
    assert concurrent_starts(kubelet.events_of(manager.namespace)) == []

    # While it happened, the old nodes were Offline (Upgrade Required): in the database, through
    # the upgraded node's API and in the resource's status. The last pod replaced stays so until
    # the second one's replacement is Ready; the second only until the operator's next pass
    # deletes it (about a second), so one view of it is enough.
    _, second, last = order
    seen = (
        f"order {order}\nDB {dict(observer.db)}\nAPI {dict(observer.api)}\n"
        f"resource {dict(observer.resource)}"
    )
    assert "upgrade_required" in observer.db[last], seen
    assert UPGRADE_REQUIRED in observer.api[last], seen
    assert UPGRADE_REQUIRED in observer.resource[last], seen
    assert (
        "upgrade_required" in observer.db[second]
        or UPGRADE_REQUIRED in observer.api[second]
        or UPGRADE_REQUIRED in observer.resource[second]
    ), seen
    assert manager.db_nodes() == {n: ("online", "0.2.0") for n in ("mgr-0", "mgr-1", "mgr-2")}
    assert_runtime(manager, kubelet)
    if manager.runtime == "image":  # every pod now runs the 0.2.0 image, which brought 0003
        images = {p["status"]["containerStatuses"][0]["image"] for p in manager.pods()}
        assert images == {"localhost/dsm-node-e2e:0.2.0"}, images
    ready = manager.condition("Ready")
    assert ready["status"] == "True", ready
    assert manager.condition("Degraded")["status"] == "False"
    assert "InProgress" in observer.rollout_states
    rollout = wait_until(
        lambda: (r := manager.status().get("rollout") or {}).get("state") == "Complete" and r,
        60,
        "rollout Complete in the status",
    )
    assert (rollout["fromVersion"], rollout["targetVersion"]) == ("0.1.0", "0.2.0"), rollout
    assert manager.status()["currentVersion"] == "0.2.0"

    # Jobs: none lost, none ran twice.
    wait_until(
        lambda: query(url, "SELECT count(*) FROM jobs WHERE type = 'record_effect'") == [(0,)],
        120,
        "all jobs done",
    )
    effects = dict(query(url, "SELECT job_id, count(*) FROM test_effects GROUP BY job_id"))
    assert len(producer.ids) > 100
    assert set(producer.ids) <= set(effects), "a job was lost"
    assert set(effects.values()) == {1}, "a job ran twice"
    assert kubelet.errors == []


def test_scale_down_decommissions_the_highest_ordinal(
    manager: Manager, kubelet: MiniKubelet
) -> None:
    launch(manager, kubelet, 3)
    scaled_at = time.time()
    manager.patch_spec(nodes=2)

    def decommissioned() -> Any:
        rows = query(manager.database_url, "SELECT name, status FROM nodes ORDER BY name")
        return rows if ("mgr-2", "decommissioned") in rows else None

    rows = wait_until(
        decommissioned,
        300,
        "mgr-2 decommissioned",
        lambda: f"status: {manager.status()}\nDB: {manager.db_nodes()}",
    )
    assert rows == [("mgr-0", "online"), ("mgr-1", "online"), ("mgr-2", "decommissioned")]
    wait_until(lambda: manager.all_online(2, "0.1.0"), 120, "2 nodes Online in the status")
    status = manager.status()
    assert [n["name"] for n in status["nodes"]] == ["mgr-0", "mgr-1"]
    assert "mgr-2" in (status.get("decommissioned") or [])
    assert sorted(p["metadata"]["name"] for p in manager.pods()) == ["mgr-0", "mgr-1"]

    events = [e for e in kubelet.events_of(manager.namespace) if e.at >= scaled_at]
    # only mgr-2 was stopped, gracefully (SIGTERM: the node marks itself Offline and exits 0)
    assert [(e.pod, e.kind) for e in events if e.kind in ("terminating", "killed")] == [
        ("mgr-2", "terminating")
    ]
    assert any(
        e.pod == "mgr-2" and e.kind == "exited" and e.detail.startswith("code 0 ") for e in events
    ), events
    assert kubelet.errors == []


def test_a_killed_node_is_restarted_in_its_pod_and_rejoins(
    manager: Manager, kubelet: MiniKubelet
) -> None:
    """Not in the issue's list, but it is what makes the kubelet trustworthy: SIGKILL a node
    process; the pod turns unready, the kubelet restarts the container (restartCount 1, last
    state exit 137), the node rejoins under its name and the status shows it Online again --
    without the operator deleting anything. The kubelet's watch streams are cut meanwhile and
    must resume."""
    launch(manager, kubelet, 2)
    killed_at = time.time()
    pid = kubelet.pid_of(manager.namespace, "mgr-1")
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    kubelet.api.close_watches()

    def restarted() -> Any:
        pod = manager.api.get(f"/api/v1/namespaces/{manager.namespace}/pods/mgr-1") or {}
        statuses = pod.get("status", {}).get("containerStatuses") or [{}]
        return statuses[0] if statuses[0].get("restartCount") == 1 else None

    container = wait_until(restarted, 120, "mgr-1 restarted in place")
    assert container["lastState"]["terminated"]["exitCode"] == 137
    # The new process Ready first: right after the restart the resource's status may still be
    # the one from before the kill (the operator has not yet seen the pod turn unready), so
    # all_online alone can hold while the new process is still starting.
    wait_until(
        lambda: (
            any(
                e.pod == "mgr-1" and e.kind == "ready" and e.at >= killed_at
                for e in kubelet.events_of(manager.namespace)
            )
            and kubelet.pid_of(manager.namespace, "mgr-1") not in (None, pid)
            and manager.all_online(2, "0.1.0")
        ),
        120,
        "mgr-1 Online again",
        lambda: f"status: {manager.status()}\nDB: {manager.db_nodes()}",
    )
    events = [(e.pod, e.kind) for e in kubelet.events_of(manager.namespace) if e.at >= killed_at]
    assert events == [
        ("mgr-1", "exited"),
        ("mgr-1", "unready"),
        ("mgr-1", "spawned"),
        ("mgr-1", "ready"),
    ]
    assert manager.db_nodes() == {"mgr-0": ("online", "0.1.0"), "mgr-1": ("online", "0.1.0")}
    assert kubelet.errors == []


def test_an_operator_restarted_mid_upgrade_resumes_it(
    manager: Manager, kubelet: MiniKubelet
) -> None:
    """The planner remembers nothing: a new operator process finds the pods still on the old
    revision and finishes the upgrade, one node at a time; while no operator runs, nothing moves."""
    launch(manager, kubelet, 3)
    started = time.time()
    manager.patch_spec(version="0.2.0")

    def first_replacement_ready() -> bool:
        events = [e for e in kubelet.events_of(manager.namespace) if e.at >= started]
        return any(e.pod == "mgr-0" and e.kind == "ready" for e in events)

    wait_until(first_replacement_ready, 300, "the new mgr-0 Ready")
    assert manager.operator is not None
    assert manager.operator.stop() == 0

    def terminations() -> list[str]:
        events = kubelet.events_of(manager.namespace)
        return [e.pod for e in events if e.at >= started and e.kind == "terminating"]

    # A deletion sent just before the stop is allowed: wait until the kubelet has seen every pod
    # the API server marks as deleting, so that only a later deletion counts below.
    deleting = {
        p["metadata"]["uid"] for p in manager.pods() if p["metadata"].get("deletionTimestamp")
    }
    wait_until(
        lambda: (
            deleting
            <= {e.uid for e in kubelet.events_of(manager.namespace) if e.kind == "terminating"}
        ),
        60,
        f"the kubelet terminating the pods deleted before the stop ({len(deleting)})",
    )
    before = terminations()
    time.sleep(5)
    assert terminations() == before, "a pod was deleted while no operator ran"

    manager.operator = OperatorProcess(
        manager.operator.kubeconfig,
        manager.namespace,
        manager.operator.log_path.with_name("operator-2.log"),
    ).start()
    wait_until(
        lambda: manager.all_online(3, "0.2.0"),
        600,
        "3 nodes Online at 0.2.0 after the restart",
        lambda: f"status: {manager.status()}\nDB: {manager.db_nodes()}",
    )
    # mgr-0 first; then the other two in whichever order the operator saw them turn unready
    # (see test_upgrade_takes_over_one_node_at_a_time_and_loses_no_job).
    events = [e for e in kubelet.events_of(manager.namespace) if e.at >= started]
    order = [e.pod for e in events if e.kind == "terminating"]
    assert order[0] == "mgr-0" and sorted(order) == ["mgr-0", "mgr-1", "mgr-2"], order
    assert concurrent_starts(kubelet.events_of(manager.namespace)) == []
    assert query(manager.database_url, "SELECT schema_version FROM dsm_schema") == [(V2_SCHEMA,)]
    assert kubelet.errors == []


def test_scaling_back_up_after_a_scale_down_brings_the_node_back(
    manager: Manager, kubelet: MiniKubelet
) -> None:
    """3 -> 2 decommissions mgr-2; 2 -> 3 then makes a new pod mgr-2 whose node must join (the
    bug this found: a decommissioned name could never rejoin, so the new pod restarted forever)."""
    launch(manager, kubelet, 3)
    manager.patch_spec(nodes=2)
    wait_until(
        lambda: (
            ("mgr-2", "decommissioned", "0.1.0")
            in [(n, s, v) for n, (s, v) in manager.db_nodes().items()]
        ),
        300,
        "mgr-2 decommissioned",
    )
    wait_until(lambda: manager.all_online(2, "0.1.0"), 120, "2 nodes Online")
    manager.patch_spec(nodes=3)

    def online_or_refused() -> str | None:
        if manager.all_online(3, "0.1.0"):
            return "online"
        if "was decommissioned and cannot rejoin" in kubelet.logs(manager.namespace):
            return "refused"
        return None

    outcome = wait_until(online_or_refused, 300, "mgr-2 back or refused")
    assert outcome == "online", (
        "the new mgr-2 is refused by the cluster (decommissioned name) and restarts forever:\n"
        + kubelet.logs(manager.namespace, lines=3)
    )
