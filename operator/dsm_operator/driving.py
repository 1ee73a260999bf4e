"""One reconcile pass: observe through the gateways, decide with ``reconcile``, act once.

This is the only module that combines I/O and decisions. A pass is idempotent and level-based:

1. read the referenced Secrets (a missing one stops the pass with ``Degraded``), create the
   API-key Secret if it is absent;
2. apply every child with server-side apply, the StatefulSet at its *current* replica count;
3. read the StatefulSet and pods back, ask a Ready node for the managers' node list;
4. let ``planning.plan`` choose one action and do it (raise or lower replicas by one, or delete
   one pod), decommission offline nodes that were scaled away;
5. compute the status and write it only when it changed.

The kopf handlers (``handlers/``) call :func:`reconcile_pass` from a timer and from the change
handlers, under a per-resource lock.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import logging
import secrets
import time
from collections.abc import Callable, Mapping
from typing import Any

from dsm_operator import metrics
from dsm_operator.gateways import kubeapi, nodeapi
from dsm_operator.gateways.kubeapi import KubeGateway
from dsm_operator.reconcile import (
    conditions,
    manifests,
    names,
    observations,
    ownership,
    planning,
    statuses,
)
from dsm_operator.reconcile.specs import ManagerSpec, Owner, SecretInputs
from dsm_operator.settings import OperatorSettings

EventFn = Callable[[str, str, str], None]
"""``(type, reason, message)`` -> posts an Event on the resource."""


@dataclasses.dataclass
class Context:
    settings: OperatorSettings
    kube: KubeGateway
    event: EventFn
    logger: logging.Logger | logging.LoggerAdapter[logging.Logger]


@dataclasses.dataclass(frozen=True)
class PassResult:
    status: dict[str, Any] | None
    """The new status, or ``None`` when it did not change."""
    plan: planning.Plan | None


class Blocked(Exception):
    """The pass cannot act: a Secret is missing, a child's name is taken by an object that is
    not ours, or the API server refused a write. Reported as ``Degraded`` and an Event."""

    def __init__(self, reason: conditions.Reason, message: str) -> None:
        super().__init__(message)
        self.blocker = statuses.Blocker(reason, message)


def _secret_problem(message: str) -> Blocked:
    return Blocked(conditions.Reason.SECRET_NOT_FOUND, message)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


async def _secret_inputs(ctx: Context, spec: ManagerSpec, owner: Owner) -> SecretInputs:
    kube = ctx.kube

    async def value(name: str, key: str, what: str) -> bytes:
        data = await asyncio.to_thread(kube.secret_data, owner.namespace, name)
        if data is None:
            raise _secret_problem(f"{what}: Secret {name!r} not found")
        if key not in data:
            raise _secret_problem(f"{what}: Secret {name!r} has no key {key!r}")
        return data[key]

    db = spec.database.secret_ref
    local = spec.master_key.local_secret_ref
    tls: dict[str, bytes] = {}
    if spec.tls is not None:
        name = spec.tls.secret_ref.name
        data = await asyncio.to_thread(kube.secret_data, owner.namespace, name)
        if data is None:
            raise _secret_problem(f"spec.tls.secretRef: Secret {name!r} not found")
        missing = {"tls.crt", "tls.key"} - set(data)
        if missing:
            raise _secret_problem(f"spec.tls.secretRef: Secret {name!r} lacks {sorted(missing)}")
        tls = {k: v for k, v in data.items() if k in ("tls.crt", "tls.key", "ca.crt")}
    return SecretInputs(
        database_url=await value(db.name, db.key, "spec.database.secretRef"),
        local_secret=await value(local.name, local.key, "spec.masterKey.localSecretRef"),
        api_key=await _api_key(ctx, owner),
        tls=tls,
    )


async def _api_key(ctx: Context, owner: Owner) -> bytes:
    """The bootstrap API key, created (random, once) when its Secret does not exist. A Secret of
    that name that is not ours is neither read nor mounted: it blocks the pass."""
    name = names.api_key_secret_name(owner.name)
    for _attempt in range(2):
        body = await asyncio.to_thread(ctx.kube.get, "v1", "Secret", owner.namespace, name)
        if body is None:
            key = secrets.token_urlsafe(32)
            created = await _write(ctx, owner, manifests.api_key_secret(owner, key), None)
            if created:
                ctx.event("Normal", "ApiKeyCreated", f"created the bootstrap API key Secret {name}")
                return key.encode()
            continue  # the name was taken meanwhile: look at what took it
        found = ownership.conflict(body, "Secret", owner.uid)
        if found is not None:
            raise Blocked(conditions.Reason.OWNERSHIP_CONFLICT, found.message)
        data = await asyncio.to_thread(ctx.kube.secret_data, owner.namespace, name)
        if not data or not data.get(names.API_KEY_SECRET_KEY):
            raise _secret_problem(
                f"Secret {name!r} exists but has no key {names.API_KEY_SECRET_KEY!r}"
            )
        return data[names.API_KEY_SECRET_KEY]
    raise Blocked(conditions.Reason.OWNERSHIP_CONFLICT, f"Secret {name} keeps changing hands")


async def _write(
    ctx: Context, owner: Owner, manifest: dict[str, Any], live: dict[str, Any] | None
) -> bool:
    """Create ``manifest`` (``live`` is None) or apply it to ``live``, which must be ours.
    ``False`` when a create found the name taken. A refused write blocks the pass."""
    try:
        if live is None:
            return await asyncio.to_thread(ctx.kube.create, manifest) is not None
        await asyncio.to_thread(ctx.kube.apply, ownership.pinned(manifest, live))
        return True
    except kubeapi.Refused as exc:
        raise Blocked(conditions.Reason.APPLY_FAILED, str(exc)) from exc


async def _live(ctx: Context, owner: Owner, manifest: dict[str, Any]) -> dict[str, Any] | None:
    meta = manifest["metadata"]
    return await asyncio.to_thread(
        ctx.kube.get, manifest["apiVersion"], manifest["kind"], owner.namespace, meta["name"]
    )


async def _apply_children(
    ctx: Context, spec: ManagerSpec, owner: Owner, replicas: int, secrets_hash: str
) -> bool:
    """Write every child; ``True`` when this pass created the StatefulSet.

    Every child's name is checked first: if any is taken by an object that is not ours, nothing
    is written at all (``Blocked``). Children the spec switched off are deleted only if ours.
    """
    sm_api = await asyncio.to_thread(ctx.kube.service_monitor_api)
    wanted = manifests.children(
        spec,
        owner,
        replicas=replicas,
        default_repository=ctx.settings.node_image_repository,
        secrets_hash=secrets_hash,
        service_monitor_api=sm_api,
    )
    live = [await _live(ctx, owner, m) for m in wanted]
    conflicts = [
        found
        for manifest, body in zip(wanted, live, strict=True)
        if body is not None
        and (found := ownership.conflict(body, manifest["kind"], owner.uid)) is not None
    ]
    if conflicts:
        raise Blocked(conditions.Reason.OWNERSHIP_CONFLICT, "; ".join(c.message for c in conflicts))
    created_statefulset = False
    for manifest, body in zip(wanted, live, strict=True):
        if not await _write(ctx, owner, manifest, body):
            raise Blocked(
                conditions.Reason.OWNERSHIP_CONFLICT,
                f"{manifest['kind']} {manifest['metadata']['name']} was created by someone "
                "else while the operator was creating it",
            )
        if body is None and manifest["kind"] == "StatefulSet":
            created_statefulset = True
    for api_version, kind, name in manifests.unwanted_children(spec, owner):
        if api_version.startswith("monitoring.coreos.com") and not sm_api:
            continue
        body = await asyncio.to_thread(ctx.kube.get, api_version, kind, owner.namespace, name)
        if body is None or not ownership.is_ours(body, owner.uid):
            continue  # not there, or somebody else's: never ours to delete
        uid = ownership.uid_of(body)
        if await asyncio.to_thread(ctx.kube.delete, api_version, kind, owner.namespace, name, uid):
            ctx.event("Normal", "ChildDeleted", f"deleted {kind} {name} (switched off in spec)")
    return created_statefulset


async def _scale(
    ctx: Context, spec: ManagerSpec, owner: Owner, replicas: int, secrets_hash: str
) -> None:
    """Set the StatefulSet's replicas (the planner's one step), if it is still ours."""
    manifest = manifests.statefulset(
        spec,
        owner,
        replicas=replicas,
        image=manifests.node_image(spec, ctx.settings.node_image_repository),
        secrets_hash=secrets_hash,
    )
    live = await _live(ctx, owner, manifest)
    if live is None or not ownership.is_ours(live, owner.uid):
        raise Blocked(
            conditions.Reason.OWNERSHIP_CONFLICT,
            f"StatefulSet {manifest['metadata']['name']} is gone or no longer ours",
        )
    await _write(ctx, owner, manifest, live)


def _targets(ctx: Context, owner: Owner, pods: list[planning.PodState]) -> list[nodeapi.Target]:
    """Ready pods the operator may dial, lowest ordinal first."""
    return [
        nodeapi.Target(
            address=p.ip or "",
            server_name=f"{p.name}.{names.headless_service_name(owner.name)}.{owner.namespace}.svc",
        )
        for p in pods
        if p.ready and not p.terminating and ctx.settings.may_dial(p.ip)
    ]


async def _node_reports(
    api: nodeapi.NodeApi, targets: list[nodeapi.Target]
) -> tuple[list[statuses.NodeReport], str | None]:
    error = None
    for target in targets[:3]:
        try:
            return await api.list_nodes(target), None
        except (nodeapi.NodeApiError, OSError, TimeoutError, ValueError) as exc:
            error = f"{target.address}: {exc}"
        except Exception as exc:  # aiohttp.ClientError and friends
            error = f"{target.address}: {type(exc).__name__}: {exc}"
    return [], error


async def reconcile_pass(
    ctx: Context,
    *,
    name: str,
    namespace: str,
    uid: str,
    generation: int,
    spec_body: Mapping[str, Any],
    status_body: Mapping[str, Any] | None,
) -> PassResult:
    started = time.monotonic()
    try:
        result = await _reconcile(
            ctx,
            name=name,
            namespace=namespace,
            uid=uid,
            generation=generation,
            spec_body=spec_body,
            status_body=dict(status_body or {}),
        )
    except Exception:
        metrics.RECONCILES.labels("error").inc()
        raise
    finally:
        metrics.RECONCILE_SECONDS.observe(time.monotonic() - started)
    metrics.RECONCILES.labels("ok").inc()
    return result


async def _reconcile(
    ctx: Context,
    *,
    name: str,
    namespace: str,
    uid: str,
    generation: int,
    spec_body: Mapping[str, Any],
    status_body: dict[str, Any],
) -> PassResult:
    spec = ManagerSpec.parse(spec_body)
    owner = Owner(name=name, namespace=namespace, uid=uid)
    kube = ctx.kube
    now = _now()
    sts_name = names.statefulset_name(name)

    sts_body = await asyncio.to_thread(kube.get, "apps/v1", "StatefulSet", namespace, sts_name)
    pods = observations.pod_states(
        name, await asyncio.to_thread(kube.list_pods, namespace, names.selector_string(name))
    )
    world = planning.World(
        desired=spec.nodes,
        paused=spec.paused,
        ready_timeout=datetime.timedelta(seconds=spec.node_ready_timeout_seconds),
        now=now,
        statefulset=observations.set_state(sts_body),
        pods=pods,
        launch=statuses.launch_of(status_body),
    )

    try:
        inputs = await _secret_inputs(ctx, spec, owner)
        # 2. Children, with the StatefulSet at its current size (the planner changes it below).
        current = world.statefulset
        replicas = current.replicas if current else planning.initial_replicas(spec.nodes)
        secrets_hash = manifests.config_hash(inputs)
        if await _apply_children(ctx, spec, owner, replicas, secrets_hash):
            ctx.event("Normal", "Created", f"created StatefulSet {sts_name} with {replicas} node")
            world = dataclasses.replace(world, launch=planning.initial_launch(name, now))
    except Blocked as exc:
        return _blocked(ctx, exc.blocker, name, generation, spec, world, status_body)

    # 3. Observe again after the apply (a template change bumps the generation).
    sts_body = await asyncio.to_thread(kube.get, "apps/v1", "StatefulSet", namespace, sts_name)
    raw_pods = await asyncio.to_thread(kube.list_pods, namespace, names.selector_string(name))
    pods = observations.pod_states(name, raw_pods)
    uids = {p["metadata"]["name"]: p["metadata"].get("uid") for p in raw_pods}
    api = nodeapi.NodeApi(
        (inputs.api_key or b"").decode(),
        inputs.tls.get("ca.crt") or inputs.tls.get("tls.crt"),
        ctx.settings.node_api_timeout_seconds,
    )
    targets = _targets(ctx, owner, pods)
    reports: list[statuses.NodeReport] = []
    api_error = None
    if targets:
        reports, api_error = await _node_reports(api, targets)
        if api_error:
            metrics.NODE_API_ERRORS.labels(namespace, name).inc()
    world = dataclasses.replace(
        world,
        statefulset=observations.set_state(sts_body),
        pods=pods,
        node_statuses={r.name: r.status for r in reports},
    )

    # 4. One action.
    plan = planning.plan(world, name)
    action = plan.action
    replaced = None
    previous_degraded = conditions.find(status_body.get("conditions"), conditions.Type.DEGRADED)
    if action.kind in (planning.Kind.SCALE_UP, planning.Kind.SCALE_DOWN):
        assert action.replicas is not None
        try:
            await _scale(ctx, spec, owner, action.replicas, secrets_hash)
        except Blocked as exc:
            return _blocked(ctx, exc.blocker, name, generation, spec, world, status_body)
        ctx.event("Normal", action.reason, action.message)
        metrics.ACTIONS.labels(namespace, name, action.kind).inc()
    elif action.kind is planning.Kind.REPLACE_POD:
        assert action.pod is not None
        if await asyncio.to_thread(kube.delete_pod, namespace, action.pod, uids.get(action.pod)):
            replaced = action.pod
            ctx.event(
                "Normal",
                action.reason,
                f"{action.message}; target version {spec.version}",
            )
            metrics.ACTIONS.labels(namespace, name, action.kind).inc()
        else:
            # Nothing was deleted: no launch began.
            plan = dataclasses.replace(plan, launch=world.launch)
    elif action.kind is planning.Kind.STALLED and not (
        previous_degraded
        and previous_degraded.get("status") == "True"
        and previous_degraded.get("reason") == action.reason
    ):
        ctx.event("Warning", action.reason, action.message)
    metrics.STALLED.labels(namespace, name).set(1 if action.kind is planning.Kind.STALLED else 0)

    decommissioned = []
    for node in plan.decommission:
        if not targets:
            break
        try:
            code = await api.decommission(targets[0], node)
        except Exception as exc:
            api_error = f"decommission {node}: {type(exc).__name__}: {exc}"
            metrics.NODE_API_ERRORS.labels(namespace, name).inc()
            continue
        if code in (200, 204):
            decommissioned.append(node)
            ctx.event("Normal", "Decommissioned", f"decommissioned offline node {node}")
            metrics.ACTIONS.labels(namespace, name, "Decommission").inc()

    lb_address = None
    if spec.load_balancer.enabled:
        lb = await asyncio.to_thread(
            kube.get, "v1", "Service", namespace, names.load_balancer_service_name(name)
        )
        lb_address = observations.load_balancer_address(lb)

    # Tell the managers how agents connect, once per change (remembered in the status).
    agents = manifests.agent_settings(spec, lb_address or status_body.get("loadBalancerAddress"))
    agent_applied = status_body.get("agentSettings")
    wanted = None if agents is None else {"mode": spec.agent_connection, **agents}
    # A merge patch drops null values from the status, so compare with absent keys as None.
    recorded = {k: (agent_applied or {}).get(k) for k in wanted or ()}
    if wanted is not None and agents is not None and targets and wanted != recorded:
        try:
            await api.patch_settings(targets[0], agents)
        except Exception as exc:
            api_error = f"PATCH settings: {type(exc).__name__}: {exc}"
            metrics.NODE_API_ERRORS.labels(namespace, name).inc()
        else:
            agent_applied = wanted
            ctx.event(
                "Normal",
                "AgentConnectionSet",
                f"agents connect via {spec.agent_connection}"
                + (
                    f" ({agents['managerAddress']}:{agents['managerPort']})"
                    if agents.get("managerAddress")
                    else ""
                ),
            )

    # 5. Status.
    obs = statuses.Observation(
        cr_name=name,
        generation=generation,
        spec=spec,
        world=world,
        plan=plan,
        reports=reports,
        node_api_error=api_error,
        replaced_pod=replaced,
        decommissioned=decommissioned,
        load_balancer_address=lb_address,
    )
    new = statuses.build(obs, status_body)
    if agent_applied:
        # Stored without nulls, exactly as a merge patch leaves it, so an unchanged value
        # does not count as a status change.
        new["agentSettings"] = {k: v for k, v in agent_applied.items() if v is not None}
    _export(namespace, name, new)
    previous_rollout = status_body.get("rollout") or {}
    rollout = new.get("rollout") or {}
    if rollout.get("state") == statuses.RolloutState.COMPLETE and previous_rollout.get("state") in (
        statuses.RolloutState.IN_PROGRESS,
        statuses.RolloutState.STALLED,
    ):
        ctx.event(
            "Normal",
            "RolloutComplete",
            f"every node runs revision {rollout.get('targetRevision')} "
            f"(version {rollout.get('targetVersion')})",
        )
    ctx.logger.debug("plan for %s/%s: %s", namespace, name, action)
    return PassResult(statuses.patch(status_body, new) or None, plan)


def _blocked(
    ctx: Context,
    blocker: statuses.Blocker,
    name: str,
    generation: int,
    spec: ManagerSpec,
    world: planning.World,
    status_body: dict[str, Any],
) -> PassResult:
    """The status of a pass that could not act, and a Warning Event when it is news."""
    obs = statuses.Observation(
        cr_name=name,
        generation=generation,
        spec=spec,
        world=world,
        plan=planning.plan(dataclasses.replace(world, paused=True), name),
        blocked=blocker,
    )
    new = statuses.build(obs, status_body)
    if "agentSettings" in status_body:
        new["agentSettings"] = status_body["agentSettings"]
    change = statuses.patch(status_body, new)
    if change:
        ctx.event("Warning", blocker.reason, blocker.message)
        return PassResult(change, None)
    return PassResult(None, None)


def _export(namespace: str, name: str, status: Mapping[str, Any]) -> None:
    for state, key in (
        ("desired", "desiredNodes"),
        ("current", "currentNodes"),
        ("ready", "readyNodes"),
        ("updated", "updatedNodes"),
    ):
        metrics.NODES.labels(namespace, name, state).set(int(status.get(key) or 0))
