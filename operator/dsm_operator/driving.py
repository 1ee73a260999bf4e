"""One reconcile pass: observe through the gateways, decide with ``reconcile``, act once.

This is the only module that combines I/O and decisions; every decision itself is a pure
function in ``reconcile/``. A pass is idempotent and level-based, and reads as a list of named
steps (in the manner of CloudNativePG's reconciler), each a small function below:

1. :func:`_inputs` -- the spec, what exists now, the referenced Secrets (and the operator's own
   API-key Secret, created once);
2. :func:`_children` -- every child written, after checking each name is ours
   (``ownership``), the StatefulSet at its *current* replica count;
3. :func:`_observe` -- the StatefulSet and pods read back, the managers' node list;
4. :func:`_act` -- the one action ``planning.plan`` chose (replicas up or down by one, or one pod
   deleted);
5. :func:`_decommission` -- offline nodes that were scaled away;
6. :func:`_agent_settings` -- how agents connect, written to the managers once per change;
7. :func:`_report` -- the status (as a merge patch, only when it changed), Events, metrics.

Steps 1, 2 and 4 may find that the pass cannot act (a missing Secret, a child's name taken by
an object that is not ours, a write the API server refuses): they raise :class:`Blocked`, and
:func:`_report_blocked` says so in the status instead.

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
    agents,
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
    """The status merge patch (``None`` values remove keys), or ``None`` when nothing changed."""
    plan: planning.Plan | None


class Blocked(Exception):
    """The pass cannot act: a Secret is missing, a child's name is taken by an object that is
    not ours, or the API server refused a write. Reported as ``Degraded`` and an Event."""

    def __init__(self, reason: conditions.Reason, message: str) -> None:
        super().__init__(message)
        self.blocker = statuses.Blocker(reason, message)


def _secret_problem(message: str) -> Blocked:
    return Blocked(conditions.Reason.SECRET_NOT_FOUND, message)


@dataclasses.dataclass
class Pass:
    """What one pass knows so far; each step reads it and adds to it."""

    ctx: Context
    owner: Owner
    generation: int
    spec: ManagerSpec
    previous: dict[str, Any]
    """The status as the pass found it."""
    world: planning.World
    inputs: SecretInputs = dataclasses.field(default_factory=SecretInputs)
    secrets_hash: str = ""
    pod_uids: dict[str, str | None] = dataclasses.field(default_factory=dict)
    node_api: nodeapi.NodeApi | None = None
    targets: list[nodeapi.Target] = dataclasses.field(default_factory=list)
    reports: list[statuses.NodeReport] = dataclasses.field(default_factory=list)
    node_api_error: str | None = None
    plan: planning.Plan | None = None
    replaced: str | None = None
    decommissioned: list[str] = dataclasses.field(default_factory=list)
    load_balancer_address: str | None = None
    agent_load_balancer_address: str | None = None
    agent_record: dict[str, Any] | None = None

    @property
    def name(self) -> str:
        return self.owner.name

    @property
    def namespace(self) -> str:
        return self.owner.namespace

    def node_api_failed(self, error: str) -> None:
        self.node_api_error = error
        metrics.NODE_API_ERRORS.labels(self.namespace, self.name).inc()


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
            Owner(name=name, namespace=namespace, uid=uid),
            generation,
            ManagerSpec.parse(spec_body),
            dict(status_body or {}),
        )
    except Exception:
        metrics.RECONCILES.labels("error").inc()
        raise
    finally:
        metrics.RECONCILE_SECONDS.observe(time.monotonic() - started)
    metrics.RECONCILES.labels("ok").inc()
    return result


async def _reconcile(
    ctx: Context, owner: Owner, generation: int, spec: ManagerSpec, previous: dict[str, Any]
) -> PassResult:
    run = Pass(
        ctx=ctx,
        owner=owner,
        generation=generation,
        spec=spec,
        previous=previous,
        world=await _world(ctx, owner, spec, previous),
    )
    try:
        await _inputs(run)
        await _children(run)
        await _observe(run)
        await _act(run)
    except Blocked as exc:
        return _report_blocked(run, exc.blocker)
    await _decommission(run)
    await _agent_settings(run)
    return _report(run)


# --- 1. inputs --------------------------------------------------------------------------------


async def _world(
    ctx: Context, owner: Owner, spec: ManagerSpec, previous: Mapping[str, Any]
) -> planning.World:
    """What exists now, before anything is written."""
    kube = ctx.kube
    sts = await asyncio.to_thread(
        kube.get, "apps/v1", "StatefulSet", owner.namespace, names.statefulset_name(owner.name)
    )
    raw_pods = await asyncio.to_thread(
        kube.list_pods, owner.namespace, names.selector_string(owner.name)
    )
    return planning.World(
        desired=spec.nodes,
        paused=spec.paused,
        ready_timeout=datetime.timedelta(seconds=spec.node_ready_timeout_seconds),
        now=datetime.datetime.now(datetime.UTC),
        statefulset=observations.set_state(sts),
        pods=observations.pod_states(owner.name, raw_pods),
        launch=statuses.launch_of(previous),
    )


async def _inputs(run: Pass) -> None:
    """The Secrets the pods read (a missing one blocks the pass) and their hash."""
    kube, spec, namespace = run.ctx.kube, run.spec, run.namespace

    async def value(name: str, key: str, what: str) -> bytes:
        data = await asyncio.to_thread(kube.secret_data, namespace, name)
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
        data = await asyncio.to_thread(kube.secret_data, namespace, name)
        if data is None:
            raise _secret_problem(f"spec.tls.secretRef: Secret {name!r} not found")
        missing = {"tls.crt", "tls.key"} - set(data)
        if missing:
            raise _secret_problem(f"spec.tls.secretRef: Secret {name!r} lacks {sorted(missing)}")
        tls = {k: v for k, v in data.items() if k in ("tls.crt", "tls.key", "ca.crt")}
    run.inputs = SecretInputs(
        database_url=await value(db.name, db.key, "spec.database.secretRef"),
        local_secret=await value(local.name, local.key, "spec.masterKey.localSecretRef"),
        api_key=await _api_key(run),
        tls=tls,
    )
    run.secrets_hash = manifests.config_hash(run.inputs)


async def _api_key(run: Pass) -> bytes:
    """The bootstrap API key, created (random, once) when its Secret does not exist. A Secret of
    that name that is not ours is neither read nor mounted: it blocks the pass."""
    ctx, owner = run.ctx, run.owner
    name = names.api_key_secret_name(owner.name)
    for _attempt in range(2):
        body = await asyncio.to_thread(ctx.kube.get, "v1", "Secret", owner.namespace, name)
        if body is None:
            key = secrets.token_urlsafe(32)
            if await _write(ctx, manifests.api_key_secret(owner, key), None):
                ctx.event("Normal", "ApiKeyCreated", f"created the bootstrap API key Secret {name}")
                return key.encode()
            continue  # the name was taken meanwhile: look at what took it
        found = ownership.conflict(body, "Secret", owner.uid)
        if found is not None:
            raise Blocked(conditions.Reason.OWNERSHIP_CONFLICT, found.message)
        value = kubeapi.secret_values(body).get(names.API_KEY_SECRET_KEY)
        if not value:
            raise _secret_problem(
                f"Secret {name!r} exists but has no key {names.API_KEY_SECRET_KEY!r}"
            )
        return value
    raise Blocked(conditions.Reason.OWNERSHIP_CONFLICT, f"Secret {name} keeps changing hands")


# --- 2. children ------------------------------------------------------------------------------


async def _children(run: Pass) -> None:
    """Write every child, the StatefulSet at its current size (the planner changes it later).

    Every child's name is checked first: if any is taken by an object that is not ours, nothing
    is written at all. Children the spec switched off are deleted only if ours.
    """
    ctx, spec, owner = run.ctx, run.spec, run.owner
    current = run.world.statefulset
    replicas = current.replicas if current else planning.initial_replicas(spec.nodes)
    sm_api = await asyncio.to_thread(ctx.kube.service_monitor_api)
    wanted = manifests.children(
        spec,
        owner,
        replicas=replicas,
        default_repository=ctx.settings.node_image_repository,
        secrets_hash=run.secrets_hash,
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
    for manifest, body in zip(wanted, live, strict=True):
        if not await _write(ctx, manifest, body):
            raise Blocked(
                conditions.Reason.OWNERSHIP_CONFLICT,
                f"{manifest['kind']} {manifest['metadata']['name']} was created by someone "
                "else while the operator was creating it",
            )
        if body is None and manifest["kind"] == "StatefulSet":
            name = manifest["metadata"]["name"]
            ctx.event("Normal", "Created", f"created StatefulSet {name} with {replicas} node")
            launch = planning.initial_launch(owner.name, run.world.now)
            run.world = dataclasses.replace(run.world, launch=launch)
    for api_version, kind, name in manifests.unwanted_children(spec, owner):
        if api_version.startswith("monitoring.coreos.com") and not sm_api:
            continue
        body = await asyncio.to_thread(ctx.kube.get, api_version, kind, owner.namespace, name)
        if body is None or not ownership.is_ours(body, owner.uid):
            continue  # not there, or somebody else's: never ours to delete
        uid = ownership.uid_of(body)
        if await asyncio.to_thread(ctx.kube.delete, api_version, kind, owner.namespace, name, uid):
            ctx.event("Normal", "ChildDeleted", f"deleted {kind} {name} (switched off in spec)")


async def _live(ctx: Context, owner: Owner, manifest: dict[str, Any]) -> dict[str, Any] | None:
    meta = manifest["metadata"]
    return await asyncio.to_thread(
        ctx.kube.get, manifest["apiVersion"], manifest["kind"], owner.namespace, meta["name"]
    )


async def _write(ctx: Context, manifest: dict[str, Any], live: dict[str, Any] | None) -> bool:
    """Create ``manifest`` (``live`` is None) or apply it to ``live``, which must be ours.
    ``False`` when a create found the name taken. A refused write blocks the pass."""
    try:
        if live is None:
            return await asyncio.to_thread(ctx.kube.create, manifest) is not None
        await asyncio.to_thread(ctx.kube.apply, ownership.pinned(manifest, live))
        return True
    except kubeapi.Refused as exc:
        raise Blocked(conditions.Reason.APPLY_FAILED, str(exc)) from exc


# --- 3. observe -------------------------------------------------------------------------------


async def _observe(run: Pass) -> None:
    """The StatefulSet and pods after the writes (a template change bumps the generation), and
    the managers' own view of the nodes."""
    ctx, owner = run.ctx, run.owner
    sts = await asyncio.to_thread(
        ctx.kube.get, "apps/v1", "StatefulSet", owner.namespace, names.statefulset_name(owner.name)
    )
    raw_pods = await asyncio.to_thread(
        ctx.kube.list_pods, owner.namespace, names.selector_string(owner.name)
    )
    pods = observations.pod_states(owner.name, raw_pods)
    run.pod_uids = {p["metadata"]["name"]: p["metadata"].get("uid") for p in raw_pods}
    run.node_api = nodeapi.NodeApi(
        (run.inputs.api_key or b"").decode(),
        run.inputs.tls.get("ca.crt") or run.inputs.tls.get("tls.crt"),
        ctx.settings.node_api_timeout_seconds,
    )
    run.targets = _targets(ctx, owner, pods)
    if run.targets:
        run.reports, error = await _node_reports(run.node_api, run.targets)
        if error:
            run.node_api_failed(error)
    run.world = dataclasses.replace(
        run.world,
        statefulset=observations.set_state(sts),
        pods=pods,
        node_statuses={r.name: r.status for r in run.reports},
    )


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


