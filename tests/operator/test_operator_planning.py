"""The launch, scale and rollout planner: single decisions, then whole runs against a simulated
StatefulSet controller (Parallel pod management, OnDelete updates) and simulated nodes."""

from __future__ import annotations

import dataclasses
import datetime
import itertools
from collections.abc import Callable

import pytest

from dsm_operator.reconcile import planning
from dsm_operator.reconcile.planning import Kind, Launch, PodState, Reason, SetState, World

T0 = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
TIMEOUT = datetime.timedelta(seconds=600)


def pod(
    ordinal: int,
    revision: str = "r1",
    ready: bool = True,
    *,
    terminating: bool = False,
    age: float = 10.0,
) -> PodState:
    return PodState(
        name=f"m-{ordinal}",
        ordinal=ordinal,
        revision=revision,
        ready=ready,
        terminating=terminating,
        created_at=T0 - datetime.timedelta(seconds=age),
        ip=f"127.1.0.{ordinal + 1}",
    )


def world(
    desired: int,
    replicas: int | None,
    pods: list[PodState],
    *,
    revision: str = "r1",
    paused: bool = False,
    observed: bool = True,
    statuses: dict[str, str] | None = None,
    launch: tuple[str, float] | None = None,
) -> World:
    """``launch``: (pod, seconds ago) of the launch the status remembers."""
    return World(
        desired=desired,
        paused=paused,
        ready_timeout=TIMEOUT,
        now=T0,
        statefulset=None if replicas is None else SetState(replicas, revision, observed),
        pods=pods,
        node_statuses=statuses or {},
        launch=None
        if launch is None
        else Launch(launch[0], T0 - datetime.timedelta(seconds=launch[1])),
    )


# --- single decisions -------------------------------------------------------------------------


def test_no_statefulset_yet_waits_for_creation() -> None:
    result = planning.plan(world(3, None, []), "m")
    assert result.action.kind is Kind.WAIT
    assert result.action.reason is Reason.CREATING


@pytest.mark.parametrize(("desired", "expected"), [(1, 1), (5, 1), (32, 1)])
def test_a_new_statefulset_starts_with_one_pod(desired: int, expected: int) -> None:
    assert planning.initial_replicas(desired) == expected


def test_steady_state_is_idle() -> None:
    result = planning.plan(world(3, 3, [pod(0), pod(1), pod(2)]), "m")
    assert result.action.kind is Kind.IDLE
    assert not result.rolling
    assert result.pending == ()


def test_paused_takes_no_action_even_with_work_left() -> None:
    result = planning.plan(world(5, 1, [pod(0)], paused=True), "m")
    assert result.action.kind is Kind.WAIT
    assert result.action.reason is Reason.PAUSED


def test_paused_does_not_decommission() -> None:
    result = planning.plan(world(1, 1, [pod(0)], paused=True, statuses={"m-1": "Offline"}), "m")
    assert result.decommission == ()


def test_waits_for_the_controller_to_observe_the_template() -> None:
    result = planning.plan(world(3, 3, [pod(0), pod(1), pod(2)], observed=False), "m")
    assert result.action.reason is Reason.STATEFULSET_PENDING


def test_scale_up_one_step_when_all_ready() -> None:
    result = planning.plan(world(5, 1, [pod(0)]), "m")
    assert result.action.kind is Kind.SCALE_UP
    assert result.action.replicas == 2
    assert result.action.pod == "m-1"


def test_scale_up_waits_for_the_newest_pod_to_be_ready() -> None:
    result = planning.plan(world(5, 2, [pod(0), pod(1, ready=False)], launch=("m-1", 5)), "m")
    assert result.action.kind is Kind.WAIT
    assert result.action.reason is Reason.NODE_STARTING
    assert result.action.pod == "m-1"
    assert result.launch == Launch("m-1", T0 - datetime.timedelta(seconds=5))


def test_scale_up_remembers_the_launch() -> None:
    result = planning.plan(world(5, 1, [pod(0)]), "m")
    assert result.action.kind is Kind.SCALE_UP
    assert result.launch == Launch("m-1", T0)


def test_a_launch_ends_when_its_node_is_ready() -> None:
    result = planning.plan(world(2, 2, [pod(0), pod(1)], launch=("m-1", 50)), "m")
    assert result.action.kind is Kind.IDLE
    assert result.launch is None


