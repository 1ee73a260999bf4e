"""The node's lease on its membership, as a pure state machine. No I/O here.

A node works (claims and runs jobs) only while it holds a lease: its row in ``nodes`` is online in
its current incarnation, and its heartbeat renews it. ``step`` says what a node does next, from its
phase, what just happened (an ``Event``: the outcome of a lease attempt, or the node's own start and
stop), how long ago the lease was last renewed, and the cluster's timing. ``cluster.leasing`` runs
the attempts and carries out the effects; nothing else changes the phase.

    starting --join--> joining --joined--> online <--renewed-- fenced
                          |                  |  \\--no renewal for 2T/3--^  |
                          |                  |                            |
                          |                  +--lost--> rejoining <--lost-+
                          |                               |   ^
                          |             online <--rejoined+   +--lost / failed (try again)
                          +--upgraded--> upgrade_required <--upgraded-- (rejoining)
                                         decommissioned   <--decommissioned-- (rejoining)
    any phase --stop--> stopping --stopped--> stopped

Why each rule:
- *Fencing* (online -> fenced): a node that cannot renew its lease for two thirds of the offline
  threshold stops claiming and abandons its running jobs, before its peers may take them over (at
  the threshold). Abandoned jobs are released (without spending an attempt) as soon as the lease
  is renewed; a renewal that came back later than the fence point does not count.
- *Lease lost* (the heartbeat found this incarnation no longer online): peers declared it offline,
  a newer version took over, or an administrator decommissioned it. Its jobs were taken over, so
  they are abandoned and forgotten (never released: another node holds them now). Which of the
  three it was is read from the database by the next attempt (``rejoining``): a node declared
  offline registers a new incarnation and clears its caches (local jobs sent meanwhile never
  reached it); an upgraded or decommissioned one works on nothing from then on.
- *Stopping*: the lease is kept (heartbeats go on while running jobs finish within the grace
  period) but never resumes work; a lost lease or the fence point abandons what still runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from dsm_node.cluster.status import StoredStatus
from dsm_node.cluster.timing import Timing


class Phase(StrEnum):
    """Where a node is in its life. ``healthz`` and the logs show the value."""

    STARTING = "starting"
    JOINING = "joining"  # versions, master key, migrations, registration (cluster.joining)
    ONLINE = "online"  # holds the lease and works
    FENCED = "fenced"  # holds a lease it cannot renew: works on nothing until it can
    REJOINING = "rejoining"  # lost its lease: finding out why, registering anew if it may
    UPGRADE_REQUIRED = "upgrade_required"  # the cluster runs a newer version: alive, idle
    DECOMMISSIONED = "decommissioned"  # removed by an administrator: alive, idle
    STOPPING = "stopping"  # finishing its running jobs, then leaves
    STOPPED = "stopped"


class Event(StrEnum):
    """What happened: the outcome of a lease attempt, or the node's own start and stop."""

    # outcomes of a heartbeat (phases online, fenced, stopping)
    RENEWED = "renewed"  # the lease was renewed
    FAILED = "failed"  # the attempt failed (database unreachable, a statement refused)
    PENDING = "pending"  # the attempt is still waiting on the database
    LOST = "lost"  # this incarnation is no longer online
    # outcomes of a rejoin attempt (phase rejoining)
    REJOINED = "rejoined"  # registered as a new incarnation
    DECOMMISSIONED = "decommissioned"  # an administrator removed this node
    UPGRADED = "upgraded"  # the cluster runs a newer version (also found while joining)
    # the node's own decisions
    JOIN = "join"
    JOINED = "joined"
    STOP = "stop"
    STOPPED = "stopped"


LEASE_OUTCOMES = (
    Event.RENEWED,
    Event.FAILED,
    Event.PENDING,
    Event.LOST,
    Event.REJOINED,
    Event.DECOMMISSIONED,
    Event.UPGRADED,
)


class Effect(StrEnum):
    """What the lease loop does to the node's work, in the order a step lists them."""

    PAUSE = "pause"  # stop claiming jobs
    ABANDON = "abandon"  # cancel running jobs; their claims are kept to be released
    FORGET_ABANDONED = "forget_abandoned"  # another node holds them now: nothing to release
    RELEASE_ABANDONED = "release_abandoned"  # back to the pool, fenced, no attempt spent
    CLEAR_CACHES = "clear_caches"  # local jobs sent while this node was away never reached it
    RESUME = "resume"  # claim jobs again


class Attempt(StrEnum):
    """What the lease loop tries in a phase."""

    HEARTBEAT = "heartbeat"
    REJOIN = "rejoin"
    NOTHING = "nothing"


@dataclass(frozen=True)
class Step:
    """The phase to move to, what to do first, and why (one line for the log, or None)."""

    phase: Phase
    effects: tuple[Effect, ...] = ()
    reason: str | None = None


# Phases whose lease the loop keeps renewing.
HEARTBEATING = frozenset({Phase.ONLINE, Phase.FENCED, Phase.STOPPING})
# Phases in which the node sweeps (declares silent peers offline): any member may, and a node
# that cannot heartbeat may still reach the database through its other connections.
SWEEPING = frozenset({Phase.ONLINE, Phase.FENCED, Phase.REJOINING})

_STOP_WORK = (Effect.PAUSE, Effect.ABANDON, Effect.FORGET_ABANDONED)


def attempt_for(phase: Phase) -> Attempt:
    """The lease attempt the loop makes in a phase."""
    if phase in HEARTBEATING:
        return Attempt.HEARTBEAT
    if phase is Phase.REJOINING:
        return Attempt.REJOIN
    return Attempt.NOTHING


