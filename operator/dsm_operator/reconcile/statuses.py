"""The ``status`` of a DeepSecurityManager, computed from the observed world and the plan.

Pure: the handler passes in what it observed and what it did in this pass; this module decides
what the status says. The result is compared with the previous status and written only when it
differs, so a steady resource is never patched.

Rollout progress is derived from the pods (which revision each runs), so it survives an operator
restart without being trusted blindly: the status records *when* a rollout started, what it went
from and to, and the last pod replaced -- things the world alone no longer tells. Likewise the
launch in progress (which node, since when), from which a stalled launch is measured.

The status is written as a JSON merge patch; :func:`patch` turns the new status into one that
also *removes* what no longer applies (a key set to ``null``), so a new rollout does not keep
the previous one's ``finishedAt``.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
from collections.abc import Mapping, Sequence
from typing import Any, Final

from dsm_operator.reconcile import conditions, manifests, names, planning
from dsm_operator.reconcile.conditions import Condition, Status, Type
from dsm_operator.reconcile.specs import ManagerSpec

DECOMMISSIONED_HISTORY = 20


class RolloutState(enum.StrEnum):
    """``status.rollout.state``."""

    IN_PROGRESS = "InProgress"
    STALLED = "Stalled"
    COMPLETE = "Complete"


@dataclasses.dataclass(frozen=True)
class Blocker:
    """Why a pass stopped before acting (a missing Secret, an object that is not ours, a write
    the API server refused): shown as ``Degraded`` with this reason and message."""

    reason: conditions.Reason
    message: str


@dataclasses.dataclass(frozen=True)
class NodeReport:
    """One node as the managers' ``GET /api/nodes`` describes it."""

    name: str
    status: str
    version: str | None = None
    address: str | None = None


@dataclasses.dataclass(frozen=True)
class Observation:
    """Everything the status is computed from."""

    cr_name: str
    generation: int
    spec: ManagerSpec
    world: planning.World
    plan: planning.Plan
    reports: Sequence[NodeReport] = ()
    node_api_error: str | None = None
    blocked: Blocker | None = None
    replaced_pod: str | None = None
    """The pod deleted in this pass, if any."""
    decommissioned: Sequence[str] = ()
    """Nodes decommissioned in this pass."""
    load_balancer_address: str | None = None
    agent_load_balancer_address: str | None = None
    """The heartbeat channel's Service address (agents)."""


def _ts(now: datetime.datetime) -> str:
    return now.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _current_version(obs: Observation, previous: Mapping[str, Any]) -> str:
    versions = {p.version for p in obs.world.pods if not p.terminating}
    if len(versions) == 1 and None not in versions and not obs.plan.rolling:
        return str(next(iter(versions)))
    return str(previous.get("currentVersion") or "")


def _rollout(obs: Observation, previous: Mapping[str, Any], current_version: str) -> dict[str, Any]:
    prev = dict(previous.get("rollout") or {})
    sts = obs.world.statefulset
    now = _ts(obs.world.now)
    if sts is None or not obs.plan.rolling:
        if prev.get("state") in (RolloutState.IN_PROGRESS, RolloutState.STALLED):
            prev.update(
                state=RolloutState.COMPLETE,
                finishedAt=now,
                pending=[],
                updated=prev.get("total", 0),
                message="",
            )
        return prev
    target = sts.update_revision or ""
    live = [p for p in obs.world.pods if not p.terminating]
    if prev.get("targetRevision") != target or prev.get("state") == RolloutState.COMPLETE:
        # A new rollout: nothing of the previous one carries over (patch() removes its keys).
        prev = {
            "targetRevision": target,
            "targetVersion": obs.spec.version,
            "fromVersion": current_version,
            "startedAt": now,
        }
    stalled = obs.plan.action.kind is planning.Kind.STALLED
    prev.update(
        state=RolloutState.STALLED if stalled else RolloutState.IN_PROGRESS,
        targetVersion=obs.spec.version,
        total=len(live),
        updated=sum(1 for p in live if p.revision == target),
        pending=list(obs.plan.pending),
        message=obs.plan.action.message,
    )
    if obs.replaced_pod:
        prev.update(lastReplacedPod=obs.replaced_pod, lastReplacedAt=now)
    return prev


