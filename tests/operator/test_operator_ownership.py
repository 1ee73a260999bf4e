"""The ownership rule (``reconcile/ownership.py``) on literal bodies, and how the gateway sorts the
API server's refusals (``kubeapi.Refused``)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from kubernetes.client import exceptions

from dsm_operator.gateways import kubeapi
from dsm_operator.reconcile import ownership

OWNER = "0b6c-owner"


def body(*refs: dict[str, Any], name: str = "mgr-lb", uid: str = "u-1") -> dict[str, Any]:
    return {"metadata": {"name": name, "uid": uid, "ownerReferences": list(refs)}}


def ref(uid: str, controller: bool | None = True) -> dict[str, Any]:
    result: dict[str, Any] = {"kind": "DeepSecurityManager", "name": "mgr", "uid": uid}
    if controller is not None:
        result["controller"] = controller
    return result


def test_ours_means_our_uid_in_the_controller_reference() -> None:
    assert ownership.is_ours(body(ref(OWNER)), OWNER)
    assert ownership.controller_uid(body(ref("other", False), ref(OWNER))) == OWNER


@pytest.mark.parametrize(
    "foreign",
    [
        body(),  # a user's object: no owner at all
        body(ref("previous-incarnation")),  # same name and kind, an older resource's uid
        body(ref(OWNER, controller=False)),  # owned by us, but not controlled
        body(ref(OWNER, controller=None)),
        body(ref("someone-else"), ref(OWNER, controller=False)),
    ],
)
def test_anything_else_is_not_ours(foreign: dict[str, Any]) -> None:
    assert not ownership.is_ours(foreign, OWNER)
    found = ownership.conflict(foreign, "Service", OWNER)
    assert found is not None
    assert "Service mgr-lb exists and is not controlled by this DeepSecurityManager" in (
        found.message
    )


def test_no_conflict_for_our_own_object_and_none_for_a_missing_one() -> None:
    assert ownership.conflict(body(ref(OWNER)), "Service", OWNER) is None
    assert not ownership.is_ours(None, OWNER)


def test_the_conflict_names_the_controller() -> None:
    found = ownership.conflict(body(ref("abc")), "PodDisruptionBudget", OWNER)
    assert found is not None and "controller uid abc" in found.message
    bare = ownership.conflict(body(), "PodDisruptionBudget", OWNER)
    assert bare is not None and "no controller" in bare.message


def test_pinned_carries_the_live_uid_and_leaves_the_manifest_alone() -> None:
    manifest = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "mgr-lb"}}
    result = ownership.pinned(manifest, body(ref(OWNER), uid="live-uid"))
    assert result["metadata"] == {"name": "mgr-lb", "uid": "live-uid"}
    assert "uid" not in manifest["metadata"]


def _api_exception(status: int, message: str | None) -> exceptions.ApiException:
    exc = exceptions.ApiException(status=status, reason="Reason")
    exc.body = json.dumps({"kind": "Status", "message": message}) if message else None
    return exc


@pytest.mark.parametrize("status", [400, 403, 422])
def test_refusals_a_retry_will_not_fix_are_refused(status: int) -> None:
    refused = kubeapi._refused(_api_exception(status, "spec.x: Invalid value"), "apply X y")
    assert refused is not None
    assert str(refused) == f"apply X y: {status} spec.x: Invalid value"


@pytest.mark.parametrize("status", [409, 429, 500, 503])
def test_conflicts_throttling_and_server_errors_are_retried(status: int) -> None:
    assert kubeapi._refused(_api_exception(status, "busy"), "apply X y") is None


def test_a_refusal_without_a_status_body_uses_the_reason() -> None:
    refused = kubeapi._refused(_api_exception(403, None), "create X y")
    assert refused is not None and refused.message == "Reason"