def step(phase: Phase, event: Event, age: float, timing: Timing) -> Step:
    """The next phase and the effects that lead there.

    ``age``: seconds since the lease was last renewed (or the node registered), measured after
    the event (a renewal that came back late is as old as the moment it was sent). Total: every
    (phase, event) pair has an answer; events that mean nothing in a phase leave it unchanged."""
    if event is Event.STOP:
        if phase in (Phase.STOPPING, Phase.STOPPED):
            return Step(phase)
        return Step(Phase.STOPPING, (), "stopping")
    if event is Event.STOPPED:
        return Step(Phase.STOPPED) if phase is Phase.STOPPING else Step(phase)
    if event is Event.JOIN:
        return Step(Phase.JOINING) if phase is Phase.STARTING else Step(phase)
    if phase is Phase.JOINING:
        if event is Event.JOINED:
            return Step(Phase.ONLINE, (Effect.RESUME,), None)
        if event is Event.UPGRADED:  # nothing runs yet: nothing to stop
            return Step(Phase.UPGRADE_REQUIRED, (), "the cluster runs a newer version")
        return Step(phase)
    if phase is Phase.ONLINE:
        return _online(event, age, timing)
    if phase is Phase.FENCED:
        return _fenced(event, age, timing)
    if phase is Phase.REJOINING:
        return _rejoining(event)
    if phase is Phase.STOPPING:
        return _stopping(event, age, timing)
    # starting, stopped, upgrade_required, decommissioned: no lease to keep
    return Step(phase)


def _fence_due(age: float, timing: Timing) -> bool:
    return age > timing.fence_after


def _online(event: Event, age: float, timing: Timing) -> Step:
    if event is Event.LOST:
        return Step(Phase.REJOINING, _STOP_WORK, "this node lost its lease")
    if event is Event.DECOMMISSIONED:
        return Step(Phase.DECOMMISSIONED, _STOP_WORK, "this node was decommissioned")
    if event is Event.UPGRADED:
        return Step(Phase.UPGRADE_REQUIRED, _STOP_WORK, "the cluster runs a newer version")
    if event in (Event.RENEWED, Event.FAILED, Event.PENDING) and _fence_due(age, timing):
        return Step(
            Phase.FENCED,
            (Effect.PAUSE, Effect.ABANDON),
            f"no heartbeat for {age:.1f} s",
        )
    return Step(Phase.ONLINE)


def _fenced(event: Event, age: float, timing: Timing) -> Step:
    if event is Event.RENEWED:
        if _fence_due(age, timing):  # renewed, but too late to count: release what it held
            return Step(Phase.FENCED, (Effect.RELEASE_ABANDONED,))
        return Step(
            Phase.ONLINE,
            (Effect.RELEASE_ABANDONED, Effect.RESUME),
            "database reachable again; back online",
        )
    if event is Event.LOST:
        return Step(Phase.REJOINING, (Effect.FORGET_ABANDONED,), "this node lost its lease")
    if event is Event.DECOMMISSIONED:
        return Step(
            Phase.DECOMMISSIONED, (Effect.FORGET_ABANDONED,), "this node was decommissioned"
        )
    if event is Event.UPGRADED:
        return Step(
            Phase.UPGRADE_REQUIRED, (Effect.FORGET_ABANDONED,), "the cluster runs a newer version"
        )
    return Step(Phase.FENCED)


def _rejoining(event: Event) -> Step:
    if event is Event.REJOINED:
        return Step(Phase.ONLINE, (Effect.CLEAR_CACHES, Effect.RESUME), "rejoined")
    if event is Event.DECOMMISSIONED:
        return Step(Phase.DECOMMISSIONED, (), "this node was decommissioned")
    if event is Event.UPGRADED:
        return Step(Phase.UPGRADE_REQUIRED, (), "the cluster runs a newer version")
    return Step(Phase.REJOINING)  # failed, pending, lost: try again


def _stopping(event: Event, age: float, timing: Timing) -> Step:
    if event is Event.RENEWED and not _fence_due(age, timing):
        return Step(Phase.STOPPING, (Effect.RELEASE_ABANDONED,))
    if event in (Event.LOST, Event.DECOMMISSIONED, Event.UPGRADED):
        return Step(Phase.STOPPING, (Effect.ABANDON, Effect.FORGET_ABANDONED), "lease lost")
    if event in (Event.RENEWED, Event.FAILED, Event.PENDING) and _fence_due(age, timing):
        return Step(Phase.STOPPING, (Effect.ABANDON,), f"no heartbeat for {age:.1f} s")
    return Step(Phase.STOPPING)


def next_attempt_in(phase: Phase, event: Event, timing: Timing) -> float:
    """Seconds from the start of an attempt until the next one starts (the loop subtracts the
    time the attempt took). A failed heartbeat is retried sooner: the lease is running out. A
    lease just lost is followed at once by the rejoin attempt."""
    if phase is Phase.REJOINING and event is Event.LOST:
        return 0.0
    if event is Event.FAILED:
        return timing.heartbeat_interval / 4
    return timing.heartbeat_interval


def refused_rejoin(stored: StoredStatus | None, cluster_is_newer: bool) -> Event | None:
    """Why a node that lost its lease may not register again (``DECOMMISSIONED`` or
    ``UPGRADED``), from its row as stored now (``None``: no row) and whether the cluster runs a
    newer version than this node; None when it was only declared offline and may rejoin."""
    if stored is StoredStatus.DECOMMISSIONED:
        return Event.DECOMMISSIONED
    if stored is StoredStatus.UPGRADE_REQUIRED or cluster_is_newer:
        return Event.UPGRADED
    return None
