"""One manager node: wires the database, membership, the job pool and the HTTPS API together.

Start-up order matters: the API comes up first (``/healthz`` answers during a long migration, so
probes never kill a migrating node), then the node joins (``cluster.joining``: versions, master
key, migrations, registration in one transaction), then it starts claiming.

Phases: starting -> joining -> online <-> fenced (database unreachable), and the terminal
upgrade_required / decommissioned (alive, working on nothing), stopping -> stopped.

Once online, independent loops run, so that none can hold up another: the heartbeat (on a
connection of its own), the sweep (declares silent peers offline, returns their jobs and jobs past
their deadline to the pool), the refresh (cluster settings, master keys, gauges), the claim loop and
the outcome recorder, the periodic scheduler and the LISTEN connection. A heartbeat is never late
because a sweep is stuck behind a frozen peer, and settings are re-read even while sweeps fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import time
from typing import Any

import psycopg
import sqlalchemy.exc
from psycopg.conninfo import make_conninfo
from sqlalchemy.ext.asyncio import AsyncEngine

from dsm_node import crypto, keys, metrics, settings_store
from dsm_node.agents import watching  # noqa: F401  (agent job types; issue 11)
from dsm_node.caches import Caches
from dsm_node.cluster import joining, timing
from dsm_node.cluster.membership import Decommissioned, Identity, Membership
from dsm_node.config import NodeConfig
from dsm_node.db.engine import SessionLimits, create_engine, libpq_url
from dsm_node.db.queries import Q
from dsm_node.jobs import builtin  # noqa: F401  (registers the built-in job types)
from dsm_node.jobs.pool import JobPool
from dsm_node.jobs.worker import Worker, WorkerConfig

log = logging.getLogger("dsm.node")


MAX_CLOCK_SKEW_SECONDS = 30.0
# The cluster settings are re-read at least this often (and every heartbeat interval if shorter).
SETTINGS_REFRESH_SECONDS = 5.0
TIME_ALERT = "Manager Time Out of Sync"


def _local_time_zone() -> str:
    return os.environ.get("TZ") or time.tzname[0]


class StartupError(RuntimeError):
    """The node cannot join the cluster; the message says why. Nothing was changed."""


class Node:
    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.caches = Caches()
        self.engine: AsyncEngine | None = None
        self.housekeeping_engine: AsyncEngine | None = None
        self.heartbeat_engine: AsyncEngine | None = None
        self.pool: JobPool | None = None
        self.membership: Membership | None = None
        self.worker: Worker | None = None
        self._identity: Identity | None = None
        self._settings = settings_store.ClusterSettings()
        self._timing, _ = timing.effective(
            self._settings.heartbeat_interval_seconds, self._settings.offline_threshold_seconds
        )
        # Session settings of the job pool's and of membership's connections (cluster.timing).
        self._job_limits = SessionLimits()
        self._membership_limits = SessionLimits()
        self._timing_changed = asyncio.Event()  # replaced after each change; wakes sleeping loops
        self._settings_problems: set[str] = set()
        self._last_heartbeat_ok: float | None = None
        self._skew: float | None = None
        self._fenced = False
        self.phase = "starting"  # see the module docstring
        self._tasks: list[asyncio.Task[Any]] = []
        self.keyring = crypto.Keyring()
        self.wrapper: crypto.KeyWrapper | None = None
        self.upgrade_reason: str | None = None
        self.alerts: dict[str, str] = {}  # open alerts raised by this node, by type

    # -- what the API and jobs read ---------------------------------------------------------

    @property
    def identity(self) -> Identity:
        assert self._identity is not None, "node is not registered yet"
        return self._identity

    async def settings(self) -> settings_store.ClusterSettings:
        """The cluster settings this node works with (re-read on the refresh loop's schedule)."""
        return self.cluster_settings

    @property
    def cluster_settings(self) -> settings_store.ClusterSettings:
        """The stored settings, with the heartbeat interval and offline threshold this node
        actually uses (stored values outside sane bounds are clamped; see cluster.timing)."""
        return self._settings.model_copy(
            update={
                "heartbeat_interval_seconds": self._timing.heartbeat_interval,
                "offline_threshold_seconds": self._timing.offline_threshold,
            }
        )

    def not_ready_reasons(self) -> list[str]:
        reasons = []
        if self.phase == "upgrade_required":
            return [f"Offline (Upgrade Required): {self.upgrade_reason}"]
        if self.phase == "decommissioned":
            return ["Decommissioned: this node was removed from the cluster"]
        if self._identity is None:
            reasons.append(f"not registered ({self.phase})")
        if self._fenced:
            reasons.append("database unreachable: stopped working until it is back")
        if self.phase == "stopping":
            reasons.append("shutting down")
        age = self.heartbeat_age()
        if age is not None and age > 2 * self._timing.heartbeat_interval + 1:
            reasons.append(f"last successful heartbeat {age:.0f} s ago")
        return reasons

    async def reload_keyring(self) -> None:
        """Picks up master-key versions added by a rotation on any node."""
        assert self.engine is not None and self.wrapper is not None
        async with self.engine.connect() as conn:
            ring = await keys.unlock(conn, self.wrapper)
        if ring is not None:
            self.keyring = ring

    async def decrypt(self, token: str, context: str) -> str:
        if crypto.Keyring.version_of(token) not in self.keyring.keys:
            await self.reload_keyring()
        return self.keyring.decrypt(token, context)

    def degraded_reasons(self) -> list[str]:
        return [f"{kind}: {message}" for kind, message in self.alerts.items()]

    def heartbeat_age(self) -> float | None:
        if self._last_heartbeat_ok is None:
            return None
        return time.monotonic() - self._last_heartbeat_ok

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
        self.wrapper = crypto.LocalSecretWrapper(secret.encode())
        # Until the stored settings are read, the seeds (or defaults) decide the session limits.
        self._set_timing(
            self._settings.model_copy(
                update={
                    k: v
                    for k, v in (
                        ("heartbeat_interval_seconds", cfg.heartbeat_interval_seconds),
                        ("offline_threshold_seconds", cfg.offline_threshold_seconds),
                    )
                    if v
                }
            )
        )
        self.engine = create_engine(
            cfg.database_url,
            pool_size=cfg.db_pool_size,
            application_name=f"dsm-node:{cfg.node_name}",
            limits=self._job_limits,
        )
        # Membership has connections of its own: a heartbeat must never queue behind busy jobs,
        # and the heartbeat has one for itself: never queued behind a sweep or an API call.
        self.housekeeping_engine = create_engine(
            cfg.database_url,
            pool_size=2,
            application_name=f"dsm-node:{cfg.node_name}:membership",
            limits=self._membership_limits,
        )
        self.heartbeat_engine = create_engine(
            cfg.database_url,
            pool_size=1,
            max_overflow=0,
            application_name=f"dsm-node:{cfg.node_name}:heartbeat",
            limits=self._membership_limits,
        )
        seed: dict[str, float] = {}
        if cfg.offline_threshold_seconds:
            seed["offline_threshold_seconds"] = cfg.offline_threshold_seconds
        if cfg.heartbeat_interval_seconds:
            seed["heartbeat_interval_seconds"] = cfg.heartbeat_interval_seconds
        self.phase = "joining"
        try:
            await joining.wait_for_name(
                self.engine, cfg.node_name, cfg.heartbeat_interval_seconds or 10.0
            )
            joined = await joining.join(
                self.engine,
                name=cfg.node_name,
                address=cfg.address,
                api_port=cfg.api_port,
                version=cfg.software_version,
                wrapper=self.wrapper,
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
            self._enter_upgrade_required(str(e))
            return
        except (crypto.WrongSecret, joining.DuplicateName, Decommissioned, ValueError) as e:
            raise StartupError(str(e)) from None
        except (OSError, psycopg.OperationalError, sqlalchemy.exc.OperationalError) as e:
            raise StartupError(f"cannot reach the database: {_first_line(e)}") from None
        assert joined.identity is not None
        self.keyring = joined.keyring
        self._identity = joined.identity
        self.membership = Membership(self.housekeeping_engine, self.heartbeat_engine)
        await self._refresh_settings()
        log.info(
            "schema version %d, cluster version %s; heartbeat %g s, offline threshold %g s",
            joined.schema_version,
            joined.cluster_version,
            self._timing.heartbeat_interval,
            self._timing.offline_threshold,
        )
        self.pool = JobPool(self.engine)
        self._last_heartbeat_ok = time.monotonic()
        metrics.NODE.labels(cfg.node_name, cfg.software_version).set(1)
        self.worker = Worker(
            self.pool,
            lambda: self.identity,
            self,
            WorkerConfig(
                concurrency=cfg.concurrency,
                batch=cfg.claim_batch,
                # transactional jobs each hold a connection; two stay free to claim and complete
                transactional_concurrency=max(1, cfg.db_pool_size - 2),
            ),
        )
        self.worker.resume()
        metrics.initialize_job_series(self.pool.registry.types)
        self.phase = "online"
        for coro in (
            self.worker.run(),
            self.worker.record_outcomes_forever(),
            self._heartbeat_loop(),
            self._sweep_loop(),
            self._refresh_loop(),
            self._schedule_loop(),
            self._listen_loop(),
        ):
            self._tasks.append(asyncio.create_task(coro))
        log.info(
            "online: %s at %s:%d, version %s",
            cfg.node_name,
            cfg.address,
            cfg.api_port,
            cfg.software_version,
        )

    def _enter_upgrade_required(self, reason: str) -> None:
        """Stays alive, works on nothing, and says why (until restarted with the new version)."""
        self.phase = "upgrade_required"
        self.upgrade_reason = reason
        if self.worker is not None:
            self.worker.pause("upgrade required")
            self.worker.abandon_running("the cluster was upgraded; this node must be upgraded")
        log.error("Offline (Upgrade Required): %s", reason)

    async def stop(self) -> None:
        """Graceful halt: stop claiming, let running jobs finish within the grace period,
        release the rest, and show Offline at once."""
        if self.phase in ("stopping", "stopped"):
            return
        self.phase = "stopping"
        log.info("stopping")
        if self.worker and self.pool and self.membership and self._identity:
            cut = await self.worker.drain(self.config.shutdown_grace_seconds)
            try:
                if cut:
                    n = await self.pool.release(self._identity.node_id, cut, "released at shutdown")
                    log.info("released %d unfinished jobs back to the pool", n)
            except Exception as e:
                log.warning(
                    "could not release %d unfinished jobs (%s); peers take them over",
                    len(cut),
                    _first_line(e),
                )
            if self.worker.unrecorded_outcomes:
                log.warning(
                    "%d job outcomes could not be recorded; their deadline returns the jobs to "
                    "the pool",
                    self.worker.unrecorded_outcomes,
                )
            try:
                await self.membership.leave(self._identity, "halted")
                log.info("marked offline")
            except Exception as e:
                log.warning("could not mark this node offline: %s", _first_line(e))
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for engine in (self.engine, self.housekeeping_engine, self.heartbeat_engine):
            if engine is not None:
                await engine.dispose()
        self.phase = "stopped"

    # -- background loops -----------------------------------------------------------------

    async def _pause(self, seconds: float) -> None:
        """Sleeps, waking early when the cluster's timing changes (a shorter interval applies at
        once, not after the longer one has passed)."""
        changed = self._timing_changed
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, seconds)):
                await changed.wait()

    async def _heartbeat_loop(self) -> None:
        assert self.membership is not None and self.worker is not None
        loop = asyncio.get_running_loop()
        beat: asyncio.Task[None] | None = None
        beat_started = 0.0
        while True:
            t = self._timing
            t0 = loop.time()
            if beat is None or beat.done():
                beat = asyncio.create_task(self._beat())
                beat_started = t0
            # Never cancel a beat stuck on a dead connection (cancelling would itself wait on
            # that connection); keep checking the lease while it hangs.
            await asyncio.wait({beat}, timeout=t.heartbeat_interval)
            pause = t.heartbeat_interval
            if beat.done():
                if not beat.cancelled() and (e := beat.exception()) is not None:
                    log.warning("heartbeat failed: %s", _first_line(e) or type(e).__name__)
                    pause = t.heartbeat_interval / 4  # the lease is running out: try again soon
            else:
                log.warning(
                    "heartbeat waiting on the database for %.1f s", loop.time() - beat_started
                )
            age = self.heartbeat_age() or 0.0
            metrics.observe_heartbeat(age, t.heartbeat_interval, t.offline_threshold)
            if self.phase in ("upgrade_required", "decommissioned"):
                pass  # already working on nothing
            elif not self._fenced and age > t.fence_after:
                self._fenced = True
                self.phase = "fenced"
                self.worker.pause(f"no heartbeat for {age:.1f} s")
                self.worker.abandon_running(
                    "database unreachable for most of the offline threshold; peers take over"
                )
            await self._pause(pause - (loop.time() - t0))

    async def _beat(self) -> None:
        """Renews this node's lease, and nothing else that could hold it up."""
        assert self.membership is not None and self.worker is not None and self.pool is not None
        if self.phase in ("upgrade_required", "decommissioned"):
            return
        sent = time.monotonic()
        local_before = self.wall_clock()
        row = await self.membership.heartbeat(self.identity, self._skew, _local_time_zone())
        local_after = self.wall_clock()
        if row is None:
            await self._lost_lease()
            return
        self._last_heartbeat_ok = sent
        await self._release_abandoned()
        if self._fenced:
            log.info("database reachable again; back online")
        self._fenced = False
        self.phase = "online"
        self.worker.resume()
        await self._check_clock(row, (local_before + local_after) / 2)

    async def _release_abandoned(self) -> None:
        """Jobs abandoned while fenced go back to the pool without spending an attempt (the
        release is fenced: a job taken over meanwhile is not touched)."""
        assert self.worker is not None and self.pool is not None
        held = self.worker.take_abandoned()
        if not held:
            return
        try:
            n = await self.pool.release(self.identity.node_id, held, "released after fencing")
        except Exception:
            self.worker.keep_abandoned(held)
            raise
        log.info("released %d abandoned jobs back to the pool", n)

    async def _sweep_loop(self) -> None:
        """Sweeps once per interval; a sweep stuck on the database holds up only the next sweep."""
        loop = asyncio.get_running_loop()
        sweep: asyncio.Task[None] | None = None
        sweep_started = 0.0
        while True:
            t = self._timing
            t0 = loop.time()
            if self.phase in ("online", "fenced"):
                if sweep is None or sweep.done():
                    sweep = asyncio.create_task(self._sweep(t))
                    sweep_started = t0
                await asyncio.wait({sweep}, timeout=t.heartbeat_interval)
                if sweep.done():
                    if not sweep.cancelled() and (e := sweep.exception()) is not None:
                        log.warning("sweep failed: %s", _first_line(e) or type(e).__name__)
                else:
                    log.warning(
                        "sweep waiting on the database for %.1f s", loop.time() - sweep_started
                    )
            await self._pause(t.heartbeat_interval - (loop.time() - t0))

    async def _sweep(self, t: timing.Timing) -> None:
        assert self.membership is not None
        swept = await self.membership.sweep(t.offline_threshold, t.deadline_grace)
        for name, silent in swept.offline:
            metrics.TAKEOVERS.inc()
            log.warning("declared %s offline (no heartbeat for %.0f s)", name, silent)
        if swept.requeued or swept.discarded:
            log.warning(
                "took over: %d jobs back in the pool, %d local jobs discarded",
                swept.requeued,
                swept.discarded,
            )
        if swept.expired:
            log.warning(
                "%d running jobs were past their deadline: %d back in the pool, %d out of "
                "attempts (failed)",
                swept.expired,
                swept.expired - swept.dead,
                swept.dead,
            )

    async def _refresh_loop(self) -> None:
        """Re-reads the cluster settings, the master keys and the gauges on a schedule of their
        own: a stuck or failing sweep does not stop them, nor does a bad stored value."""
        failing: set[str] = set()
        while True:
            for name, step in (
                ("settings", self._refresh_settings),
                ("master keys", self.reload_keyring),
                ("gauges", self._refresh_gauges),
            ):
                try:
                    await step()
                    failing.discard(name)
                except Exception as e:
                    if name not in failing:
                        log.warning("could not refresh %s: %s", name, _first_line(e))
                    failing.add(name)
            await self._pause(min(SETTINGS_REFRESH_SECONDS, self._timing.heartbeat_interval))

    async def _refresh_settings(self) -> None:
        assert self.housekeeping_engine is not None
        async with self.housekeeping_engine.connect() as conn:
            stored = {r.key: r.value for r in await conn.execute(Q.get_settings)}
        settings, problems = timing.reconcile_settings(
            settings_store.ClusterSettings, stored, self._settings
        )
        self._report_settings_problems(problems)
        self._set_timing(settings)

    def _set_timing(self, settings: settings_store.ClusterSettings) -> None:
        """Adopts settings: the effective timing, and the session limits that follow from it."""
        t, problems = timing.effective(
            settings.heartbeat_interval_seconds, settings.offline_threshold_seconds
        )
        self._report_settings_problems(problems, clamped=True)
        self._settings = settings
        changed = t != self._timing
        self._timing = t
        self._job_limits.update(t.job_session(), t.client_tcp())
        self._membership_limits.update(t.membership_session(), t.client_tcp())
        if changed:
            if self.phase not in ("starting", "joining"):  # start() logs the first timing
                log.info(
                    "cluster timing now: heartbeat %g s, offline threshold %g s",
                    t.heartbeat_interval,
                    t.offline_threshold,
                )
            self._timing_changed.set()
            self._timing_changed = asyncio.Event()

    def _report_settings_problems(self, problems: list[str], clamped: bool = False) -> None:
        """One warning per problem while it lasts (not one per refresh)."""
        kind = "clamped" if clamped else "refused"
        current = {f"{kind}:{p}" for p in problems}
        for p in problems:
            if f"{kind}:{p}" not in self._settings_problems:
                log.warning("%s", p)
        self._settings_problems = {
            x for x in self._settings_problems if not x.startswith(f"{kind}:")
        } | current

    async def _lost_lease(self) -> None:
        """The heartbeat found this incarnation no longer online: find out why, and act."""
        assert self.membership is not None and self.worker is not None
        self.worker.pause("lease lost")
        self.worker.abandon_running("this node lost its lease; the jobs were taken over")
        self.worker.take_abandoned()
        me = await self.membership.node_row(self.config.node_name)
        if me is not None and me.status == "decommissioned":
            self.phase = "decommissioned"
            log.error("this node was decommissioned; it works on nothing until removed")
            return
        cluster = me.cluster_version if me is not None else None
        if (me is not None and me.status == "upgrade_required") or (
            cluster
            and joining.parse_version(cluster) > joining.parse_version(self.config.software_version)
        ):
            self._enter_upgrade_required(
                f"the cluster was upgraded to {cluster}; this node runs "
                f"{self.config.software_version}: upgrade this node"
            )
            return
        log.warning("this node was declared offline by its peers; rejoining")
        self._identity = await self.membership.register(
            self.config.node_name,
            self.config.address,
            self.config.api_port,
            self.config.software_version,
        )
        self.caches.clear()  # local jobs sent while this node was away never reached it
        self._last_heartbeat_ok = time.monotonic()
        self._fenced = False
        self.phase = "online"
        self.worker.resume()

    def wall_clock(self) -> float:
        """This node's own clock (shiftable in tests); only the time check reads it."""
        return time.time() + self.config.clock_offset_seconds

    async def _check_clock(self, row: Any, local_mid: float) -> None:
        """Raises or clears the "Manager Time Out of Sync" alert (skew over 30 s, or a time
        zone different from the database's)."""
        assert self.membership is not None
        skew = local_mid - row.db_clock.timestamp()
        self._skew = round(skew, 3)
        metrics.CLOCK_SKEW.set(skew)
        problems = []
        if abs(skew) > MAX_CLOCK_SKEW_SECONDS:
            problems.append(f"clock differs from the database's by {skew:+.1f} s")
        local_offset = time.localtime(self.wall_clock()).tm_gmtoff
        if int(float(row.db_utc_offset)) != local_offset:
            problems.append(
                f"time zone {_local_time_zone()} (UTC{local_offset / 3600:+g}) differs from the "
                f"database's {row.db_tz} (UTC{float(row.db_utc_offset) / 3600:+g})"
            )
        message = "; ".join(problems)
        if message and self.alerts.get(TIME_ALERT) != message:
            await self.membership.set_alert(TIME_ALERT, self.identity.node_id, message)
            log.warning("%s: %s", TIME_ALERT, message)
            self.alerts[TIME_ALERT] = message
        elif not message and TIME_ALERT in self.alerts:
            await self.membership.set_alert(TIME_ALERT, self.identity.node_id, None)
            log.info("%s cleared", TIME_ALERT)
            del self.alerts[TIME_ALERT]
        metrics.TIME_OUT_OF_SYNC.set(1 if message else 0)

    async def _refresh_gauges(self) -> None:
        assert self.pool is not None and self.membership is not None
        depth = await self.pool.queue_depth()
        peers = await self.membership.list_nodes(self._timing.offline_threshold)
        metrics.QUEUE_DEPTH.clear()
        for jtype, state, n in depth:
            metrics.QUEUE_DEPTH.labels(jtype, state).set(n)
        metrics.NODE_STATUS.clear()
        for peer in peers:
            metrics.NODE_STATUS.labels(peer["name"], peer["status"]).set(1)

    async def _schedule_loop(self) -> None:
        assert self.pool is not None
        periods = [p.every for p in self.pool.registry.periodic.values()] or [60.0]
        tick = max(0.5, min(5.0, min(periods) / 4))
        while True:
            if self.worker is not None and self.worker.claiming:
                try:
                    await self.pool.schedule_periodic()
                except Exception as e:
                    log.warning("periodic scheduling failed: %s", _first_line(e))
            await asyncio.sleep(tick)

    async def _listen_loop(self) -> None:
        """Wakes the claim loop on NOTIFY; polling covers any gap while this is reconnecting."""
        assert self.worker is not None
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(
                    make_conninfo(libpq_url(self.config.database_url), **self._timing.client_tcp()),
                    autocommit=True,
                    connect_timeout=5,
                )
                async with conn:
                    await conn.execute("LISTEN dsm_jobs")
                    async for _ in conn.notifies():
                        self.worker.wake()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.debug("listen connection lost: %s", _first_line(e))
            await asyncio.sleep(2.0)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:300]
