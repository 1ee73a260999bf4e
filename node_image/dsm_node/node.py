"""One manager node: the composition root that builds the node's parts and starts their loops.

Start-up order matters: the API comes up first (``/healthz`` answers during a long migration, so
probes never kill a migrating node), then the node joins (``cluster.joining``: versions, master
key, migrations, registration in one transaction), then it builds its services and starts
claiming. Its phase (``cluster.lease.Phase``) is kept by ``cluster.leasing.Lease``; the rules of
its changes are the pure ``cluster.lease.step``.

Once online, independent loops run, so that none can hold up another: the lease (heartbeats, on a
connection of its own; ``cluster.leasing``), the sweep (declares silent peers offline, returns their
jobs and jobs past their deadline to the pool; ``cluster.sweeping``), the refresh (cluster
settings, master keys, gauges), the claim loop and the outcome recorder (``jobs.worker``), the
periodic scheduler and the LISTEN connection. A heartbeat is never late because a sweep is stuck
behind a frozen peer, and settings are re-read even while sweeps fail.

What the node hands its parts once it has joined is typed and never ``None`` (``services``): job
handlers get ``JobServices``, the API ``Shared`` (plus its own database gateways).
"""

from __future__ import annotations

import asyncio
import importlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import psycopg
import sqlalchemy.exc
from psycopg.conninfo import make_conninfo
from sqlalchemy.ext.asyncio import AsyncEngine

from dsm_node import crypto, faults, metrics
from dsm_node.agents import watching  # noqa: F401  (registers the agent job types)
from dsm_node.caches import Caches
from dsm_node.cluster import joining, lease, sweeping
from dsm_node.cluster.lease import Event, Phase
from dsm_node.cluster.leasing import Lease, LeaseKeeper, Registration, WorkEffects
from dsm_node.cluster.live import LiveSettings
from dsm_node.cluster.membership import Decommissioned, Membership
from dsm_node.config import NodeConfig
from dsm_node.db.engine import create_engine, libpq_url
from dsm_node.db.queries import Q
from dsm_node.jobs import builtin  # noqa: F401  (registers the built-in job types)
from dsm_node.jobs.pool import JobPool
from dsm_node.jobs.worker import Worker, WorkerConfig
from dsm_node.keys import MasterKeys
from dsm_node.services import JobServices, Shared

log = logging.getLogger("dsm.node")

# The cluster settings are re-read at least this often (and every heartbeat interval if shorter).
SETTINGS_REFRESH_SECONDS = 5.0


class StartupError(RuntimeError):
    """The node cannot join the cluster; the message says why. Nothing was changed."""


@dataclass(frozen=True)
class Engines:
    """The node's connection pools. Membership has connections of its own (a heartbeat must never
    queue behind busy jobs), and the heartbeat one for itself (never behind a sweep)."""

    jobs: AsyncEngine
    membership: AsyncEngine
    heartbeat: AsyncEngine

    @classmethod
    def create(cls, cfg: NodeConfig, live: LiveSettings) -> Engines:
        return cls(
            create_engine(
                cfg.database_url,
                pool_size=cfg.db_pool_size,
                application_name=f"dsm-node:{cfg.node_name}",
                limits=live.job_limits,
            ),
            create_engine(
                cfg.database_url,
                pool_size=2,
                application_name=f"dsm-node:{cfg.node_name}:membership",
                limits=live.membership_limits,
            ),
            create_engine(
                cfg.database_url,
                pool_size=1,
                max_overflow=0,
                application_name=f"dsm-node:{cfg.node_name}:heartbeat",
                limits=live.membership_limits,
            ),
        )

    async def dispose(self) -> None:
        for engine in (self.jobs, self.membership, self.heartbeat):
            await engine.dispose()


@dataclass(frozen=True)
class Running:
    """Everything that exists once the node has joined."""

    engines: Engines
    membership: Membership
    pool: JobPool
    keys: MasterKeys
    worker: Worker
    keeper: LeaseKeeper
    shared: Shared