def _nodes(obs: Observation) -> list[dict[str, Any]]:
    pods = {p.name: p for p in obs.world.pods}
    reports = {r.name: r for r in obs.reports}
    result = []
    for name in sorted(set(pods) | set(reports), key=lambda n: (len(n), n)):
        pod = pods.get(name)
        report = reports.get(name)
        if report is not None and report.status == names.NodeStatus.DECOMMISSIONED and pod is None:
            continue
        entry: dict[str, Any] = {
            "name": name,
            "status": report.status if report else names.STATUS_UNKNOWN,
            "podExists": pod is not None,
            "podReady": bool(pod and pod.ready),
        }
        version = (report.version if report else None) or (pod.version if pod else None)
        if version:
            entry["version"] = version
        if report and report.address:
            entry["address"] = report.address
        result.append(entry)
    return result


def _conditions(obs: Observation) -> list[Condition]:
    action = obs.plan.action
    world = obs.world
    live = [p for p in world.pods if not p.terminating]
    ready = sum(1 for p in live if p.ready)
    summary = f"{ready}/{world.desired} nodes ready"
    if obs.blocked is not None:
        # The spec of this generation is not (fully) applied: not Ready, whatever the pods say.
        reason, message = obs.blocked.reason, obs.blocked.message
        return [
            Condition(Type.READY, Status.FALSE, reason, f"{summary}; {message}"),
            Condition(Type.PROGRESSING, Status.FALSE, reason, message),
            Condition(Type.DEGRADED, Status.TRUE, reason, message),
        ]
    all_ready = (
        world.statefulset is not None
        and not obs.plan.rolling
        and ready == world.desired
        and len(live) == world.desired
    )
    if all_ready:
        ready_cond = Condition(Type.READY, Status.TRUE, conditions.Reason.ALL_NODES_READY, summary)
    elif obs.plan.rolling:
        ready_cond = Condition(
            Type.READY, Status.FALSE, conditions.Reason.ROLLOUT_IN_PROGRESS, summary
        )
    elif world.desired > len(live):
        ready_cond = Condition(Type.READY, Status.FALSE, planning.Reason.SCALING_UP, summary)
    elif world.desired < len(live):
        ready_cond = Condition(Type.READY, Status.FALSE, planning.Reason.SCALING_DOWN, summary)
    else:
        ready_cond = Condition(Type.READY, Status.FALSE, conditions.Reason.NODES_NOT_READY, summary)
    if action.kind in (planning.Kind.IDLE, planning.Kind.STALLED) or (
        action.reason is planning.Reason.PAUSED
    ):
        progressing = Condition(Type.PROGRESSING, Status.FALSE, action.reason, action.message)
    else:
        progressing = Condition(Type.PROGRESSING, Status.TRUE, action.reason, action.message)
    if action.kind is planning.Kind.STALLED:
        degraded = Condition(Type.DEGRADED, Status.TRUE, action.reason, action.message)
    else:
        degraded = Condition(
            Type.DEGRADED, Status.FALSE, conditions.Reason.AS_EXPECTED, "no failure detected"
        )
    return [ready_cond, progressing, degraded]


def build(obs: Observation, previous: Mapping[str, Any] | None) -> dict[str, Any]:
    """The complete new status (fields the operator owns)."""
    previous = previous or {}
    world = obs.world
    live = [p for p in world.pods if not p.terminating]
    update_revision = world.statefulset.update_revision if world.statefulset else None
    current_version = _current_version(obs, previous)
    status: dict[str, Any] = {
        "observedGeneration": obs.generation,
        "conditions": conditions.merge(
            previous.get("conditions"),
            _conditions(obs),
            generation=obs.generation,
            now=world.now,
        ),
        "desiredNodes": world.desired,
        "currentNodes": len(live),
        "readyNodes": sum(1 for p in live if p.ready),
        "updatedNodes": sum(
            1 for p in live if update_revision is not None and p.revision == update_revision
        ),
        "selector": names.selector_string(obs.cr_name),
        "currentVersion": current_version,
        "targetVersion": obs.spec.version,
        "apiKeySecret": names.api_key_secret_name(obs.cr_name),
        "nodes": _nodes(obs),
        "lastNodeApiError": obs.node_api_error or "",
    }
    rollout = _rollout(obs, previous, current_version)
    if rollout:
        status["rollout"] = rollout
    decommissioned = list(previous.get("decommissioned") or [])
    for node in obs.decommissioned:
        if node in decommissioned:
            decommissioned.remove(node)
        decommissioned.append(node)
    if decommissioned:
        status["decommissioned"] = decommissioned[-DECOMMISSIONED_HISTORY:]
    if obs.load_balancer_address:
        status["loadBalancerAddress"] = obs.load_balancer_address
    elif previous.get("loadBalancerAddress"):
        status["loadBalancerAddress"] = previous["loadBalancerAddress"]
    if obs.agent_load_balancer_address:
        status["agentLoadBalancerAddress"] = obs.agent_load_balancer_address
    elif previous.get("agentLoadBalancerAddress"):
        status["agentLoadBalancerAddress"] = previous["agentLoadBalancerAddress"]
    launch = obs.plan.launch
    if launch is not None:
        status["launch"] = {"pod": launch.pod, "startedAt": _ts(launch.started_at)}
    return status


