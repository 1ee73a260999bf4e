"""One manager node: wires the database, membership, the job pool and the HTTPS API together.

Start-up order matters: the API comes up first (``/healthz`` answers during a long migration, so
probes never kill a migrating node), then the schema is brought up to date under the migration
lock, then the node registers and starts claiming.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import time
from typing import Any

import psycopg
from sqlalchemy.ext.asyncio import AsyncEngine

from dsm_node import metrics, settings_store
from dsm_node.caches import Caches
from dsm_node.cluster.membership import Identity, Membership
from dsm_node.cluster.status import fence_after
from dsm_node.config import NodeConfig
from dsm_node.db import migrating
from dsm_node.db.engine import create_engine, libpq_url
from dsm_node.jobs import builtin  # noqa: F401  (registers the built-in job types)
from dsm_node.jobs.pool import JobPool
from dsm_node.jobs.worker import Worker, WorkerConfig

log = logging.getLogger("dsm.node")


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
        self._fenced = False
        self.phase = "starting"  # starting, migrating, online, fenced, stopping, stopped
        self._tasks: list[asyncio.Task[Any]] = []

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

    def heartbeat_age(self) -> float | None:
        if self._last_heartbeat_ok is None:
            return None
        return time.monotonic() - self._last_heartbeat_ok

    # -- life -----------------------------------------------------------------------------

    async def start(self) -> None:
        cfg = self.config
        for module in filter(None, (m.strip() for m in cfg.job_modules.split(","))):
            importlib.import_module(module)
        self.engine = create_engine(
            cfg.database_url,
            pool_size=cfg.db_pool_size,
            application_name=f"dsm-node:{cfg.node_name}",
        )
        # Membership has connections of its own: a heartbeat must never queue behind busy jobs.
        self.housekeeping_engine = create_engine(
            cfg.database_url, pool_size=2, application_name=f"dsm-node:{cfg.node_name}:membership"
        )
        extra = [cfg.extra_migrations_dir] if cfg.extra_migrations_dir else None
        self.phase = "migrating"
        try:
            state = await migrating.ensure_schema(
                self.engine, cfg.software_version, extra_dirs=extra
            )
        except migrating.SchemaTooNew as e:
            raise StartupError(str(e)) from None
        except (OSError, psycopg.OperationalError) as e:
            raise StartupError(f"cannot reach the database: {e}") from None
        except Exception as e:
            if "connection" in str(e).lower():
                raise StartupError(f"cannot reach the database: {_first_line(e)}") from None
            raise
        async with self.engine.begin() as conn:
            seed = {}
            if cfg.offline_threshold_seconds:
                seed["offline_threshold_seconds"] = cfg.offline_threshold_seconds
            if cfg.heartbeat_interval_seconds:
                seed["heartbeat_interval_seconds"] = cfg.heartbeat_interval_seconds
            await settings_store.write(conn, seed, only_if_absent=True)
        self._settings = await settings_store.read(self.engine)
        log.info(
            "schema version %d; cluster settings: heartbeat %g s, offline threshold %g s",
            state.schema_version,
            self._settings.heartbeat_interval_seconds,
            self._settings.offline_threshold_seconds,
        )

        self.pool = JobPool(self.engine)
        self.membership = Membership(self.housekeeping_engine)
        self._identity = await self.membership.register(
            cfg.node_name, cfg.address, cfg.api_port, cfg.software_version
        )
        self._last_heartbeat_ok = time.monotonic()
        metrics.NODE.labels(cfg.node_name, cfg.software_version).set(1)
        self.worker = Worker(
            self.pool,
            lambda: self.identity,
            self,
            WorkerConfig(concurrency=cfg.concurrency, batch=cfg.claim_batch),
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
            if not self._fenced and age > fence_after(threshold):
                self._fenced = True
                self.phase = "fenced"
                self.worker.pause(f"no heartbeat for {age:.1f} s")
                self.worker.abandon_running(
                    "database unreachable for most of the offline threshold; peers take over"
                )
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - t0)))

    async def _beat(self, threshold: float) -> None:
        assert self.membership is not None and self.worker is not None and self.pool is not None
        sent = time.monotonic()
        db_now = await self.membership.heartbeat(self.identity)
        if db_now is None:
            log.warning("this node was declared offline by its peers; rejoining")
            self.worker.pause("declared offline")
            self.worker.abandon_running("declared offline; the jobs were taken over")
            self.worker.take_abandoned()
            self._identity = await self.membership.register(
                self.config.node_name,
                self.config.address,
                self.config.api_port,
                self.config.software_version,
            )
            self.caches.clear()  # local jobs sent while this node was away never reached it
        elif self._fenced:
            abandoned = self.worker.take_abandoned()
            if abandoned:
                await self.pool.release(self.identity.node_id, abandoned, "released after fencing")
        self._last_heartbeat_ok = sent
        if self._fenced or self.phase != "online":
            log.info("database reachable again; back online")
        self._fenced = False
        self.phase = "online"
        self.worker.resume()
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
        await self._refresh_gauges(threshold)

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
