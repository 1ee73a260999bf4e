"""The cluster settings a running node works with, and what follows from them at run time.

An administrator may change the heartbeat interval and the offline threshold while nodes run.
``LiveSettings`` holds the settings last read (a stored value a node cannot use is replaced by the
last good one, with one warning while it lasts), the effective ``Timing`` (``cluster.timing``), and
the session limits of the node's connections, which follow the timing. Loops that sleep for an
interval sleep through ``pause``, which wakes them when the timing changes, so a shorter interval
applies at once, not after the longer one has passed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from dsm_node import settings_store
from dsm_node.cluster import timing
from dsm_node.db.engine import SessionLimits

log = logging.getLogger("dsm.node")


class LiveSettings:
    def __init__(self, seeds: dict[str, Any] | None = None) -> None:
        defaults = settings_store.ClusterSettings()
        self._settings = defaults
        self.timing, _ = timing.effective(
            defaults.heartbeat_interval_seconds, defaults.offline_threshold_seconds
        )
        # Session settings of the job pool's and of membership's connections (cluster.timing).
        self.job_limits = SessionLimits()
        self.membership_limits = SessionLimits()
        self._changed = asyncio.Event()  # replaced after each change; wakes sleeping loops
        self._problems: set[str] = set()
        self.announce_changes = False  # the node logs the first timing itself
        # Until the stored settings are read, the seeds (or defaults) decide the session limits.
        self.adopt(defaults.model_copy(update={k: v for k, v in (seeds or {}).items() if v}))

    def current(self) -> settings_store.ClusterSettings:
        """The stored settings, with the heartbeat interval and offline threshold this node
        actually uses (stored values outside sane bounds are clamped; see cluster.timing)."""
        return self._settings.model_copy(
            update={
                "heartbeat_interval_seconds": self.timing.heartbeat_interval,
                "offline_threshold_seconds": self.timing.offline_threshold,
            }
        )

    def watch(self) -> asyncio.Event:
        """A token for ``pause``: set once the timing changes after this call."""
        return self._changed

    async def pause(self, seconds: float, since: asyncio.Event | None = None) -> None:
        """Sleeps, waking early when the cluster's timing changes -- since ``since`` was taken
        (``watch``), when given: a loop that read the timing, then worked (awaiting the database),
        then pauses, must not miss a change made while it worked and sleep out the old interval."""
        changed = since if since is not None else self._changed
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, seconds)):
                await changed.wait()

    async def refresh(self, engine: AsyncEngine) -> None:
        """Re-reads the stored settings and adopts them."""
        stored = await settings_store.stored(engine)
        settings, problems = timing.reconcile_settings(
            settings_store.ClusterSettings, stored, self._settings
        )
        self._report(problems)
        self.adopt(settings)

    def adopt(self, settings: settings_store.ClusterSettings) -> None:
        """Adopts settings: the effective timing, and the session limits that follow from it."""
        t, problems = timing.effective(
            settings.heartbeat_interval_seconds, settings.offline_threshold_seconds
        )
        self._report(problems, clamped=True)
        self._settings = settings
        changed = t != self.timing
        self.timing = t
        self.job_limits.update(t.job_session(), t.client_tcp())
        self.membership_limits.update(t.membership_session(), t.client_tcp())
        if changed:
            if self.announce_changes:
                log.info(
                    "cluster timing now: heartbeat %g s, offline threshold %g s",
                    t.heartbeat_interval,
                    t.offline_threshold,
                )
            self._changed.set()
            self._changed = asyncio.Event()

    def _report(self, problems: list[str], clamped: bool = False) -> None:
        """One warning per problem while it lasts (not one per refresh)."""
        kind = "clamped" if clamped else "refused"
        current = {f"{kind}:{p}" for p in problems}
        for p in problems:
            if f"{kind}:{p}" not in self._problems:
                log.warning("%s", p)
        self._problems = {x for x in self._problems if not x.startswith(f"{kind}:")} | current