# --- 4. act -----------------------------------------------------------------------------------


async def _act(run: Pass) -> None:
    """Carry out the planner's one action."""
    ctx, spec = run.ctx, run.spec
    plan = run.plan = planning.plan(run.world, run.name)
    action = plan.action
    if action.kind in (planning.Kind.SCALE_UP, planning.Kind.SCALE_DOWN):
        assert action.replicas is not None
        await _scale(run, action.replicas)
        ctx.event("Normal", action.reason, action.message)
        metrics.ACTIONS.labels(run.namespace, run.name, action.kind).inc()
    elif action.kind is planning.Kind.REPLACE_POD:
        assert action.pod is not None
        uid = run.pod_uids.get(action.pod)
        if await asyncio.to_thread(ctx.kube.delete_pod, run.namespace, action.pod, uid):
            run.replaced = action.pod
            ctx.event("Normal", action.reason, f"{action.message}; target version {spec.version}")
            metrics.ACTIONS.labels(run.namespace, run.name, action.kind).inc()
        else:
            run.plan = planning.not_carried_out(plan, run.world)
    elif action.kind is planning.Kind.STALLED and not conditions.is_already(
        run.previous.get("conditions"),
        conditions.Type.DEGRADED,
        conditions.Status.TRUE,
        action.reason,
    ):
        ctx.event("Warning", action.reason, action.message)
    metrics.STALLED.labels(run.namespace, run.name).set(
        1 if action.kind is planning.Kind.STALLED else 0
    )


