"""The node's lease as a pure state machine (``cluster.lease``), without a database: every phase
against every event, with a fresh lease and with one past the fence point, written out in full;
then the rules every step must keep, checked over a grid of ages and timings; then ``Lease``, the
one place that changes the phase (effects first, all or nothing)."""

from __future__ import annotations

import itertools

import pytest

from dsm_node.cluster import lease
from dsm_node.cluster.lease import Attempt, Effect, Event, Phase, Step
from dsm_node.cluster.leasing import Lease, WorkEffects
from dsm_node.cluster.membership import Identity
from dsm_node.cluster.status import StoredStatus
from dsm_node.cluster.timing import Timing

T = Timing(heartbeat_interval=10.0, offline_threshold=180.0)  # fence point: 120 s
FRESH, STALE = 1.0, 130.0

P, A, F, R, C, U = (
    Effect.PAUSE,
    Effect.ABANDON,
    Effect.FORGET_ABANDONED,
    Effect.RELEASE_ABANDONED,
    Effect.CLEAR_CACHES,
    Effect.RESUME,
)
S = Phase  # short names for the table
E = Event


def _unchanged(phase: Phase) -> dict[Event, tuple[Phase, tuple[Effect, ...]]]:
    return {e: (phase, ()) for e in Event}


def _expected() -> dict[tuple[Phase, Event, float], tuple[Phase, tuple[Effect, ...]]]:
    """The whole table, written out by hand: (phase, event, age) -> (next phase, effects)."""
    table: dict[tuple[Phase, Event, float], tuple[Phase, tuple[Effect, ...]]] = {}

    def row(
        phase: Phase,
        fresh: dict[Event, tuple[Phase, tuple[Effect, ...]]],
        stale: dict[Event, tuple[Phase, tuple[Effect, ...]]] | None = None,
    ) -> None:
        for e in Event:
            table[(phase, e, FRESH)] = fresh[e]
            table[(phase, e, STALE)] = (stale or fresh)[e]

    stop = {E.STOP: (S.STOPPING, ())}

    row(S.STARTING, {**_unchanged(S.STARTING), **stop, E.JOIN: (S.JOINING, ())})
    row(
        S.JOINING,
        {
            **_unchanged(S.JOINING),
            **stop,
            E.JOINED: (S.ONLINE, (U,)),
            E.UPGRADED: (S.UPGRADE_REQUIRED, ()),
        },
    )
    online = {
        **_unchanged(S.ONLINE),
        **stop,
        E.LOST: (S.REJOINING, (P, A, F)),
        E.DECOMMISSIONED: (S.DECOMMISSIONED, (P, A, F)),
        E.UPGRADED: (S.UPGRADE_REQUIRED, (P, A, F)),
    }
    fence = (S.FENCED, (P, A))
    row(S.ONLINE, online, {**online, E.RENEWED: fence, E.FAILED: fence, E.PENDING: fence})
    fenced = {
        **_unchanged(S.FENCED),
        **stop,
        E.RENEWED: (S.ONLINE, (R, U)),
        E.LOST: (S.REJOINING, (F,)),
        E.DECOMMISSIONED: (S.DECOMMISSIONED, (F,)),
        E.UPGRADED: (S.UPGRADE_REQUIRED, (F,)),
    }
    row(S.FENCED, fenced, {**fenced, E.RENEWED: (S.FENCED, (R,))})
    row(
        S.REJOINING,
        {
            **_unchanged(S.REJOINING),
            **stop,
            E.REJOINED: (S.ONLINE, (C, U)),
            E.DECOMMISSIONED: (S.DECOMMISSIONED, ()),
            E.UPGRADED: (S.UPGRADE_REQUIRED, ()),
        },
    )
    row(S.UPGRADE_REQUIRED, {**_unchanged(S.UPGRADE_REQUIRED), **stop})
    row(S.DECOMMISSIONED, {**_unchanged(S.DECOMMISSIONED), **stop})
    lost = (S.STOPPING, (A, F))
    stopping = {
        **_unchanged(S.STOPPING),
        E.STOPPED: (S.STOPPED, ()),
        E.RENEWED: (S.STOPPING, (R,)),
        E.LOST: lost,
        E.DECOMMISSIONED: lost,
        E.UPGRADED: lost,
    }
    abandon = (S.STOPPING, (A,))
    row(
        S.STOPPING,
        stopping,
        {**stopping, E.RENEWED: abandon, E.FAILED: abandon, E.PENDING: abandon},
    )
    row(S.STOPPED, _unchanged(S.STOPPED))
    return table


EXPECTED = _expected()


def test_the_table_covers_every_phase_and_event() -> None:
    assert len(EXPECTED) == len(Phase) * len(Event) * 2


