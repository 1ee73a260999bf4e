"""Conditions and status: API conventions, written only when changed, rollout progress."""

from __future__ import annotations

import datetime
from typing import Any

import pytest

from dsm_operator.reconcile import conditions, planning, statuses
from dsm_operator.reconcile.conditions import Condition, Status, Type
from dsm_operator.reconcile.planning import PodState, SetState, World
from dsm_operator.reconcile.specs import ManagerSpec

T0 = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
LATER = T0 + datetime.timedelta(minutes=5)


def spec(**kw: Any) -> ManagerSpec:
    return ManagerSpec.parse(
        {
            "version": "2.0.0",
            "database": {"secretRef": {"name": "db"}},
            "masterKey": {"localSecretRef": {"name": "mk"}},
            **kw,
        }
    )


def pod(o: int, rev: str = "r1", ready: bool = True, version: str = "2.0.0") -> PodState:
    return PodState(f"m-{o}", o, rev, ready, created_at=T0, version=version)


def observe(
    pods: list[PodState],
    *,
    desired: int = 3,
    replicas: int = 3,
    revision: str = "r1",
    now: datetime.datetime = T0,
    **kw: Any,
) -> statuses.Observation:
    world = World(
        desired,
        False,
        datetime.timedelta(minutes=10),
        now,
        SetState(replicas, revision),
        pods,
    )
    return statuses.Observation(
        cr_name="m",
        generation=kw.pop("generation", 1),
        spec=kw.pop("spec", spec(nodes=desired)),
        world=world,
        plan=planning.plan(world, "m"),
        **kw,
    )


def cond(status: dict[str, Any], type_: str) -> dict[str, Any]:
    found = conditions.find(status["conditions"], type_)
    assert found is not None
    return found


# --- conditions.merge -------------------------------------------------------------------------


def test_merge_sets_transition_time_and_generation() -> None:
    result = conditions.merge(
        None, [Condition("Ready", Status.TRUE, "AllNodesReady", "ok")], generation=4, now=T0
    )
    assert result == [
        {
            "type": "Ready",
            "status": "True",
            "reason": "AllNodesReady",
            "message": "ok",
            "lastTransitionTime": "2026-01-01T00:00:00Z",
            "observedGeneration": 4,
        }
    ]


def test_merge_keeps_transition_time_when_status_is_unchanged() -> None:
    first = conditions.merge(
        None, [Condition("Ready", Status.FALSE, "A", "x")], generation=1, now=T0
    )
    second = conditions.merge(
        first, [Condition("Ready", Status.FALSE, "B", "y")], generation=2, now=LATER
    )
    assert second[0]["lastTransitionTime"] == "2026-01-01T00:00:00Z"
    assert second[0]["reason"] == "B"
    assert second[0]["observedGeneration"] == 2


def test_merge_moves_transition_time_on_change() -> None:
    first = conditions.merge(
        None, [Condition("Ready", Status.FALSE, "A", "x")], generation=1, now=T0
    )
    second = conditions.merge(
        first, [Condition("Ready", Status.TRUE, "A", "x")], generation=1, now=LATER
    )
    assert second[0]["lastTransitionTime"] == "2026-01-01T00:05:00Z"


def test_merge_is_a_fixed_point() -> None:
    new = [
        Condition("Degraded", Status.FALSE, "AsExpected", "-"),
        Condition("Ready", Status.TRUE, "R", "-"),
    ]
    first = conditions.merge(None, new, generation=1, now=T0)
    assert conditions.merge(first, new, generation=1, now=LATER) == first


def test_merge_puts_ready_first_and_keeps_foreign_types() -> None:
    previous = [{"type": "Custom", "status": "True", "reason": "X", "lastTransitionTime": "t"}]
    result = conditions.merge(
        previous, [Condition("Ready", Status.TRUE, "R", "-")], generation=1, now=T0
    )
    assert [c["type"] for c in result] == ["Ready", "Custom"]


def test_reasons_are_one_camel_case_word() -> None:
    for reason in [*conditions.Reason, *planning.Reason]:
        assert reason.value.isalnum() and reason.value[0].isupper(), reason