def test_a_launch_ends_when_its_node_is_scaled_away() -> None:
    pods = [pod(0), pod(1, ready=False)]
    result = planning.plan(world(1, 2, pods, launch=("m-1", 50)), "m")
    assert result.action.kind is Kind.SCALE_DOWN
    scaled = planning.plan(world(1, 1, [pod(0)], launch=("m-1", 60)), "m")
    assert scaled.launch is None


def test_a_long_running_node_turning_unready_is_not_a_stalled_launch() -> None:
    """No launch in progress: the node was Ready once and is waited for, never LaunchStalled."""
    result = planning.plan(world(3, 3, [pod(0), pod(1, ready=False, age=99999), pod(2)]), "m")
    assert result.action.kind is Kind.WAIT
    assert result.action.reason is Reason.NODE_UNREADY
    assert result.launch is None


def test_launch_stall_is_measured_from_the_launch_not_the_pod() -> None:
    """The pod of a launch begun 10 s ago may be much older (re-created, or kept across an
    operator restart): only the launch's own age counts."""
    pods = [pod(0), pod(1, ready=False, age=5000)]
    result = planning.plan(world(5, 2, pods, launch=("m-1", 10)), "m")
    assert result.action.kind is Kind.WAIT
    assert result.action.reason is Reason.NODE_STARTING


def test_scale_up_waits_for_a_missing_pod() -> None:
    result = planning.plan(world(5, 2, [pod(0)]), "m")
    assert result.action.reason is Reason.POD_PENDING
    assert "m-1" in result.action.message


def test_scale_up_waits_for_any_unready_pod_not_only_the_newest() -> None:
    result = planning.plan(world(5, 3, [pod(0, ready=False), pod(1), pod(2)]), "m")
    assert result.action.kind is Kind.WAIT
    assert result.action.pod == "m-0"


def test_launch_stalls_after_the_timeout() -> None:
    result = planning.plan(world(5, 2, [pod(0), pod(1, ready=False)], launch=("m-1", 601)), "m")
    assert result.action.kind is Kind.STALLED
    assert result.action.reason is Reason.LAUNCH_STALLED
    assert result.action.pod == "m-1"


def test_launch_just_under_the_timeout_still_waits() -> None:
    result = planning.plan(world(5, 2, [pod(0), pod(1, ready=False)], launch=("m-1", 599)), "m")
    assert result.action.kind is Kind.WAIT


def test_a_launch_whose_pod_never_appears_stalls() -> None:
    result = planning.plan(world(5, 2, [pod(0)], launch=("m-1", 601)), "m")
    assert result.action.kind is Kind.STALLED
    assert result.action.reason is Reason.LAUNCH_STALLED
    assert "not even created" in result.action.message


def test_scale_down_one_step_highest_first() -> None:
    result = planning.plan(world(1, 3, [pod(0), pod(1), pod(2)]), "m")
    assert result.action.kind is Kind.SCALE_DOWN
    assert result.action.replicas == 2
    assert result.action.pod == "m-2"


def test_scale_down_waits_for_the_terminating_pod() -> None:
    result = planning.plan(world(1, 2, [pod(0), pod(1), pod(2, terminating=True)]), "m")
    assert result.action.reason is Reason.POD_TERMINATING


def test_scale_down_removes_an_unready_highest_node() -> None:
    """The node removed is the one out of service: nothing else is taken down."""
    result = planning.plan(world(2, 3, [pod(0), pod(1), pod(2, ready=False, age=9999)]), "m")
    assert result.action.kind is Kind.SCALE_DOWN


def test_scale_down_waits_while_another_node_is_unready() -> None:
    result = planning.plan(world(2, 3, [pod(0, ready=False), pod(1), pod(2)]), "m")
    assert result.action.kind is Kind.WAIT
    assert result.action.reason is Reason.SCALE_DOWN_WAITING
    assert result.action.pod == "m-0"