@pytest.mark.parametrize(
    ("phase", "event", "age"),
    list(itertools.product(Phase, Event, (FRESH, STALE))),
    ids=lambda x: str(x),
)
def test_every_phase_and_event(phase: Phase, event: Event, age: float) -> None:
    s = lease.step(phase, event, age, T)
    assert (s.phase, s.effects) == EXPECTED[(phase, event, age)]


AGES = (0.0, 5.0, 59.9, 119.9, 120.0, 120.1, 179.0, 181.0, 1e6)
TIMINGS = [Timing(i, t) for i, t in ((0.5, 1.5), (1.0, 10.0), (10.0, 180.0), (600.0, 86400.0))]
EVERYTHING = list(itertools.product(Phase, Event, AGES, TIMINGS))


def test_only_a_step_to_online_resumes_work_and_it_resumes_last() -> None:
    for phase, event, age, t in EVERYTHING:
        s = lease.step(phase, event, age, t)
        if U in s.effects:
            assert s.phase is Phase.ONLINE and s.effects[-1] is U, (phase, event, s)
        if s.phase is Phase.ONLINE and phase is not Phase.ONLINE:
            assert s.effects[-1:] == (U,), (phase, event, s)


def test_leaving_online_always_stops_the_work() -> None:
    """Fenced, lost, upgraded or decommissioned: no job keeps running on a node that may not
    finish it (a stop drains instead)."""
    for _, event, age, t in EVERYTHING:
        s = lease.step(Phase.ONLINE, event, age, t)
        if s.phase not in (Phase.ONLINE, Phase.STOPPING):
            assert s.effects[:2] == (P, A), (event, age, s)


def test_a_node_stops_working_before_its_peers_may_take_over() -> None:
    """Past the fence point no heartbeat outcome keeps a node online, and the fence point comes
    before the offline threshold for every timing."""
    for _, event, age, t in EVERYTHING:
        assert t.fence_after < t.offline_threshold
        if age > t.fence_after and event in (Event.RENEWED, Event.FAILED, Event.PENDING):
            assert lease.step(Phase.ONLINE, event, age, t).phase is Phase.FENCED
            assert lease.step(Phase.FENCED, event, age, t).phase is Phase.FENCED


def test_jobs_of_a_lost_lease_are_forgotten_never_released() -> None:
    """Another node holds them: releasing would be harmless (fenced) but wrong; and a step never
    both forgets and releases."""
    for phase, event, age, t in EVERYTHING:
        s = lease.step(phase, event, age, t)
        assert not (F in s.effects and R in s.effects), (phase, event, s)
        if event in (Event.LOST, Event.DECOMMISSIONED, Event.UPGRADED) and s.effects:
            assert R not in s.effects and F in s.effects, (phase, event, s)


def test_upgrade_required_and_decommissioned_end_only_with_a_stop() -> None:
    for phase in (Phase.UPGRADE_REQUIRED, Phase.DECOMMISSIONED):
        for _, event, age, t in EVERYTHING:
            s = lease.step(phase, event, age, t)
            assert s.effects == ()
            assert s.phase is (Phase.STOPPING if event is Event.STOP else phase)


def test_a_stopping_node_never_resumes_and_keeps_heartbeating() -> None:
    for _, event, age, t in EVERYTHING:
        s = lease.step(Phase.STOPPING, event, age, t)
        assert U not in s.effects and s.phase in (Phase.STOPPING, Phase.STOPPED)
    assert lease.attempt_for(Phase.STOPPING) is Attempt.HEARTBEAT


def test_the_attempt_each_phase_makes() -> None:
    assert {p: lease.attempt_for(p) for p in Phase} == {
        Phase.STARTING: Attempt.NOTHING,
        Phase.JOINING: Attempt.NOTHING,
        Phase.ONLINE: Attempt.HEARTBEAT,
        Phase.FENCED: Attempt.HEARTBEAT,
        Phase.REJOINING: Attempt.REJOIN,
        Phase.UPGRADE_REQUIRED: Attempt.NOTHING,
        Phase.DECOMMISSIONED: Attempt.NOTHING,
        Phase.STOPPING: Attempt.HEARTBEAT,
        Phase.STOPPED: Attempt.NOTHING,
    }


def test_when_the_next_attempt_comes() -> None:
    assert lease.next_attempt_in(Phase.ONLINE, Event.RENEWED, T) == 10.0
    assert lease.next_attempt_in(Phase.ONLINE, Event.FAILED, T) == 2.5  # the lease runs out
    assert lease.next_attempt_in(Phase.FENCED, Event.PENDING, T) == 10.0
    assert lease.next_attempt_in(Phase.REJOINING, Event.LOST, T) == 0.0  # rejoin at once
    assert lease.next_attempt_in(Phase.REJOINING, Event.FAILED, T) == 2.5