# --- statuses.build ---------------------------------------------------------------------------


def test_all_ready() -> None:
    status = statuses.build(observe([pod(0), pod(1), pod(2)]), None)
    assert cond(status, Type.READY)["status"] == "True"
    assert cond(status, Type.READY)["reason"] == "AllNodesReady"
    assert cond(status, Type.PROGRESSING)["status"] == "False"
    assert cond(status, Type.DEGRADED)["status"] == "False"
    assert status["readyNodes"] == 3
    assert status["desiredNodes"] == 3
    assert status["currentVersion"] == "2.0.0"
    assert status["selector"] == "app.kubernetes.io/instance=m,app.kubernetes.io/name=dsm-node"
    assert "rollout" not in status


def test_scaling_up() -> None:
    status = statuses.build(observe([pod(0)], desired=3, replicas=1), None)
    assert cond(status, Type.READY)["reason"] == "ScalingUp"
    assert cond(status, Type.PROGRESSING)["status"] == "True"
    assert cond(status, Type.PROGRESSING)["reason"] == "ScalingUp"
    assert cond(status, Type.READY)["message"] == "1/3 nodes ready"


def test_scaling_down() -> None:
    status = statuses.build(observe([pod(0), pod(1), pod(2)], desired=1), None)
    assert cond(status, Type.READY)["reason"] == "ScalingDown"
    assert cond(status, Type.PROGRESSING)["reason"] == "ScalingDown"


def test_unchanged_status_is_not_rewritten() -> None:
    obs = observe([pod(0), pod(1), pod(2)])
    first = statuses.build(obs, None)
    assert statuses.changed(None, first)
    later = observe([pod(0), pod(1), pod(2)], now=LATER)
    assert not statuses.changed(first, statuses.build(later, first))


def test_generation_change_rewrites_status() -> None:
    first = statuses.build(observe([pod(0), pod(1), pod(2)]), None)
    second = statuses.build(observe([pod(0), pod(1), pod(2)], generation=2), first)
    assert statuses.changed(first, second)
    assert cond(second, Type.READY)["observedGeneration"] == 2
    assert second["observedGeneration"] == 2


def test_rollout_starts_and_records_progress() -> None:
    before = statuses.build(
        observe([pod(0, version="1.0.0"), pod(1, version="1.0.0")], desired=2, replicas=2), None
    )
    assert before["currentVersion"] == "1.0.0"
    obs = observe(
        [pod(0, version="1.0.0"), pod(1, version="1.0.0")],
        desired=2,
        replicas=2,
        revision="r2",
        replaced_pod="m-0",
    )
    status = statuses.build(obs, before)
    rollout = status["rollout"]
    assert rollout["state"] == "InProgress"
    assert rollout["fromVersion"] == "1.0.0"
    assert rollout["targetVersion"] == "2.0.0"
    assert rollout["targetRevision"] == "r2"
    assert rollout["pending"] == ["m-0", "m-1"]
    assert rollout["lastReplacedPod"] == "m-0"
    assert rollout["startedAt"] == "2026-01-01T00:00:00Z"
    assert status["currentVersion"] == "1.0.0"
    assert cond(status, Type.READY)["reason"] == "RolloutInProgress"


def test_rollout_start_time_survives_later_passes() -> None:
    first = statuses.build(observe([pod(0), pod(1)], desired=2, replicas=2, revision="r2"), None)
    later = statuses.build(
        observe([pod(0, "r2"), pod(1)], desired=2, replicas=2, revision="r2", now=LATER), first
    )
    assert later["rollout"]["startedAt"] == first["rollout"]["startedAt"]
    assert later["rollout"]["updated"] == 1
    assert later["rollout"]["pending"] == ["m-1"]


def test_rollout_completes() -> None:
    running = statuses.build(
        observe([pod(0, "r2"), pod(1)], desired=2, replicas=2, revision="r2"), None
    )
    done = statuses.build(
        observe([pod(0, "r2"), pod(1, "r2")], desired=2, replicas=2, revision="r2", now=LATER),
        running,
    )
    assert done["rollout"]["state"] == "Complete"
    assert done["rollout"]["finishedAt"] == "2026-01-01T00:05:00Z"
    assert done["rollout"]["pending"] == []
    assert done["currentVersion"] == "2.0.0"
    assert cond(done, Type.READY)["status"] == "True"