def test_scale_down_during_a_stuck_rollout_waits_and_stays_degraded() -> None:
    """The audited case: m-0 re-created on a broken version is Pending; nodes 3 -> 2 must not
    remove the healthy m-2 (two nodes out of service)."""
    pods = [pod(0, "r2", ready=False, age=700), pod(1, age=5000), pod(2, age=5000)]
    stuck = planning.plan(world(2, 3, pods, revision="r2", launch=("m-0", 700)), "m")
    assert stuck.action.kind is Kind.STALLED
    assert stuck.action.reason is Reason.ROLLOUT_STALLED
    assert stuck.action.pod == "m-0"
    early = planning.plan(world(2, 3, pods, revision="r2", launch=("m-0", 30)), "m")
    assert early.action.kind is Kind.WAIT
    assert early.action.reason is Reason.NODE_STARTING
    assert "removing node m-2 waits" in early.action.message


def test_after_a_revert_the_broken_pod_is_replaced_before_the_scale_down() -> None:
    """The broken m-0 is the outdated pod now: the rollout replaces it, the scale-down waits."""
    pods = [pod(0, "r2", ready=False, age=700), pod(1, age=5000), pod(2, age=5000)]
    result = planning.plan(world(2, 3, pods, revision="r1", launch=("m-0", 700)), "m")
    assert result.action.kind is Kind.REPLACE_POD
    assert result.action.pod == "m-0"


def test_scale_down_with_an_unready_node_and_no_rollout_waits() -> None:
    pods = [pod(0, ready=False, age=5000), pod(1), pod(2)]
    result = planning.plan(world(2, 3, pods), "m")
    assert result.action.kind is Kind.WAIT
    assert result.action.reason is Reason.SCALE_DOWN_WAITING
    stalled = planning.plan(world(2, 3, pods, launch=("m-0", 700)), "m")
    assert stalled.action.kind is Kind.STALLED


def test_scale_down_during_a_rollout_may_remove_an_outdated_unready_node() -> None:
    """Outdated nodes are expected to be unready during an upgrade; removing one is fine."""
    pods = [pod(0, "r2"), pod(1, "r1", ready=False), pod(2, "r1", ready=False)]
    result = planning.plan(world(2, 3, pods, revision="r2"), "m")
    assert result.action.kind is Kind.SCALE_DOWN


def test_scale_down_goes_before_a_rollout() -> None:
    result = planning.plan(world(2, 3, [pod(0), pod(1), pod(2)], revision="r2"), "m")
    assert result.action.kind is Kind.SCALE_DOWN
    assert result.rolling


def test_rollout_replaces_lowest_ordinal_first() -> None:
    result = planning.plan(world(3, 3, [pod(0), pod(1), pod(2)], revision="r2"), "m")
    assert result.action.kind is Kind.REPLACE_POD
    assert result.action.pod == "m-0"
    assert result.pending == ("m-0", "m-1", "m-2")


def test_rollout_replaces_unready_outdated_pods_first() -> None:
    pods = [pod(0), pod(1, ready=False), pod(2)]
    result = planning.plan(world(3, 3, pods, revision="r2"), "m")
    assert result.action.pod == "m-1"
    assert result.pending == ("m-1", "m-0", "m-2")


def test_rollout_is_not_blocked_by_old_nodes_requiring_upgrade() -> None:
    """The case a native rolling update stalls on: old nodes are unready after the first."""
    pods = [pod(0, "r2"), pod(1, "r1", ready=False), pod(2, "r1", ready=False)]
    result = planning.plan(world(3, 3, pods, revision="r2"), "m")
    assert result.action.kind is Kind.REPLACE_POD
    assert result.action.pod == "m-1"


def test_rollout_waits_for_the_replaced_pod_to_be_ready() -> None:
    pods = [pod(0, "r2", ready=False), pod(1), pod(2)]
    result = planning.plan(world(3, 3, pods, revision="r2"), "m")
    assert result.action.kind is Kind.WAIT
    assert result.action.reason is Reason.NODE_STARTING
    assert result.rolling


def test_rollout_stalls_when_the_new_version_never_gets_ready() -> None:
    pods = [
        pod(0, "r2", ready=False, age=601),
        pod(1, ready=False, age=5000),
        pod(2, ready=False, age=5000),
    ]
    result = planning.plan(world(3, 3, pods, revision="r2", launch=("m-0", 601)), "m")
    assert result.action.kind is Kind.STALLED
    assert result.action.reason is Reason.ROLLOUT_STALLED
    assert result.action.pod == "m-0"
    assert "2 pod(s) left" in result.action.message