async def _scale(run: Pass, replicas: int) -> None:
    """Set the StatefulSet's replicas (the planner's one step), if it is still ours."""
    ctx, spec, owner = run.ctx, run.spec, run.owner
    manifest = manifests.statefulset(
        spec,
        owner,
        replicas=replicas,
        image=manifests.node_image(spec, ctx.settings.node_image_repository),
        secrets_hash=run.secrets_hash,
    )
    live = await _live(ctx, owner, manifest)
    if live is None or not ownership.is_ours(live, owner.uid):
        raise Blocked(
            conditions.Reason.OWNERSHIP_CONFLICT,
            f"StatefulSet {manifest['metadata']['name']} is gone or no longer ours",
        )
    await _write(ctx, manifest, live)


# --- 5. decommission --------------------------------------------------------------------------


async def _decommission(run: Pass) -> None:
    """Decommission the offline nodes the plan names, through a Ready manager."""
    assert run.plan is not None
    if not run.targets or run.node_api is None:
        return
    for node in run.plan.decommission:
        try:
            code = await run.node_api.decommission(run.targets[0], node)
        except Exception as exc:
            run.node_api_failed(f"decommission {node}: {type(exc).__name__}: {exc}")
            continue
        if code in (200, 204):
            run.decommissioned.append(node)
            run.ctx.event("Normal", "Decommissioned", f"decommissioned offline node {node}")
            metrics.ACTIONS.labels(run.namespace, run.name, "Decommission").inc()


