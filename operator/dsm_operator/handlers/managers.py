"""kopf registrations for DeepSecurityManager resources; each delegates to ``driving``.

The timer is the level-based heart (every ``reconcile_interval_seconds``); the change handlers
only make a new or edited resource react at once instead of at the next tick. All of them run
the same idempotent pass under one lock per resource, so they never interleave.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import kopf

from dsm_operator import driving, metrics
from dsm_operator.reconcile import names
from dsm_operator.settings import OperatorSettings

RESOURCE = (names.GROUP, names.VERSION, names.PLURAL)
TICK_SECONDS = 1.0
"""The timer fires this often and runs a pass once ``reconcile_interval_seconds`` have passed
since the last one: kopf fixes a timer's interval at import, the setting is read at start-up."""


_WOKEN: set[tuple[str, str]] = set()
"""(namespace, name) of resources whose pods or StatefulSet changed since their last pass."""


def _lock(memo: kopf.Memo) -> asyncio.Lock:
    lock = memo.get("lock")
    if lock is None:
        lock = memo["lock"] = asyncio.Lock()
    assert isinstance(lock, asyncio.Lock)
    return lock


async def _run(
    body: kopf.Body,
    spec: kopf.Spec,
    meta: kopf.Meta,
    status: kopf.Status,
    patch: kopf.Patch,
    memo: kopf.Memo,
    logger: Any,
) -> None:
    def event(type_: str, reason: str, message: str) -> None:
        kopf.event(body, type=type_, reason=reason, message=message)

    settings: OperatorSettings = memo.settings
    ctx = driving.Context(settings=settings, kube=memo.kube, event=event, logger=logger)
    async with _lock(memo):
        memo["last_pass"] = time.monotonic()
        result = await driving.reconcile_pass(
            ctx,
            name=str(meta["name"]),
            namespace=str(meta["namespace"]),
            uid=str(meta["uid"]),
            generation=int(meta.get("generation") or 0),
            spec_body=dict(spec),
            status_body=dict(status),
        )
    if result.status is not None:
        patch.status.update(result.status)


@kopf.on.resume(*RESOURCE, id="resume")
@kopf.on.create(*RESOURCE, id="create")
@kopf.on.update(*RESOURCE, id="update", field="spec")
async def on_change(
    body: kopf.Body,
    spec: kopf.Spec,
    meta: kopf.Meta,
    status: kopf.Status,
    patch: kopf.Patch,
    memo: kopf.Memo,
    logger: Any,
    **_: Any,
) -> None:
    await _run(body, spec, meta, status, patch, memo, logger)


@kopf.timer(*RESOURCE, id="reconcile", interval=TICK_SECONDS)
async def on_timer(
    body: kopf.Body,
    spec: kopf.Spec,
    meta: kopf.Meta,
    status: kopf.Status,
    patch: kopf.Patch,
    memo: kopf.Memo,
    logger: Any,
    **_: Any,
) -> None:
    settings: OperatorSettings = memo.settings
    key = (str(meta["namespace"]), str(meta["name"]))
    last = memo.get("last_pass")
    due = last is None or time.monotonic() - last >= settings.reconcile_interval_seconds
    if not due and key not in _WOKEN:
        return
    _WOKEN.discard(key)
    await _run(body, spec, meta, status, patch, memo, logger)


_CHILD_LABELS = {names.LABEL_MANAGED_BY: names.MANAGED_BY, names.LABEL_NAME: names.APP_NAME}


@kopf.on.event("pods", labels=_CHILD_LABELS)
@kopf.on.event("apps", "v1", "statefulsets", labels=_CHILD_LABELS)
def on_child_event(meta: kopf.Meta, **_: Any) -> None:
    """A node pod or the StatefulSet changed: the owner's next timer tick (<= 1 s) runs a pass
    instead of waiting for the reconcile interval, so each launch step follows readiness."""
    instance = (meta.get("labels") or {}).get(names.LABEL_INSTANCE)
    if instance:
        _WOKEN.add((str(meta["namespace"]), str(instance)))


@kopf.on.delete(*RESOURCE, id="delete", optional=True)
async def on_delete(body: kopf.Body, meta: kopf.Meta, **_: Any) -> None:
    """Children go with the owner references; referenced Secrets and the database stay."""
    metrics.forget(str(meta["namespace"]), str(meta["name"]))
    kopf.info(
        body,
        reason="Deleting",
        message="children are garbage-collected; referenced Secrets and the database are kept",
    )