def test_rollout_stall_without_a_remembered_launch_falls_back_to_creation() -> None:
    pods = [pod(0, "r2", ready=False, age=601), pod(1, age=5000), pod(2, age=5000)]
    result = planning.plan(world(3, 3, pods, revision="r2"), "m")
    assert result.action.kind is Kind.STALLED


def test_replacing_a_pod_remembers_the_launch() -> None:
    result = planning.plan(world(3, 3, [pod(0), pod(1), pod(2)], revision="r2"), "m")
    assert result.action.kind is Kind.REPLACE_POD
    assert result.launch == Launch("m-0", T0)


def test_a_replacement_ready_before_turning_unready_waits_without_stalling() -> None:
    """m-0 was replaced and Ready; later it turns unready while m-1 is being launched."""
    pods = [pod(0, "r2", ready=False, age=5000), pod(1, "r2", age=1), pod(2, "r1", age=9000)]
    result = planning.plan(world(3, 3, pods, revision="r2", launch=("m-1", 700)), "m")
    assert result.action.kind is Kind.WAIT
    assert result.action.pod == "m-0"


def test_rollout_waits_for_the_deleted_pod_to_come_back() -> None:
    result = planning.plan(world(3, 3, [pod(1), pod(2)], revision="r2"), "m")
    assert result.action.reason is Reason.POD_PENDING


def test_reverting_a_stalled_rollout_replaces_the_broken_pod() -> None:
    """After the user reverts spec.version the broken new pod is the outdated one."""
    pods = [pod(0, "r2", ready=False, age=900), pod(1), pod(2)]
    result = planning.plan(world(3, 3, pods, revision="r1"), "m")
    assert result.action.kind is Kind.REPLACE_POD
    assert result.action.pod == "m-0"


def test_updated_pods_older_than_the_outdated_ones_do_not_gate() -> None:
    """After a revert, old nodes went unready because of the newer (broken, now outdated) pod."""
    pods = [pod(0, "r2", ready=False, age=100), pod(1, ready=False, age=5000), pod(2, age=5000)]
    result = planning.plan(world(3, 3, pods, revision="r1"), "m")
    assert result.action.kind is Kind.REPLACE_POD
    assert result.action.pod == "m-0"


def test_updated_pod_created_with_the_outdated_ones_still_gates() -> None:
    pods = [pod(0, "r2", ready=False, age=50), pod(1, age=50), pod(2, age=50)]
    result = planning.plan(world(3, 3, pods, revision="r2"), "m")
    assert result.action.kind is Kind.WAIT


def test_rollout_completes_before_scale_up() -> None:
    pods = [pod(0, "r2"), pod(1, "r1")]
    result = planning.plan(world(4, 2, pods, revision="r2"), "m")
    assert result.action.kind is Kind.REPLACE_POD
    assert result.action.pod == "m-1"


def test_terminating_pods_are_not_pending_replacement() -> None:
    pods = [pod(0, "r1", terminating=True), pod(1), pod(2)]
    result = planning.plan(world(3, 3, pods, revision="r2"), "m")
    assert result.pending == ("m-1", "m-2")
    assert result.action.reason is Reason.POD_TERMINATING


@pytest.mark.parametrize(
    ("statuses", "expected"),
    [
        ({"m-2": "Offline"}, ("m-2",)),
        ({"m-2": "Offline (Upgrade Required)"}, ("m-2",)),
        ({"m-2": "Online"}, ()),
        ({"m-2": "Decommissioned"}, ()),
        ({"m-1": "Offline"}, ()),  # still wanted: replicas is 2
        ({"other-5": "Offline"}, ()),  # not ours
        ({"m-02": "Offline"}, ()),  # not a StatefulSet pod name
        ({"m-3": "Offline", "m-2": "Offline"}, ("m-2", "m-3")),
    ],
)
def test_decommission_candidates(statuses: dict[str, str], expected: tuple[str, ...]) -> None:
    result = planning.plan(world(2, 2, [pod(0), pod(1)], statuses=statuses), "m")
    assert result.decommission == expected


def test_no_decommission_while_the_pod_still_exists() -> None:
    pods = [pod(0), pod(1), pod(2, terminating=True)]
    result = planning.plan(world(2, 2, pods, statuses={"m-2": "Offline"}), "m")
    assert result.decommission == ()


