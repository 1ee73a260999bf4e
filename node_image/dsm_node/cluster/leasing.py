"""Keeps the node's lease: the loop that carries out what ``cluster.lease`` decides.

``Lease`` holds the phase, the incarnation and when the lease was last renewed; only ``advance``
changes the phase (the pure ``lease.step`` decides, the effects are carried out first, and the
phase moves only when all of them succeeded). ``LeaseKeeper.run`` is the loop: once per heartbeat
interval it makes the attempt the phase calls for (a heartbeat, or a rejoin after the lease was
lost) and feeds its outcome to ``advance``.

The heartbeat has a connection of its own (``Membership``'s heartbeat engine) and this loop does
nothing else that could hold it up: the sweep and the settings refresh run on loops of their own.
An attempt stuck on a dead connection is never cancelled (cancelling would itself wait on that
connection); the loop goes on judging the lease's age while it hangs, and fences the node when
the age passes the fence point.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass
from typing import Protocol

from dsm_node import metrics
from dsm_node.cluster import clock, lease
from dsm_node.cluster.joining import parse_version
from dsm_node.cluster.lease import Attempt, Effect, Event, Phase, Step
from dsm_node.cluster.live import LiveSettings
from dsm_node.cluster.membership import Decommissioned, Identity, MemberRow, Renewal
from dsm_node.cluster.timing import Timing

log = logging.getLogger("dsm.node")


class Work(Protocol):
    """The node's job worker, as its lease drives it (``jobs.worker.Worker``)."""

    def pause(self, reason: str) -> None: ...

    def resume(self) -> None: ...

    def abandon_running(self, reason: str) -> list[int]: ...

    def take_abandoned(self) -> list[tuple[int, int]]: ...

    def keep_abandoned(self, held: list[tuple[int, int]]) -> None: ...


class Release(Protocol):
    """Returns held jobs, as (id, attempt), to the pool without spending an attempt
    (``jobs.pool.JobPool.release``)."""

    async def __call__(self, node_id: int, held: list[tuple[int, int]], reason: str) -> int: ...


class Clearable(Protocol):
    def clear(self) -> int: ...


class Members(Protocol):
    """What the lease loop asks of membership (``cluster.membership.Membership``)."""

    async def heartbeat(
        self, me: Identity, skew: float | None = None, time_zone: str | None = None
    ) -> Renewal | None: ...

    async def node_row(self, name: str) -> MemberRow | None: ...

    async def register(self, name: str, address: str, api_port: int, version: str) -> Identity: ...

    async def set_alert(self, alert_type: str, node_id: int, message: str | None) -> None: ...


class Effects(Protocol):
    async def __call__(self, effect: Effect, step: Step) -> None: ...


class Lease:
    """The node's phase and incarnation. Nothing but ``advance`` changes the phase."""

    def __init__(self) -> None:
        self.phase = Phase.STARTING
        self.identity: Identity | None = None
        self.renewed_at: float | None = None  # time.monotonic() of the last renewal
        self.upgrade_reason: str | None = None

    def me(self) -> Identity:
        """This node's incarnation (it exists from the join on)."""
        if self.identity is None:
            raise RuntimeError(f"this node has not joined the cluster ({self.phase})")
        return self.identity

    def age(self) -> float | None:
        """Seconds since the lease was last renewed; None before the node has joined."""
        return None if self.renewed_at is None else time.monotonic() - self.renewed_at

    def registered(self, identity: Identity) -> None:
        self.identity = identity
        self.renewed_at = time.monotonic()

    async def advance(self, event: Event, timing: Timing, effects: Effects | None = None) -> Step:
        """Carries out ``lease.step``: its effects in order, then the new phase. An effect that
        raises leaves the phase as it was (the next attempt tries again); a phase changed by
        someone else meanwhile (a stop) wins over this step's."""
        before = self.phase
        s = lease.step(before, event, self.age() or 0.0, timing)
        if s.effects:
            if effects is None:
                raise RuntimeError(f"{before} --{event}--> {s.phase} needs the node's work")
            for effect in s.effects:
                await effects(effect, s)
        if self.phase is not before:
            return Step(self.phase)
        self.phase = s.phase
        if s.phase is not before:
            self._announce(before, s)
        return s

    def _announce(self, before: Phase, s: Step) -> None:
        if s.phase is Phase.UPGRADE_REQUIRED:
            log.error("Offline (Upgrade Required): %s", self.upgrade_reason or s.reason)
        elif s.phase is Phase.DECOMMISSIONED:
            log.error("this node was decommissioned; it works on nothing until removed")
        elif before is Phase.FENCED and s.phase is Phase.ONLINE:
            log.info("%s", s.reason)