# --- 6. agent settings ------------------------------------------------------------------------


async def _agent_settings(run: Pass) -> None:
    """Tell the managers how agents connect, once per change (remembered in the status)."""
    ctx, spec = run.ctx, run.spec
    if spec.load_balancer.enabled:
        lb = await asyncio.to_thread(
            ctx.kube.get,
            "v1",
            "Service",
            run.namespace,
            names.load_balancer_service_name(run.name),
        )
        run.load_balancer_address = observations.load_balancer_address(lb)
        agent_lb = await asyncio.to_thread(
            ctx.kube.get,
            "v1",
            "Service",
            run.namespace,
            names.agent_load_balancer_service_name(run.name),
        )
        run.agent_load_balancer_address = observations.load_balancer_address(agent_lb)
    recorded = run.previous.get("agentSettings")
    run.agent_record = recorded
    address = run.load_balancer_address or run.previous.get("loadBalancerAddress")
    agent_address = run.agent_load_balancer_address or run.previous.get("agentLoadBalancerAddress")
    change = agents.change(spec, address, recorded, agent_address)
    if change is None or not run.targets or run.node_api is None:
        return
    try:
        await run.node_api.patch_settings(run.targets[0], change.values)
    except Exception as exc:
        run.node_api_failed(f"PATCH settings: {type(exc).__name__}: {exc}")
        return
    run.agent_record = change.record
    ctx.event("Normal", "AgentConnectionSet", change.message)


# --- 7. report --------------------------------------------------------------------------------


def _report(run: Pass) -> PassResult:
    """The status, written only when it changed; the Events and metrics that go with it."""
    assert run.plan is not None
    obs = statuses.Observation(
        cr_name=run.name,
        generation=run.generation,
        spec=run.spec,
        world=run.world,
        plan=run.plan,
        reports=run.reports,
        node_api_error=run.node_api_error,
        replaced_pod=run.replaced,
        decommissioned=run.decommissioned,
        load_balancer_address=run.load_balancer_address,
        agent_load_balancer_address=run.agent_load_balancer_address,
    )
    new = statuses.build(obs, run.previous)
    if run.agent_record:
        new["agentSettings"] = run.agent_record
    _export(run.namespace, run.name, new)
    if statuses.rollout_completed(run.previous, new):
        rollout = new["rollout"]
        run.ctx.event(
            "Normal",
            "RolloutComplete",
            f"every node runs revision {rollout.get('targetRevision')} "
            f"(version {rollout.get('targetVersion')})",
        )
    run.ctx.logger.debug("plan for %s/%s: %s", run.namespace, run.name, run.plan.action)
    return PassResult(statuses.patch(run.previous, new) or None, run.plan)


def _report_blocked(run: Pass, blocker: statuses.Blocker) -> PassResult:
    """The status of a pass that could not act, and a Warning Event when it is news."""
    obs = statuses.Observation(
        cr_name=run.name,
        generation=run.generation,
        spec=run.spec,
        world=run.world,
        plan=planning.plan(dataclasses.replace(run.world, paused=True), run.name),
        blocked=blocker,
    )
    new = statuses.build(obs, run.previous)
    if "agentSettings" in run.previous:
        new["agentSettings"] = run.previous["agentSettings"]
    change = statuses.patch(run.previous, new)
    if not change:
        return PassResult(None, None)
    run.ctx.event("Warning", blocker.reason, blocker.message)
    return PassResult(change, None)


def _export(namespace: str, name: str, status: Mapping[str, Any]) -> None:
    for state, key in (
        ("desired", "desiredNodes"),
        ("current", "currentNodes"),
        ("ready", "readyNodes"),
        ("updated", "updatedNodes"),
    ):
        metrics.NODES.labels(namespace, name, state).set(int(status.get(key) or 0))