class Node:
    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.caches = Caches()
        self.lease = Lease()
        self.live = LiveSettings(
            {
                "heartbeat_interval_seconds": config.heartbeat_interval_seconds,
                "offline_threshold_seconds": config.offline_threshold_seconds,
            }
        )
        self._engines: Engines | None = None
        self._running: Running | None = None
        self._membership: Membership | None = None  # once registered
        self._tasks: list[asyncio.Task[Any]] = []

    # -- what probes and the API read (services.NodeState) ----------------------------------

    @property
    def name(self) -> str:
        return self.config.node_name

    @property
    def phase(self) -> Phase:
        return self.lease.phase

    def shared(self) -> Shared | None:
        return self._running.shared if self._running is not None else None

    @property
    def node_id(self) -> int | None:
        """The id this node is registered under (the agent channel records heartbeats with it)."""
        return self.lease.identity.node_id if self.lease.identity is not None else None

    def not_ready_reasons(self) -> list[str]:
        phase = self.lease.phase
        if phase is Phase.UPGRADE_REQUIRED:
            return [f"Offline (Upgrade Required): {self.lease.upgrade_reason}"]
        if phase is Phase.DECOMMISSIONED:
            return ["Decommissioned: this node was removed from the cluster"]
        reasons = []
        if self.lease.identity is None:
            reasons.append(f"not registered ({phase})")
        elif phase is Phase.JOINING:
            # registered, but the services the API needs are not built yet (503 'not ready yet')
            reasons.append("registered, still joining")
        if phase is Phase.FENCED:
            reasons.append("database unreachable: stopped working until it is back")
        if phase is Phase.REJOINING:
            reasons.append("lost its lease: rejoining the cluster if it may")
        if phase is Phase.STOPPING:
            reasons.append("shutting down")
        age = self.lease.age()
        if age is not None and age > 2 * self.live.timing.heartbeat_interval + 1:
            reasons.append(f"last successful heartbeat {age:.0f} s ago")
        return reasons

    def degraded_reasons(self) -> list[str]:
        alerts = self._running.keeper.alerts if self._running is not None else {}
        return [f"{kind}: {message}" for kind, message in alerts.items()]

    # -- life -----------------------------------------------------------------------------

    async def start(self) -> None:
        cfg = self.config
        for module in filter(None, (m.strip() for m in cfg.job_modules.split(","))):
            importlib.import_module(module)
        secret = cfg.secret("local_secret")
        if not secret:
            raise StartupError(
                "no local secret: set DSM_LOCAL_SECRET or DSM_LOCAL_SECRET_FILE (the same on "
                "every node; it unlocks the cluster's master key)"
            )
        wrapper = crypto.LocalSecretWrapper(secret.encode())
        engines = self._engines = Engines.create(cfg, self.live)
        seed: dict[str, float] = {}
        if cfg.offline_threshold_seconds:
            seed["offline_threshold_seconds"] = cfg.offline_threshold_seconds
        if cfg.heartbeat_interval_seconds:
            seed["heartbeat_interval_seconds"] = cfg.heartbeat_interval_seconds
        await self.lease.advance(Event.JOIN, self.live.timing)
        try:
            await joining.wait_for_name(
                engines.jobs, cfg.node_name, cfg.heartbeat_interval_seconds or 10.0
            )
            joined = await joining.join(
                engines.jobs,
                name=cfg.node_name,
                address=cfg.address,
                api_port=cfg.api_port,
                version=cfg.software_version,
                wrapper=wrapper,
                bootstrap=joining.Bootstrap(
                    cfg.admin_username,
                    cfg.secret("admin_password"),
                    cfg.secret("bootstrap_api_key"),
                    seed,
                ),
                extra_dirs=[cfg.extra_migrations_dir] if cfg.extra_migrations_dir else None,
                reuse_decommissioned_name=cfg.reuse_decommissioned_name,
            )
        except joining.UpgradeRequired as e:
            self.lease.upgrade_reason = str(e)
            await self.lease.advance(Event.UPGRADED, self.live.timing)
            return
        except (crypto.WrongSecret, joining.DuplicateName, Decommissioned, ValueError) as e:
            raise StartupError(str(e)) from None
        except (OSError, psycopg.OperationalError, sqlalchemy.exc.OperationalError) as e:
            raise StartupError(f"cannot reach the database: {_first_line(e)}") from None
        self.lease.registered(joined.identity)
        membership = self._membership = Membership(engines.membership, engines.heartbeat)
        await faults.point("startup")  # registered Online, services not built yet
        await self.live.refresh(engines.membership)
        log.info(
            "schema version %d, cluster version %s; heartbeat %g s, offline threshold %g s",
            joined.schema_version,
            joined.cluster_version,
            self.live.timing.heartbeat_interval,
            self.live.timing.offline_threshold,
        )
        self.live.announce_changes = True
        running = self._running = self._build(
            engines, membership, MasterKeys(wrapper, joined.keyring)
        )
        metrics.NODE.labels(cfg.node_name, cfg.software_version).set(1)
        metrics.initialize_job_series(running.pool.registry.types)
        await self.lease.advance(Event.JOINED, self.live.timing, running.keeper.effects)
        for coro in (
            running.worker.run(),
            running.worker.record_outcomes_forever(),
            running.keeper.run(),
            sweeping.sweep_forever(
                membership, self.live, lambda: self.lease.phase in lease.SWEEPING
            ),
            self._refresh_forever(running),
            self._schedule_forever(running),
            self._listen_forever(running),
        ):
            self._tasks.append(asyncio.create_task(coro))
        log.info(
            "online: %s at %s:%d, version %s",
            cfg.node_name,
            cfg.address,
            cfg.api_port,
            cfg.software_version,
        )

    def _build(self, engines: Engines, membership: Membership, keys: MasterKeys) -> Running:
        """The services of a joined node, wired together."""
        cfg = self.config
        pool = JobPool(engines.jobs)
        worker = Worker(
            pool,
            self.lease.me,
            JobServices(cfg.node_name, engines.jobs, self.live, keys, self.caches),
            WorkerConfig(
                concurrency=cfg.concurrency,
                batch=cfg.claim_batch,
                # transactional jobs each hold a connection; two stay free to claim and complete
                transactional_concurrency=max(1, cfg.db_pool_size - 2),
            ),
        )
        keeper = LeaseKeeper(
            self.lease,
            membership,
            self.live,
            WorkEffects(self.lease, worker, pool.release, self.caches),
            Registration(cfg.node_name, cfg.address, cfg.api_port, cfg.software_version),
            cfg.clock_offset_seconds,
        )
        shared = Shared(cfg.node_name, cfg.software_version, self.live, keys, self.caches)
        return Running(engines, membership, pool, keys, worker, keeper, shared)

    async def stop(self) -> None:
        """Graceful halt: stop claiming, let running jobs finish within the grace period,
        release the rest, and show Offline at once."""
        if self.lease.phase in (Phase.STOPPING, Phase.STOPPED):
            return
        await self.lease.advance(Event.STOP, self.live.timing)
        log.info("stopping")
        if (r := self._running) is not None:
            me = self.lease.me()
            cut = await r.worker.drain(self.config.shutdown_grace_seconds)
            try:
                if cut:
                    n = await r.pool.release(me.node_id, cut, "released at shutdown")
                    log.info("released %d unfinished jobs back to the pool", n)
            except Exception as e:
                log.warning(
                    "could not release %d unfinished jobs (%s); peers take them over",
                    len(cut),
                    _first_line(e),
                )
            if r.worker.unrecorded_outcomes:
                log.warning(
                    "%d job outcomes could not be recorded; their deadline returns the jobs to "
                    "the pool",
                    r.worker.unrecorded_outcomes,
                )
        if self._membership is not None and self.lease.identity is not None:
            # also when stopped between registering and building the services: peers must not
            # wait out the threshold for a node that has said goodbye
            try:
                await self._membership.leave(self.lease.me(), "halted")
                log.info("marked offline")
            except Exception as e:
                log.warning("could not mark this node offline: %s", _first_line(e))
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._engines is not None:
            await self._engines.dispose()
        await self.lease.advance(Event.STOPPED, self.live.timing)

    # -- background loops -----------------------------------------------------------------

    async def _refresh_forever(self, r: Running) -> None:
        """Re-reads the cluster settings, the master keys and the gauges on a schedule of their
        own: a stuck or failing sweep does not stop them, nor does a bad stored value."""
        failing: set[str] = set()
        steps: tuple[tuple[str, Callable[[], Awaitable[None]]], ...] = (
            ("settings", lambda: self.live.refresh(r.engines.membership)),
            ("master keys", lambda: r.keys.reload(r.engines.jobs)),
            ("gauges", lambda: self._refresh_gauges(r)),
        )
        while True:
            changed = self.live.watch()
            for name, step in steps:
                try:
                    await step()
                    failing.discard(name)
                except Exception as e:
                    if name not in failing:
                        log.warning("could not refresh %s: %s", name, _first_line(e))
                    failing.add(name)
            await self.live.pause(
                min(SETTINGS_REFRESH_SECONDS, self.live.timing.heartbeat_interval), since=changed
            )

    async def _refresh_gauges(self, r: Running) -> None:
        depth = await r.pool.queue_depth()
        peers = await r.membership.list_nodes(self.live.timing.offline_threshold)
        metrics.QUEUE_DEPTH.clear()
        for d in depth:
            metrics.QUEUE_DEPTH.labels(d.type, d.state).set(d.jobs)
        metrics.NODE_STATUS.clear()
        for peer in peers:
            metrics.NODE_STATUS.labels(peer.name, peer.status).set(1)

    async def _schedule_forever(self, r: Running) -> None:
        periods = [p.every for p in r.pool.registry.periodic.values()] or [60.0]
        tick = max(0.5, min(5.0, min(periods) / 4))
        while True:
            if r.worker.claiming:
                try:
                    await r.pool.schedule_periodic()
                except Exception as e:
                    log.warning("periodic scheduling failed: %s", _first_line(e))
            await asyncio.sleep(tick)

    async def _listen_forever(self, r: Running) -> None:
        """Wakes the claim loop on NOTIFY; polling covers any gap while this is reconnecting."""
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(
                    make_conninfo(
                        libpq_url(self.config.database_url), **self.live.timing.client_tcp()
                    ),
                    autocommit=True,
                    connect_timeout=5,
                )
                async with conn:
                    await conn.execute(Q.sql["listen_jobs"])
                    async for _ in conn.notifies():
                        r.worker.wake()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.debug("listen connection lost: %s", _first_line(e))
            await asyncio.sleep(2.0)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:300]