# --- whole runs against a simulated controller ------------------------------------------------


@dataclasses.dataclass
class SimPod:
    ordinal: int
    revision: str
    version: str
    started: int
    deleting: bool = False


@dataclasses.dataclass
class Sim:
    """A StatefulSet controller (Parallel, OnDelete), kubelet readiness and node upgrade rules.

    A pod is Ready ``boot`` ticks after creation if its version is good, and only while no node
    with a newer version is running (the others are then ``Offline (Upgrade Required)``).
    """

    replicas: int
    revision: str
    versions: dict[str, str]
    bad: frozenset[str] = frozenset()
    boot: int = 2
    tick: int = 0
    pods: dict[int, SimPod] = dataclasses.field(default_factory=dict)
    launches: list[int] = dataclasses.field(default_factory=list)
    deletions: list[str] = dataclasses.field(default_factory=list)
    max_starting: int = 0
    launch: Launch | None = None
    """What the status remembers between passes."""

    def newest(self) -> str:
        # A bad version never starts (like a pod that cannot be scheduled): it takes no node
        # out of service by itself.
        running = [
            p.version for p in self.pods.values() if not p.deleting and p.version not in self.bad
        ]
        return max(running, key=lambda v: tuple(int(x) for x in v.split("."))) if running else ""

    def ready(self, p: SimPod) -> bool:
        return (
            not p.deleting
            and p.version not in self.bad
            and self.tick - p.started >= self.boot
            and p.version == self.newest()
        )

    def step_controller(self) -> None:
        for o in [o for o, p in self.pods.items() if p.deleting]:
            del self.pods[o]
        for o in [o for o in self.pods if o >= self.replicas]:
            self.pods[o].deleting = True
        for o in range(self.replicas):
            if o not in self.pods:
                version = self.versions[self.revision]
                self.pods[o] = SimPod(o, self.revision, version, self.tick)
                self.launches.append(o)
        starting = sum(
            1
            for p in self.pods.values()
            if not p.deleting and not self.ready(p) and p.version == self.newest()
        )
        self.max_starting = max(self.max_starting, starting)

    def observe(self, desired: int, seconds_per_tick: float = 10.0) -> World:
        now = T0 + datetime.timedelta(seconds=self.tick * seconds_per_tick)
        pods = [
            PodState(
                name=f"m-{p.ordinal}",
                ordinal=p.ordinal,
                revision=p.revision,
                ready=self.ready(p),
                terminating=p.deleting,
                created_at=T0 + datetime.timedelta(seconds=p.started * seconds_per_tick),
                version=p.version,
            )
            for p in sorted(self.pods.values(), key=lambda p: p.ordinal)
        ]
        return World(
            desired,
            False,
            TIMEOUT,
            now,
            SetState(self.replicas, self.revision),
            pods,
            launch=self.launch,
        )

    def apply(self, action: planning.Action) -> None:
        if action.kind in (Kind.SCALE_UP, Kind.SCALE_DOWN):
            assert action.replicas is not None
            assert abs(action.replicas - self.replicas) == 1
            self.replicas = action.replicas
        elif action.kind is Kind.REPLACE_POD:
            assert action.pod is not None
            self.pods[int(action.pod.rsplit("-", 1)[1])].deleting = True
            self.deletions.append(action.pod)

    def run(
        self, desired: int, until: Callable[[planning.Plan], bool], limit: int = 400
    ) -> planning.Plan:
        for _ in range(limit):
            self.tick += 1
            self.step_controller()
            result = planning.plan(self.observe(desired), "m")
            self.launch = result.launch
            if until(result):
                return result
            self.apply(result.action)
        raise AssertionError(f"no result after {limit} ticks")


def idle(result: planning.Plan) -> bool:
    return result.action.kind is Kind.IDLE


def test_sim_scale_from_one_to_five_launches_one_at_a_time() -> None:
    sim = Sim(replicas=1, revision="r1", versions={"r1": "1.0.0"})
    sim.run(5, idle)
    assert sim.launches == [0, 1, 2, 3, 4]
    assert sim.max_starting == 1
    assert sim.replicas == 5


