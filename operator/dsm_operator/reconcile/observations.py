"""Kubernetes bodies (as returned by the API) turned into the planner's observed states.

Pure: plain dictionaries in, ``planning`` dataclasses out. Kept apart from the gateway so the
parsing of pod readiness and revisions is unit-tested on literal bodies.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Mapping
from typing import Any

from dsm_operator.reconcile import names, planning


def _timestamp(value: Any) -> datetime.datetime | None:
    if value is None:
        return None
    if isinstance(value, datetime.datetime):
        return value if value.tzinfo else value.replace(tzinfo=datetime.UTC)
    text = str(value).replace("Z", "+00:00")
    try:
        parsed = datetime.datetime.fromisoformat(text)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=datetime.UTC)


def pod_ready(pod: Mapping[str, Any]) -> bool:
    for cond in (pod.get("status") or {}).get("conditions") or ():
        if cond.get("type") == "Ready":
            return bool(cond.get("status") == "True")
    return False


def pod_state(cr_name: str, pod: Mapping[str, Any]) -> planning.PodState | None:
    """The pod as the planner sees it; ``None`` for a pod that is not one of this set's."""
    meta = pod.get("metadata") or {}
    name = str(meta.get("name") or "")
    ordinal = names.ordinal_of(cr_name, name)
    if ordinal is None:
        return None
    labels = meta.get("labels") or {}
    status = pod.get("status") or {}
    phase = status.get("phase")
    return planning.PodState(
        name=name,
        ordinal=ordinal,
        revision=labels.get(names.REVISION_LABEL),
        ready=pod_ready(pod) and phase == "Running",
        terminating=bool(meta.get("deletionTimestamp")) or phase in ("Succeeded", "Failed"),
        created_at=_timestamp(meta.get("creationTimestamp")),
        ip=status.get("podIP"),
        version=labels.get(names.LABEL_VERSION),
    )


def pod_states(cr_name: str, pods: Iterable[Mapping[str, Any]]) -> list[planning.PodState]:
    states = (pod_state(cr_name, p) for p in pods)
    return sorted((s for s in states if s is not None), key=lambda s: s.ordinal)


def set_state(sts: Mapping[str, Any] | None) -> planning.SetState | None:
    if sts is None:
        return None
    meta = sts.get("metadata") or {}
    spec = sts.get("spec") or {}
    status = sts.get("status") or {}
    generation = meta.get("generation")
    observed = status.get("observedGeneration")
    return planning.SetState(
        replicas=int(spec.get("replicas", 1)),
        update_revision=status.get("updateRevision"),
        observed=generation is not None and observed is not None and observed >= generation,
    )


def load_balancer_address(service: Mapping[str, Any] | None) -> str | None:
    if not service:
        return None
    for ingress in ((service.get("status") or {}).get("loadBalancer") or {}).get("ingress") or ():
        address = ingress.get("hostname") or ingress.get("ip")
        if address:
            return str(address)
    return None
