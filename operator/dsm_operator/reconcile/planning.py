"""The launch, scale and rollout planner: given what is observed, the one next step.

Pure and level-based: ``plan`` looks only at the world as it is now (the StatefulSet, its pods,
what the managers report) and returns a single action. Nothing depends on remembering what the
previous pass did, so an operator restart in the middle of an upgrade simply resumes: the pods
still on the old revision are the work left. Every action is safe to repeat.

The rules, in order (first match wins):

1. Nothing to do while paused, while the StatefulSet controller has not seen the latest spec, or
   while a pod is terminating or missing (the controller is still acting on the last step).
2. Scale down before anything else, one ordinal at a time, highest first (the StatefulSet
   controller removes the highest ordinal when ``replicas`` drops by one) -- behind the same
   readiness gate as every other action: the node removed must be the only one out of
   service, or out of service itself. Otherwise the scale-down waits, and the rollout (which
   may be what brings the unready node back) goes on. A scale-down during a stuck rollout
   therefore waits: the StatefulSet can only remove the highest ordinal, which would take a
   healthy node out while the broken one stays. Reverting or fixing the version replaces the
   broken pod first; then the scale-down proceeds.
3. Roll out: while a pod runs an outdated revision, replace one pod at a time. The gate is the
   *updated* pods only (those created during the rollout): they must all be Ready before the
   next deletion. Outdated pods are
   expected to be unready during an upgrade (``Offline (Upgrade Required)``) and must not block
   it -- that is where a native rolling update stalls. Outdated pods that are not Ready go first
   (they serve nothing, and kubernetes#67250 says nobody else will replace them), then the
   lowest ordinal.
4. Scale up, one pod at a time, only when every pod is Ready: never two nodes starting together.
5. A node the operator *launched* (scale-up, the first pod, a rollout's replacement) that is
   not Ready ``spec.nodeReadyTimeoutSeconds`` after the launch began stalls the work: no further
   pod is touched, and the result says so (Degraded). The clock runs from the launch, which the
   status remembers (:class:`Launch`), not from the pod's creation: a long-running node that
   turns unready is waited for, never reported as a stalled launch.

Decommissioning is planned beside the pod action (it touches no pod): nodes of this resource
whose ordinal is no longer wanted, whose pod is gone, and that the managers report offline.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
from collections.abc import Mapping, Sequence

from dsm_operator.reconcile import names


@dataclasses.dataclass(frozen=True)
class PodState:
    """One node pod as observed."""

    name: str
    ordinal: int
    revision: str | None
    ready: bool
    terminating: bool = False
    created_at: datetime.datetime | None = None
    ip: str | None = None
    version: str | None = None


@dataclasses.dataclass(frozen=True)
class SetState:
    """The StatefulSet as observed."""

    replicas: int
    update_revision: str | None
    observed: bool = True
    """Whether ``status.observedGeneration`` caught up with ``metadata.generation``."""


@dataclasses.dataclass(frozen=True)
class Launch:
    """A node the operator started, and when: the stall clock of that node runs from here."""

    pod: str
    started_at: datetime.datetime


@dataclasses.dataclass(frozen=True)
class World:
    desired: int
    paused: bool
    ready_timeout: datetime.timedelta
    now: datetime.datetime
    statefulset: SetState | None
    pods: Sequence[PodState] = ()
    node_statuses: Mapping[str, str] = dataclasses.field(default_factory=dict)
    """Status of each node as the managers report it; empty when no manager answered."""
    launch: Launch | None = None
    """The launch in progress, as the status remembers it."""


class Kind(enum.StrEnum):
    WAIT = "Wait"
    IDLE = "Idle"
    SCALE_UP = "ScaleUp"
    SCALE_DOWN = "ScaleDown"
    REPLACE_POD = "ReplacePod"
    STALLED = "Stalled"


class Reason(enum.StrEnum):
    """Why the planner chose its action; reused as condition reasons (one CamelCase word)."""

    PAUSED = "Paused"
    CREATING = "Creating"
    STATEFULSET_PENDING = "StatefulSetPending"
    POD_TERMINATING = "PodTerminating"
    POD_PENDING = "PodPending"
    NODE_STARTING = "NodeStarting"
    NODE_UNREADY = "NodeUnready"
    SCALING_UP = "ScalingUp"
    SCALING_DOWN = "ScalingDown"
    SCALE_DOWN_WAITING = "ScaleDownWaiting"
    ROLLING_OUT = "RollingOut"
    LAUNCH_STALLED = "LaunchStalled"
    ROLLOUT_STALLED = "RolloutStalled"
    RECONCILED = "Reconciled"


@dataclasses.dataclass(frozen=True)
class Action:
    kind: Kind
    reason: Reason
    message: str
    replicas: int | None = None
    """The StatefulSet replica count to set (SCALE_UP, SCALE_DOWN)."""
    pod: str | None = None
    """The pod to delete (REPLACE_POD) or the pod that stalls (STALLED)."""


@dataclasses.dataclass(frozen=True)
class Plan:
    action: Action
    decommission: tuple[str, ...] = ()
    rolling: bool = False
    """Whether pods on an outdated revision remain (a rollout is under way)."""
    pending: tuple[str, ...] = ()
    """Outdated pods in the order they will be replaced."""
    launch: Launch | None = None
    """The launch in progress after this step (to remember in the status)."""


def initial_replicas(desired: int) -> int:
    """A new StatefulSet starts with one pod whatever ``spec.nodes`` says."""
    return min(desired, 1)


def not_carried_out(plan: Plan, world: World) -> Plan:
    """``plan`` after its action turned out to be moot (the pod to delete was already gone or
    replaced): no launch began, the one in progress stays."""
    return dataclasses.replace(plan, launch=world.launch)


def initial_launch(cr_name: str, now: datetime.datetime) -> Launch:
    """The launch of the first node, begun when the operator creates the StatefulSet."""
    return Launch(names.pod_name(cr_name, 0), now)


def replacement_order(pods: Sequence[PodState], update_revision: str | None) -> list[PodState]:
    """Outdated pods, unready ones first, then by ordinal (lowest first).

    Lowest-first makes the upgraded nodes the low ordinals, so a scale-down in the middle of an
    upgrade removes old-version nodes (which are offline anyway) and keeps the new ones.
    """
    outdated = [p for p in pods if not p.terminating and p.revision != update_revision]
    return sorted(outdated, key=lambda p: (p.ready, p.ordinal))


def _launch_stalled(pod_name: str, world: World) -> bool:
    """Whether the launch of ``pod_name`` (not Ready, or not even there) has run out of time."""
    launch = world.launch
    if launch is None or launch.pod != pod_name:
        return False
    return world.now - launch.started_at > world.ready_timeout


def _replacement_stalled(pod: PodState, world: World) -> bool:
    """A rollout's replacement that has not become Ready in time. Without a remembered launch
    (a status written by an older operator, or lost with a crash between the deletion and the
    status write) the replacement's creation stands in for it: it was created because the
    operator deleted its predecessor."""
    if pod.ready:
        return False
    if world.launch is not None:
        return _launch_stalled(pod.name, world)
    return pod.created_at is not None and world.now - pod.created_at > world.ready_timeout


def _next_launch(world: World, action: Action, cr_name: str) -> Launch | None:
    """The launch to remember after ``action``: a new one for a scale-up or a replacement; the
    current one until its node is Ready or scaled away."""
    if action.kind in (Kind.SCALE_UP, Kind.REPLACE_POD) and action.pod is not None:
        return Launch(action.pod, world.now)
    launch = world.launch
    sts = world.statefulset
    if launch is None or sts is None:
        return launch
    ordinal = names.ordinal_of(cr_name, launch.pod)
    if ordinal is not None and ordinal >= sts.replicas:
        return None
    if any(p.name == launch.pod and p.ready and not p.terminating for p in world.pods):
        return None
    return launch


def _launched_by_rollout(pod: PodState, live: Sequence[PodState], revision: str | None) -> bool:
    """Whether an updated pod was (re)created during the rollout, so that it gates it.

    An updated pod older than every outdated pod was not launched by this rollout: it is a node
    that turned unready *because of* a newer outdated pod -- the state after reverting a bad
    version, where the broken pod is the outdated one. Such pods must not block replacing it.
    """
    newest_outdated = max(
        (p.created_at for p in live if p.revision != revision and p.created_at is not None),
        default=None,
    )
    if newest_outdated is None or pod.created_at is None:
        return True
    return pod.created_at >= newest_outdated


def decommission_candidates(world: World, cr_name: str) -> tuple[str, ...]:
    """Nodes of this resource that were scaled away and are now offline."""
    if world.statefulset is None:
        return ()
    existing = {p.name for p in world.pods}
    keep_below = world.statefulset.replicas
    result = []
    for node, status in sorted(world.node_statuses.items()):
        ordinal = names.ordinal_of(cr_name, node)
        if ordinal is None or ordinal < keep_below or node in existing:
            continue
        if status in names.OFFLINE_STATUSES:
            result.append(node)
    return tuple(result)


def _gating_unready(live: Sequence[PodState], update_revision: str | None) -> list[PodState]:
    """Unready pods that hold back the next action, lowest ordinal first.

    Outside a rollout: every unready pod. During one: only the updated pods the rollout launched
    -- outdated nodes are expected to be unready (``Offline (Upgrade Required)``) and are the
    work left, not a reason to stop.
    """
    rolling = any(p.revision != update_revision for p in live)
    return sorted(
        (
            p
            for p in live
            if not p.ready
            and (
                not rolling
                or (
                    p.revision == update_revision and _launched_by_rollout(p, live, update_revision)
                )
            )
        ),
        key=lambda p: p.ordinal,
    )


def plan(world: World, cr_name: str) -> Plan:
    """The one next step towards the desired state."""
    sts = world.statefulset
    decommission = () if world.paused else decommission_candidates(world, cr_name)
    if sts is None:
        return Plan(
            Action(Kind.WAIT, Reason.CREATING, "creating the StatefulSet"), launch=world.launch
        )
    pending = tuple(p.name for p in replacement_order(world.pods, sts.update_revision))
    rolling = bool(pending) and sts.update_revision is not None

    def result(action: Action) -> Plan:
        return Plan(
            action,
            decommission=decommission,
            rolling=rolling,
            pending=pending,
            launch=_next_launch(world, action, cr_name),
        )

    def stalled(pod: str, what: str) -> Plan:
        reason = Reason.ROLLOUT_STALLED if rolling else Reason.LAUNCH_STALLED
        timeout = int(world.ready_timeout.total_seconds())
        consequence = (
            f"the rollout is stopped with {len(pending)} pod(s) left"
            if rolling
            else "no further node is launched"
        )
        return result(
            Action(
                Kind.STALLED,
                reason,
                f"node {pod} {what} within {timeout}s of its launch; {consequence}",
                pod=pod,
            )
        )

    if world.paused:
        return result(Action(Kind.WAIT, Reason.PAUSED, "spec.paused is true; no action taken"))
    if not sts.observed or sts.update_revision is None:
        return result(
            Action(Kind.WAIT, Reason.STATEFULSET_PENDING, "waiting for the StatefulSet controller")
        )
    live = [p for p in world.pods if not p.terminating]
    terminating = [p.name for p in world.pods if p.terminating]
    if terminating:
        return result(
            Action(
                Kind.WAIT,
                Reason.POD_TERMINATING,
                f"waiting for {', '.join(sorted(terminating))} to terminate",
            )
        )
    present = {p.ordinal for p in live}
    missing = [names.pod_name(cr_name, o) for o in range(sts.replicas) if o not in present]
    if missing:
        if _launch_stalled(missing[0], world):
            return stalled(missing[0], "was not even created")
        return result(
            Action(
                Kind.WAIT,
                Reason.POD_PENDING,
                f"waiting for pod {missing[0]} to be created",
            )
        )
    gating = _gating_unready(live, sts.update_revision)

    # 2. Scale down, highest ordinal first, one at a time, never with another node out: the
    # node removed must be the only one out of service, or out of service itself.
    held_by: PodState | None = None
    if world.desired < sts.replicas:
        victim = names.pod_name(cr_name, sts.replicas - 1)
        out = [p for p in live if not p.ready and p.name != victim]
        victim_serving = any(p.name == victim and p.ready for p in live)
        if not out or not victim_serving:
            return result(
                Action(
                    Kind.SCALE_DOWN,
                    Reason.SCALING_DOWN,
                    f"removing node {victim} ({sts.replicas} -> {sts.replicas - 1})",
                    replicas=sts.replicas - 1,
                    pod=victim,
                )
            )
        held_by = out[0]  # the rollout below may be what brings it back
    waits_too = "" if held_by is None else f"; removing node {victim} waits until then"

    # 3. Roll out, one pod at a time, gated on the updated pods the rollout launched.
    if rolling:
        for pod in gating:
            if _replacement_stalled(pod, world):
                return stalled(pod.name, "did not become Ready")
        if gating:
            return result(
                Action(
                    Kind.WAIT,
                    Reason.NODE_STARTING,
                    f"waiting for node {gating[0].name} to become Ready{waits_too}",
                    pod=gating[0].name,
                )
            )
        victim = pending[0]
        return result(
            Action(
                Kind.REPLACE_POD,
                Reason.ROLLING_OUT,
                f"replacing node {victim} ({len(pending)} pod(s) left)",
                pod=victim,
            )
        )

    # 4. Scale up, only when every pod is Ready.
    for pod in gating:
        if _launch_stalled(pod.name, world):
            return stalled(pod.name, "did not become Ready")
    if held_by is not None:
        return result(
            Action(
                Kind.WAIT,
                Reason.SCALE_DOWN_WAITING,
                f"removing node {names.pod_name(cr_name, sts.replicas - 1)} waits until node "
                f"{held_by.name} is Ready (never two nodes out of service)",
                pod=held_by.name,
            )
        )
    if gating:
        first = gating[0]
        launching = world.launch is not None and world.launch.pod == first.name
        return result(
            Action(
                Kind.WAIT,
                Reason.NODE_STARTING if launching else Reason.NODE_UNREADY,
                f"waiting for node {first.name} to become Ready"
                + ("" if launching else " again (no launch in progress)"),
                pod=first.name,
            )
        )
    if world.desired > sts.replicas:
        newcomer = names.pod_name(cr_name, sts.replicas)
        return result(
            Action(
                Kind.SCALE_UP,
                Reason.SCALING_UP,
                f"launching node {newcomer} ({sts.replicas} -> {sts.replicas + 1})",
                replicas=sts.replicas + 1,
                pod=newcomer,
            )
        )
    return result(Action(Kind.IDLE, Reason.RECONCILED, "all nodes are Ready"))