def test_sim_scale_down_five_to_two_one_at_a_time() -> None:
    sim = Sim(replicas=1, revision="r1", versions={"r1": "1.0.0"})
    sim.run(5, idle)
    seen: list[int] = []

    def record(result: planning.Plan) -> bool:
        seen.append(sim.replicas)
        return idle(result)

    sim.run(2, record)
    assert sim.replicas == 2
    # replicas went 5, 4, 3, 2: never two at once
    drops = [a - b for a, b in itertools.pairwise(seen) if a != b]
    assert drops and all(d == 1 for d in drops)


def test_sim_upgrade_completes_without_stalling() -> None:
    sim = Sim(replicas=1, revision="r1", versions={"r1": "1.0.0", "r2": "1.1.0"})
    sim.run(3, idle)
    sim.revision = "r2"
    sim.run(3, idle)
    assert sim.deletions == ["m-0", "m-1", "m-2"]
    assert {p.version for p in sim.pods.values()} == {"1.1.0"}
    assert sim.max_starting == 1


def test_sim_operator_restart_mid_upgrade_resumes() -> None:
    """The planner keeps no memory: a fresh plan on the half-done world continues the work."""
    sim = Sim(replicas=1, revision="r1", versions={"r1": "1.0.0", "r2": "1.1.0"})
    sim.run(4, idle)
    sim.revision = "r2"
    sim.run(4, lambda r: len(sim.deletions) == 2)
    # "restart": nothing carried over but the simulated cluster
    sim.run(4, idle)
    assert sim.deletions == ["m-0", "m-1", "m-2", "m-3"]


def test_sim_bad_version_stops_the_rollout_after_one_pod() -> None:
    sim = Sim(
        replicas=1,
        revision="r1",
        versions={"r1": "1.0.0", "r2": "1.1.0"},
        bad=frozenset({"1.1.0"}),
    )
    sim.run(3, idle)
    sim.revision = "r2"
    result = sim.run(3, lambda r: r.action.kind is Kind.STALLED)
    assert result.action.reason is Reason.ROLLOUT_STALLED
    assert sim.deletions == ["m-0"]
    # and it stays stopped
    for _ in range(5):
        sim.tick += 1
        sim.step_controller()
        again = planning.plan(sim.observe(3), "m")
        sim.launch = again.launch
        assert again.action.kind is Kind.STALLED
    assert sim.deletions == ["m-0"]


def test_sim_revert_after_a_bad_version_recovers() -> None:
    sim = Sim(
        replicas=1,
        revision="r1",
        versions={"r1": "1.0.0", "r2": "1.1.0"},
        bad=frozenset({"1.1.0"}),
    )
    sim.run(3, idle)
    sim.revision = "r2"
    sim.run(3, lambda r: r.action.kind is Kind.STALLED)
    sim.revision = "r1"
    sim.run(3, idle)
    assert {p.version for p in sim.pods.values()} == {"1.0.0"}
    assert sim.deletions == ["m-0", "m-0"]


def test_sim_scale_down_during_a_stuck_rollout_never_takes_a_second_node_out() -> None:
    sim = Sim(
        replicas=1,
        revision="r1",
        versions={"r1": "1.0.0", "r2": "1.1.0"},
        bad=frozenset({"1.1.0"}),
    )
    sim.run(3, idle)
    sim.revision = "r2"
    sim.run(3, lambda r: r.action.kind is Kind.STALLED)
    for _ in range(10):  # nodes 3 -> 2 while m-0 is broken: nothing moves
        sim.tick += 1
        sim.step_controller()
        result = planning.plan(sim.observe(2), "m")
        sim.launch = result.launch
        assert result.action.kind is Kind.STALLED
        sim.apply(result.action)
    assert sim.replicas == 3
    sim.revision = "r1"  # revert: the broken pod is replaced, then the scale-down proceeds
    sim.run(2, idle)
    assert sim.replicas == 2
    assert sim.deletions == ["m-0", "m-0"]


def test_sim_scale_up_during_upgrade_waits_for_the_upgrade() -> None:
    sim = Sim(replicas=1, revision="r1", versions={"r1": "1.0.0", "r2": "1.1.0"})
    sim.run(2, idle)
    sim.revision = "r2"
    sim.run(4, idle)
    assert sim.deletions == ["m-0", "m-1"]
    assert sim.launches[-2:] == [2, 3]
    assert sim.max_starting == 1