def test_stalled_rollout_is_degraded() -> None:
    late = T0 + datetime.timedelta(hours=1)
    pods = [PodState("m-0", 0, "r2", False, created_at=T0), pod(1, ready=False)]
    pods[1] = PodState("m-1", 1, "r1", False, created_at=T0 - datetime.timedelta(days=1))
    status = statuses.build(observe(pods, desired=2, replicas=2, revision="r2", now=late), None)
    assert cond(status, Type.DEGRADED)["status"] == "True"
    assert cond(status, Type.DEGRADED)["reason"] == "RolloutStalled"
    assert cond(status, Type.PROGRESSING)["status"] == "False"
    assert status["rollout"]["state"] == "Stalled"


def test_secret_problem() -> None:
    blocker = statuses.Blocker(conditions.Reason.SECRET_NOT_FOUND, "Secret 'db' not found")
    obs = observe([], replicas=0, blocked=blocker)
    status = statuses.build(obs, None)
    assert cond(status, Type.DEGRADED)["reason"] == "SecretNotFound"
    assert cond(status, Type.READY)["status"] == "False"
    assert "Secret 'db'" in cond(status, Type.DEGRADED)["message"]


@pytest.mark.parametrize(
    "reason", [conditions.Reason.OWNERSHIP_CONFLICT, conditions.Reason.APPLY_FAILED]
)
def test_a_blocked_pass_is_not_ready_even_with_every_pod_ready(
    reason: conditions.Reason,
) -> None:
    """The apply of this generation failed: the pods being Ready says nothing about it."""
    ready = statuses.build(observe([pod(0), pod(1), pod(2)]), None)
    assert cond(ready, Type.READY)["status"] == "True"
    blocker = statuses.Blocker(reason, "apply StatefulSet m: 422 spec.template is invalid")
    status = statuses.build(observe([pod(0), pod(1), pod(2)], generation=2, blocked=blocker), ready)
    assert status["observedGeneration"] == 2
    assert cond(status, Type.READY)["status"] == "False"
    assert cond(status, Type.READY)["reason"] == reason
    assert cond(status, Type.DEGRADED)["status"] == "True"
    assert "422" in cond(status, Type.DEGRADED)["message"]
    assert cond(status, Type.DEGRADED)["observedGeneration"] == 2


# --- the status patch removes what no longer applies ------------------------------------------


def test_patch_removes_what_no_longer_applies_whatever_the_previous_status_says() -> None:
    """kopf may hand a pass a status older than the last write: removals must not depend on it."""
    written_last = {
        "a": 1,
        "rollout": {"state": "Complete", "finishedAt": "t1"},
        "launch": {"pod": "m-1", "startedAt": "t0"},
    }
    stale = {"a": 0}  # from before the write that added the launch and the finish
    new = {"a": 2, "rollout": {"state": "InProgress"}}
    for previous in (written_last, stale):
        result = _merge(written_last, statuses.patch(previous, new))
        assert result == {"a": 2, "rollout": {"state": "InProgress"}}, previous
    assert statuses.patch(new, new) == {}
    assert statuses.patch(written_last, written_last) == {}


def test_a_status_that_only_loses_a_key_is_a_change() -> None:
    previous = {"a": 1, "launch": {"pod": "m-1", "startedAt": "t0"}}
    assert statuses.changed(previous, {"a": 1})
    assert _merge(previous, statuses.patch(previous, {"a": 1})) == {"a": 1}