class WorkEffects:
    """Carries out a lease step's effects on the node's work."""

    def __init__(self, lease: Lease, work: Work, release: Release, caches: Clearable) -> None:
        self.lease, self.work, self.release, self.caches = lease, work, release, caches

    async def __call__(self, effect: Effect, step: Step) -> None:
        reason = step.reason or str(step.phase)
        if effect is Effect.PAUSE:
            self.work.pause(reason)
        elif effect is Effect.ABANDON:
            self.work.abandon_running(reason)
        elif effect is Effect.FORGET_ABANDONED:
            self.work.take_abandoned()
        elif effect is Effect.RELEASE_ABANDONED:
            await self._release_abandoned()
        elif effect is Effect.CLEAR_CACHES:
            self.caches.clear()
        elif effect is Effect.RESUME:
            self.work.resume()

    async def _release_abandoned(self) -> None:
        """Jobs abandoned while fenced go back to the pool without spending an attempt (the
        release is fenced: a job taken over meanwhile is not touched)."""
        held = self.work.take_abandoned()
        if not held:
            return
        try:
            n = await self.release(self.lease.me().node_id, held, "released after fencing")
        except Exception:
            self.work.keep_abandoned(held)
            raise
        log.info("released %d abandoned jobs back to the pool", n)


@dataclass(frozen=True)
class Registration:
    """What this node registers as when it rejoins."""

    name: str
    address: str
    api_port: int
    version: str


@dataclass(frozen=True)
class _Outcome:
    event: Event
    renewal: Renewal | None = None
    local_clock: float = 0.0  # this node's wall clock at the middle of the heartbeat


