"""One manager node: wires the database, membership, the job pool and the HTTPS API together.

Start-up order matters: the API comes up first (``/healthz`` answers during a long migration, so
probes never kill a migrating node), then the node joins (``cluster.joining``: versions, master
key, migrations, registration in one transaction), then it starts claiming.

Phases: starting -> joining -> online <-> fenced (database unreachable), and the terminal
upgrade_required / decommissioned (alive, working on nothing), stopping -> stopped.
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
from sqlalchemy.ext.asyncio import AsyncEngine

from dsm_node import crypto, keys, metrics, settings_store
from dsm_node.caches import Caches
from dsm_node.cluster import joining
from dsm_node.cluster.membership import Decommissioned, Identity, Membership
from dsm_node.cluster.status import fence_after
from dsm_node.config import NodeConfig
from dsm_node.db.engine import create_engine, libpq_url
from dsm_node.jobs import builtin  # noqa: F401  (registers the built-in job types)
from dsm_node.jobs.pool import JobPool
from dsm_node.jobs.worker import Worker, WorkerConfig

log = logging.getLogger("dsm.node")


MAX_CLOCK_SKEW_SECONDS = 30.0
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
        self.pool: JobPool | None = None
        self.membership: Membership | None = None
        self.worker: Worker | None = None
        self._identity: Identity | None = None
        self._settings = settings_store.ClusterSettings()
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
        assert self.engine is not None
        engine = self.engine
        return await self.caches.get("settings", 5.0, lambda: settings_store.read(engine))

    @property
    def cluster_settings(self) -> settings_store.ClusterSettings:
        return self._settings

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
        if age is not None and age > 2 * self._settings.heartbeat_interval_seconds + 1:
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
        self.engine = create_engine(
            cfg.database_url,
            pool_size=cfg.db_pool_size,
            application_name=f"dsm-node:{cfg.node_name}",
        )
        # Membership has connections of its own: a heartbeat must never queue behind busy jobs.
        self.housekeeping_engine = create_engine(
            cfg.database_url, pool_size=2, application_name=f"dsm-node:{cfg.node_name}:membership"
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
        self._settings = await settings_store.read(self.engine)
        log.info(
            "schema version %d, cluster version %s; heartbeat %g s, offline threshold %g s",
            joined.schema_version,
            joined.cluster_version,
            self._settings.heartbeat_interval_seconds,
            self._settings.offline_threshold_seconds,
        )
        self.pool = JobPool(self.engine)
        self.membership = Membership(self.housekeeping_engine)
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
        self.phase = "online"
        for coro in (
            self.worker.run(),
            self.worker.complete_forever(),
            self._heartbeat_loop(),
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
            with contextlib.suppress(Exception):
                if cut:
                    n = await self.pool.release(self._identity.node_id, cut, "released at shutdown")
                    log.info("released %d unfinished jobs back to the pool", n)
            try:
                await self.membership.leave(self._identity, "halted")
                log.info("marked offline")
            except Exception as e:
                log.warning("could not mark this node offline: %s", _first_line(e))
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for engine in (self.engine, self.housekeeping_engine):
            if engine is not None:
                await engine.dispose()
        self.phase = "stopped"

    # -- background loops -----------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        assert self.membership is not None and self.worker is not None
        beat: asyncio.Task[None] | None = None
        beat_started = 0.0
        while True:
            interval = self._settings.heartbeat_interval_seconds
            threshold = self._settings.offline_threshold_seconds
            t0 = time.monotonic()
            if beat is None or beat.done():
                beat = asyncio.create_task(self._beat(threshold))
                beat_started = t0
            # Never cancel a beat stuck on a dead connection (cancelling would itself wait on
            # that connection); keep checking the lease while it hangs.
            await asyncio.wait({beat}, timeout=interval)
            if beat.done():
                if not beat.cancelled() and (e := beat.exception()) is not None:
                    log.warning("heartbeat failed: %s", _first_line(e) or type(e).__name__)
            else:
                log.warning(
                    "heartbeat waiting on the database for %.1f s", time.monotonic() - beat_started
                )
            age = self.heartbeat_age() or 0.0
            metrics.HEARTBEAT_AGE.set(age)
            if self.phase in ("upgrade_required", "decommissioned"):
                pass  # already working on nothing
            elif not self._fenced and age > fence_after(threshold):
                self._fenced = True
                self.phase = "fenced"
                self.worker.pause(f"no heartbeat for {age:.1f} s")
                self.worker.abandon_running(
                    "database unreachable for most of the offline threshold; peers take over"
                )
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - t0)))

    async def _beat(self, threshold: float) -> None:
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
        if self._fenced:
            abandoned = self.worker.take_abandoned()
            if abandoned:
                await self.pool.release(self.identity.node_id, abandoned, "released after fencing")
            log.info("database reachable again; back online")
        self._fenced = False
        self.phase = "online"
        self.worker.resume()
        await self._check_clock(row, (local_before + local_after) / 2)
        swept = await self.membership.sweep(threshold)
        for name, silent in swept.offline:
            metrics.TAKEOVERS.inc()
            log.warning("declared %s offline (no heartbeat for %.0f s)", name, silent)
        if swept.requeued or swept.discarded:
            log.warning(
                "took over: %d jobs back in the pool, %d local jobs discarded",
                swept.requeued,
                swept.discarded,
            )
        self.caches.clear_entry("settings")
        self._settings = await self.settings()
        await self.reload_keyring()
        await self._refresh_gauges(threshold)

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

    async def _refresh_gauges(self, threshold: float) -> None:
        assert self.pool is not None and self.membership is not None
        metrics.QUEUE_DEPTH.clear()
        for jtype, state, n in await self.pool.queue_depth():
            metrics.QUEUE_DEPTH.labels(jtype, state).set(n)
        metrics.NODE_STATUS.clear()
        for peer in await self.membership.list_nodes(threshold):
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
                    libpq_url(self.config.database_url), autocommit=True, connect_timeout=5
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