def test_a_new_rollout_does_not_keep_the_previous_finish() -> None:
    running = statuses.build(
        observe([pod(0, "r2"), pod(1)], desired=2, replicas=2, revision="r2", replaced_pod="m-0"),
        None,
    )
    done = statuses.build(
        observe([pod(0, "r2"), pod(1, "r2")], desired=2, replicas=2, revision="r2", now=LATER),
        running,
    )
    assert done["rollout"]["finishedAt"]
    second = statuses.build(
        observe([pod(0, "r2"), pod(1, "r2")], desired=2, replicas=2, revision="r3", now=LATER),
        done,
    )
    change = statuses.patch(done, second)
    # Written as a merge patch onto the old status, the result has no finishedAt.
    written = _merge(done, change)
    assert written["rollout"]["state"] == "InProgress"
    assert "finishedAt" not in written["rollout"]
    assert "lastReplacedPod" not in written["rollout"]
    assert written["rollout"]["targetRevision"] == "r3"


def _merge(target: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """RFC 7386 JSON merge patch, as the API server applies it."""
    result = dict(target)
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        elif isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = _merge(result[key], value)
        else:
            result[key] = value
    return result


def test_the_launch_is_remembered_and_read_back() -> None:
    status = statuses.build(observe([pod(0)], desired=2, replicas=1), None)
    assert status["launch"] == {"pod": "m-1", "startedAt": "2026-01-01T00:00:00Z"}
    assert statuses.launch_of(status) == planning.Launch("m-1", T0)
    assert statuses.launch_of({}) is None
    assert statuses.launch_of({"launch": {"pod": "m-1", "startedAt": "garbage"}}) is None


def test_nodes_merge_pods_and_reports() -> None:
    reports = [
        statuses.NodeReport("m-0", "Online", "2.0.0", "10.0.0.1"),
        statuses.NodeReport("m-1", "Offline (Upgrade Required)", "1.0.0"),
        statuses.NodeReport("m-5", "Offline"),
        statuses.NodeReport("m-6", "Decommissioned"),
    ]
    status = statuses.build(observe([pod(0), pod(1, ready=False)], reports=reports), None)
    nodes = {n["name"]: n for n in status["nodes"]}
    assert set(nodes) == {"m-0", "m-1", "m-5"}
    assert nodes["m-0"] == {
        "name": "m-0",
        "status": "Online",
        "podExists": True,
        "podReady": True,
        "version": "2.0.0",
        "address": "10.0.0.1",
    }
    assert nodes["m-1"]["status"] == "Offline (Upgrade Required)"
    assert nodes["m-5"]["podExists"] is False


def test_nodes_unknown_without_reports() -> None:
    status = statuses.build(observe([pod(0)]), None)
    assert status["nodes"][0]["status"] == "Unknown"


def test_nodes_sorted_by_ordinal() -> None:
    pods = [pod(o) for o in (0, 1, 2, 10, 11)]
    status = statuses.build(observe(pods, desired=12, replicas=12), None)
    assert [n["name"] for n in status["nodes"]] == ["m-0", "m-1", "m-2", "m-10", "m-11"]


@pytest.mark.parametrize("count", [1, 5, 25])
def test_decommissioned_history_is_bounded(count: int) -> None:
    previous: dict[str, Any] = {}
    for i in range(count):
        previous = statuses.build(observe([pod(0)], decommissioned=[f"m-{i + 1}"]), previous)
    assert len(previous["decommissioned"]) == min(count, statuses.DECOMMISSIONED_HISTORY)
    assert previous["decommissioned"][-1] == f"m-{count}"


def test_rollout_completion_is_seen_once() -> None:
    running = {"rollout": {"state": "InProgress"}}
    stalled = {"rollout": {"state": "Stalled"}}
    done = {"rollout": {"state": "Complete"}}
    assert statuses.rollout_completed(running, done)
    assert statuses.rollout_completed(stalled, done)
    assert not statuses.rollout_completed(done, done)
    assert not statuses.rollout_completed({}, done)
    assert not statuses.rollout_completed(running, running)


def test_a_condition_already_true_for_a_reason_is_old_news() -> None:
    previous = [{"type": "Degraded", "status": "True", "reason": "RolloutStalled"}]
    assert conditions.is_already(previous, Type.DEGRADED, Status.TRUE, "RolloutStalled")
    assert not conditions.is_already(previous, Type.DEGRADED, Status.TRUE, "LaunchStalled")
    assert not conditions.is_already(None, Type.DEGRADED, Status.TRUE, "RolloutStalled")