class LeaseKeeper:
    def __init__(
        self,
        lease: Lease,
        membership: Members,
        live: LiveSettings,
        effects: Effects,
        registration: Registration,
        clock_offset_seconds: float = 0.0,
    ) -> None:
        self.lease, self.membership, self.live = lease, membership, live
        self.effects, self.registration = effects, registration
        self.clock_offset_seconds = clock_offset_seconds
        self.alerts: dict[str, str] = {}  # open alerts raised by this node, by type
        self._skew: float | None = None

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        attempt: asyncio.Task[_Outcome] | None = None
        started = 0.0
        while True:
            changed = self.live.watch()
            t = self.live.timing
            t0 = loop.time()
            kind = lease.attempt_for(self.lease.phase)
            outcome = _Outcome(Event.PENDING)
            if attempt is not None and attempt.done():
                # It ended after its wait timed out, while this loop fenced or paused (a node
                # resumed after a freeze): its outcome comes first, and it already had its effect
                # (a renewal's time, a rejoin's incarnation).
                outcome, attempt = self._outcome_of(attempt), None
            elif kind is not Attempt.NOTHING or attempt is not None:
                if attempt is None:
                    attempt = asyncio.create_task(self._attempt(kind), name=str(kind))
                    started = t0
                await asyncio.wait({attempt}, timeout=t.heartbeat_interval)
                if attempt.done():
                    outcome, attempt = self._outcome_of(attempt), None
                else:
                    log.warning(
                        "heartbeat waiting on the database for %.1f s", loop.time() - started
                    )
            metrics.observe_heartbeat(
                self.lease.age() or 0.0, t.heartbeat_interval, t.offline_threshold
            )
            pace = outcome.event
            try:
                await self.lease.advance(outcome.event, t, self.effects)
            except Exception as e:
                log.warning("%s: %s", _doing(self.lease.phase), _first_line(e))
                pace = Event.FAILED
            if outcome.renewal is not None:
                try:
                    await self._check_clock(outcome.renewal, outcome.local_clock)
                except Exception as e:
                    log.warning("could not record the clock check: %s", _first_line(e))
            wait = lease.next_attempt_in(self.lease.phase, pace, t)
            await self.live.pause(wait - (loop.time() - t0), since=changed)

    def _outcome_of(self, attempt: asyncio.Task[_Outcome]) -> _Outcome:
        if attempt.cancelled():
            return _Outcome(Event.FAILED)
        e = attempt.exception()
        if e is None:
            return attempt.result()
        log.warning("%s failed: %s", _attempting(attempt), _first_line(e) or type(e).__name__)
        return _Outcome(Event.FAILED)

    async def _attempt(self, kind: Attempt) -> _Outcome:
        if kind is Attempt.HEARTBEAT:
            return await self._heartbeat()
        if kind is Attempt.REJOIN:
            return await self._rejoin()
        return _Outcome(Event.PENDING)

    async def _heartbeat(self) -> _Outcome:
        """Renews this node's lease, and nothing else that could hold it up."""
        sent = time.monotonic()
        local_before = self.wall_clock()
        renewal = await self.membership.heartbeat(self.lease.me(), self._skew, _local_time_zone())
        local_after = self.wall_clock()
        if renewal is None:
            return _Outcome(Event.LOST)
        self.lease.renewed_at = sent
        return _Outcome(Event.RENEWED, renewal, (local_before + local_after) / 2)

    async def _rejoin(self) -> _Outcome:
        """After a lost lease: rejoin as a new incarnation, unless this node was decommissioned
        or the cluster now runs a newer version."""
        reg = self.registration
        me = await self.membership.node_row(reg.name)
        cluster = me.cluster_version if me is not None else None
        refused = lease.refused_rejoin(
            me.status if me is not None else None,
            bool(cluster) and parse_version(cluster or "0") > parse_version(reg.version),
        )
        if refused is Event.UPGRADED:
            self.lease.upgrade_reason = (
                f"the cluster was upgraded to {cluster}; this node runs {reg.version}: "
                "upgrade this node"
            )
        if refused is not None:
            return _Outcome(refused)
        log.warning("this node was declared offline by its peers; rejoining")
        try:
            identity = await self.membership.register(
                reg.name, reg.address, reg.api_port, reg.version
            )
        except Decommissioned:
            return _Outcome(Event.DECOMMISSIONED)
        self.lease.registered(identity)
        return _Outcome(Event.REJOINED)

    def wall_clock(self) -> float:
        """This node's own clock (shiftable in tests); only the time check reads it."""
        return time.time() + self.clock_offset_seconds

    async def _check_clock(self, renewal: Renewal, local_mid: float) -> None:
        """Raises or clears the "Manager Time Out of Sync" alert."""
        skew = local_mid - renewal.db_clock.timestamp()
        self._skew = round(skew, 3)
        metrics.CLOCK_SKEW.set(skew)
        message = clock.out_of_sync(
            skew,
            time.localtime(self.wall_clock()).tm_gmtoff,
            _local_time_zone(),
            renewal.db_utc_offset,
            renewal.db_tz,
        )
        node_id = self.lease.me().node_id
        if message and self.alerts.get(clock.TIME_ALERT) != message:
            await self.membership.set_alert(clock.TIME_ALERT, node_id, message)
            log.warning("%s: %s", clock.TIME_ALERT, message)
            self.alerts[clock.TIME_ALERT] = message
        elif not message and clock.TIME_ALERT in self.alerts:
            await self.membership.set_alert(clock.TIME_ALERT, node_id, None)
            log.info("%s cleared", clock.TIME_ALERT)
            del self.alerts[clock.TIME_ALERT]
        metrics.TIME_OUT_OF_SYNC.set(1 if message else 0)


def _local_time_zone() -> str:
    return os.environ.get("TZ") or time.tzname[0]


def _attempting(attempt: asyncio.Task[_Outcome]) -> str:
    return attempt.get_name()


def _doing(phase: Phase) -> str:
    return "could not return to work" if phase is Phase.FENCED else f"lease step ({phase}) failed"


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:300]