def launch_of(status: Mapping[str, Any] | None) -> planning.Launch | None:
    """The launch the status remembers (``status.launch``), if any."""
    record = (status or {}).get("launch") or {}
    pod, started = record.get("pod"), record.get("startedAt")
    if not pod or not started:
        return None
    try:
        at = datetime.datetime.fromisoformat(str(started).replace("Z", "+00:00"))
    except ValueError:
        return None
    return planning.Launch(str(pod), at if at.tzinfo else at.replace(tzinfo=datetime.UTC))


OPTIONAL_KEYS: Final = frozenset(
    {
        "launch",
        "rollout",
        "decommissioned",
        "loadBalancerAddress",
        "agentLoadBalancerAddress",
        "agentSettings",
    }
)
"""Status keys the operator writes only sometimes: absent from a new status means removed."""
NESTED_KEYS: Final[Mapping[str, frozenset[str]]] = {
    "rollout": frozenset(
        {
            "state",
            "targetRevision",
            "targetVersion",
            "fromVersion",
            "startedAt",
            "finishedAt",
            "updated",
            "total",
            "pending",
            "lastReplacedPod",
            "lastReplacedAt",
            "message",
        }
    ),
    "agentSettings": frozenset({"mode", *manifests.AGENT_SETTING_KEYS}),
    "launch": frozenset({"pod", "startedAt"}),
}
"""The keys of the operator's nested status objects (absent from a new one means removed)."""


def _differs(previous: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    """Whether writing ``new`` over ``previous`` as :func:`patch` does would change anything."""
    for key in OPTIONAL_KEYS:
        if key not in new and previous.get(key) is not None:
            return True
    for key, value in new.items():
        old = previous.get(key)
        if isinstance(value, Mapping) and isinstance(old, Mapping):
            if any(old.get(k) is not None for k in NESTED_KEYS.get(key, ()) if k not in value):
                return True
            if any(old.get(k) != v for k, v in value.items()):
                return True
        elif old != value or key not in previous:
            return True
    return False


def patch(previous: Mapping[str, Any] | None, new: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON merge patch that writes ``new``, or ``{}`` when ``previous`` already says it.

    The patch is the whole new status plus ``None`` (removal) for every optional key and every
    nested key the operator owns that ``new`` lacks -- whatever ``previous`` says. kopf hands a
    pass the body of the event that woke it, which may predate the last status write (a timer and
    a change handler queue on one lock), so removals cannot be derived from it. Lists are
    replaced whole, as a merge patch does.
    """
    if not _differs(previous or {}, new):
        return {}
    result: dict[str, Any] = {key: None for key in OPTIONAL_KEYS if key not in new}
    for key, value in new.items():
        nested = NESTED_KEYS.get(key)
        if nested is not None and isinstance(value, Mapping):
            result[key] = {**dict.fromkeys(nested - value.keys()), **value}
        else:
            result[key] = value
    return result


def rollout_completed(previous: Mapping[str, Any] | None, new: Mapping[str, Any]) -> bool:
    """Whether ``new`` is the status in which the rollout of ``previous`` completed."""
    before = ((previous or {}).get("rollout") or {}).get("state")
    after = (new.get("rollout") or {}).get("state")
    return after == RolloutState.COMPLETE and before in (
        RolloutState.IN_PROGRESS,
        RolloutState.STALLED,
    )


def changed(previous: Mapping[str, Any] | None, new: Mapping[str, Any]) -> bool:
    """Whether writing ``new`` would change anything the operator owns."""
    return bool(patch(previous, new))