@pytest.mark.parametrize(
    ("stored", "newer", "verdict"),
    [
        (None, False, None),
        (StoredStatus.ONLINE, False, None),
        (StoredStatus.OFFLINE, False, None),
        (StoredStatus.OFFLINE, True, Event.UPGRADED),
        (StoredStatus.UPGRADE_REQUIRED, False, Event.UPGRADED),
        (StoredStatus.DECOMMISSIONED, False, Event.DECOMMISSIONED),
        (StoredStatus.DECOMMISSIONED, True, Event.DECOMMISSIONED),
    ],
)
def test_why_a_node_may_not_rejoin(
    stored: StoredStatus | None, newer: bool, verdict: Event | None
) -> None:
    assert lease.refused_rejoin(stored, newer) is verdict


# -- Lease: the one place that changes the phase ----------------------------------------------


class FakeWork:
    def __init__(self) -> None:
        self.calls: list[str] = []
        self.abandoned: list[tuple[int, int]] = []

    def pause(self, reason: str) -> None:
        self.calls.append("pause")

    def resume(self) -> None:
        self.calls.append("resume")

    def abandon_running(self, reason: str) -> list[int]:
        self.calls.append("abandon")
        self.abandoned += [(7, 1)]
        return [7]

    def take_abandoned(self) -> list[tuple[int, int]]:
        held, self.abandoned = self.abandoned, []
        return held

    def keep_abandoned(self, held: list[tuple[int, int]]) -> None:
        self.abandoned = held + self.abandoned


class FakeRelease:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.released: list[tuple[int, int]] = []

    async def __call__(self, node_id: int, held: list[tuple[int, int]], reason: str) -> int:
        if self.fail:
            raise OSError("database unreachable")
        self.released += held
        return len(held)


class FakeCaches:
    def __init__(self) -> None:
        self.clears = 0

    def clear(self) -> int:
        self.clears += 1
        return 0


def online_lease() -> Lease:
    lz = Lease()
    lz.phase = Phase.ONLINE
    lz.registered(Identity(1, 1, "a"))
    return lz


async def test_fencing_then_renewal_releases_what_was_abandoned() -> None:
    lz, work, release = online_lease(), FakeWork(), FakeRelease()
    effects = WorkEffects(lz, work, release, FakeCaches())
    assert lz.renewed_at is not None
    lz.renewed_at -= STALE
    await lz.advance(Event.PENDING, T, effects)
    assert lz.phase is Phase.FENCED and work.calls == ["pause", "abandon"]
    lz.renewed_at += STALE  # the heartbeat came through
    await lz.advance(Event.RENEWED, T, effects)
    assert lz.phase is Phase.ONLINE and work.calls[-1] == "resume"
    assert release.released == [(7, 1)] and work.abandoned == []


async def test_a_failed_release_leaves_the_node_fenced_and_keeps_the_jobs() -> None:
    lz, work = online_lease(), FakeWork()
    effects = WorkEffects(lz, work, FakeRelease(fail=True), FakeCaches())
    lz.phase = Phase.FENCED
    work.abandoned = [(7, 1)]
    with pytest.raises(OSError):
        await lz.advance(Event.RENEWED, T, effects)
    assert lz.phase is Phase.FENCED, "the phase moves only when every effect succeeded"
    assert work.abandoned == [(7, 1)] and "resume" not in work.calls


async def test_a_lost_lease_forgets_the_jobs_and_a_rejoin_clears_the_caches() -> None:
    lz, work, caches = online_lease(), FakeWork(), FakeCaches()
    release = FakeRelease()
    effects = WorkEffects(lz, work, release, caches)
    await lz.advance(Event.LOST, T, effects)
    assert lz.phase is Phase.REJOINING and work.abandoned == [] and release.released == []
    lz.registered(Identity(1, 2, "a"))
    await lz.advance(Event.REJOINED, T, effects)
    assert lz.phase is Phase.ONLINE and caches.clears == 1 and work.calls[-1] == "resume"


async def test_a_stop_during_a_step_wins() -> None:
    """A stop that lands while a step waits on its effects (a release) is not undone."""
    lz, work = online_lease(), FakeWork()
    lz.phase = Phase.FENCED
    work.abandoned = [(7, 1)]

    class StopDuringRelease(FakeRelease):
        async def __call__(self, node_id: int, held: list[tuple[int, int]], reason: str) -> int:
            await lz.advance(Event.STOP, T)
            return await super().__call__(node_id, held, reason)

    s = await lz.advance(Event.RENEWED, T, WorkEffects(lz, work, StopDuringRelease(), FakeCaches()))
    assert lz.phase is Phase.STOPPING and s == Step(Phase.STOPPING)


async def test_effects_before_the_node_has_work_are_refused() -> None:
    lz = Lease()
    await lz.advance(Event.JOIN, T)
    with pytest.raises(RuntimeError, match="needs the node's work"):
        await lz.advance(Event.JOINED, T)
    assert lz.phase is Phase.JOINING
    with pytest.raises(RuntimeError, match="has not joined"):
        lz.me()
