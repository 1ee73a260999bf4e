"""The lease loop (``cluster.leasing.LeaseKeeper``) against a fake membership, without a database:
it carries out what the state machine decides. A heartbeat stuck on the database fences the node
(and is never cancelled); a lost lease is followed by a rejoin, or by Offline (Upgrade Required) /
decommissioned when the row says so; a renewal after fencing releases the abandoned jobs.

The tests wait for behaviour (bounded polls), never for a time."""

from __future__ import annotations

import asyncio
import datetime as dt
import gc
import time
from collections.abc import Callable

import pytest

from dsm_node.cluster.lease import Event, Phase
from dsm_node.cluster.leasing import Lease, LeaseKeeper, Registration, WorkEffects
from dsm_node.cluster.live import LiveSettings
from dsm_node.cluster.membership import Decommissioned, Identity, MemberRow, Renewal
from dsm_node.cluster.status import StoredStatus
from dsm_node.settings_store import ClusterSettings
from tests.unit.test_lease import FakeCaches, FakeRelease, FakeWork

NOW = dt.datetime.now(dt.UTC)


class FakeMembers:
    def __init__(self) -> None:
        self.answer: str = "renew"  # renew | hang | lost | fail
        self.row: MemberRow | None = None
        self.heartbeats = 0
        self.cancelled = 0
        self.registered = 0
        self.decommissioned = False
        self.release_hang = asyncio.Event()
        self.hang_ends_with: Exception | None = None  # raised by a hung heartbeat once released
        self.during_heartbeat: Callable[[], None] | None = None

    async def heartbeat(
        self, me: Identity, skew: float | None = None, time_zone: str | None = None
    ) -> Renewal | None:
        self.heartbeats += 1
        if self.during_heartbeat is not None:
            self.during_heartbeat()
            await asyncio.sleep(0)
        if self.answer == "hang":
            try:
                await self.release_hang.wait()
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
            if self.hang_ends_with is not None:
                raise self.hang_ends_with
        if self.answer == "fail":
            raise OSError("connection refused")
        if self.answer == "lost":
            return None
        return Renewal(dt.datetime.now(dt.UTC), float(time.localtime().tm_gmtoff), "local")

    async def node_row(self, name: str) -> MemberRow | None:
        return self.row

    async def register(self, name: str, address: str, api_port: int, version: str) -> Identity:
        if self.decommissioned:
            raise Decommissioned(name)
        self.registered += 1
        self.answer = "renew"
        return Identity(1, 1 + self.registered, name)

    async def set_alert(self, alert_type: str, node_id: int, message: str | None) -> None:
        return None


def row(status: StoredStatus, cluster: str = "0.1.0") -> MemberRow:
    return MemberRow(1, "a", status, "0.1.0", 1, NOW, NOW, cluster)


async def until(what: Callable[[], bool], message: str) -> None:
    for _ in range(2000):  # at most 20 s; usually a few heartbeat intervals of 0.1 s
        if what():
            return
        await asyncio.sleep(0.01)
    pytest.fail(f"never happened: {message}")


class Harness:
    def __init__(self) -> None:
        self.live = LiveSettings()
        self.live.adopt(  # below the API's bounds on purpose: the node's own floor is 0.1 s
            ClusterSettings().model_copy(
                update={"heartbeat_interval_seconds": 0.1, "offline_threshold_seconds": 0.6}
            )
        )
        self.lease = Lease()
        self.lease.phase = Phase.ONLINE
        self.lease.registered(Identity(1, 1, "a"))
        self.work, self.release, self.caches = FakeWork(), FakeRelease(), FakeCaches()
        self.members = FakeMembers()
        self.keeper = LeaseKeeper(
            self.lease,
            self.members,
            self.live,
            WorkEffects(self.lease, self.work, self.release, self.caches),
            Registration("a", "127.0.0.1", 4119, "0.1.0"),
        )

    async def __aenter__(self) -> Harness:
        self.task = asyncio.create_task(self.keeper.run())
        return self

    async def __aexit__(self, *_: object) -> None:
        self.members.release_hang.set()
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


async def test_a_stuck_heartbeat_fences_the_node_and_a_renewal_brings_it_back() -> None:
    async with Harness() as h:
        await until(lambda: h.members.heartbeats >= 2, "heartbeats")
        h.members.answer = "hang"
        await until(lambda: h.lease.phase is Phase.FENCED, "fenced while the heartbeat hangs")
        assert h.work.calls[-2:] == ["pause", "abandon"]
        assert h.members.cancelled == 0, "a stuck heartbeat is never cancelled"
        h.members.answer = "renew"
        h.members.release_hang.set()
        await until(lambda: h.lease.phase is Phase.ONLINE, "back online")
        assert h.release.released == [(7, 1)] and h.work.calls[-1] == "resume"


async def test_a_lost_lease_rejoins_as_a_new_incarnation() -> None:
    async with Harness() as h:
        h.members.row = row(StoredStatus.OFFLINE)
        h.members.answer = "lost"
        await until(lambda: h.members.registered == 1, "registered again")
        await until(lambda: h.lease.phase is Phase.ONLINE, "online again")
        assert h.lease.me().epoch == 2 and h.caches.clears == 1
        assert h.release.released == [], "jobs of a lost lease are never released"


@pytest.mark.parametrize(
    ("stored", "cluster", "phase"),
    [
        (StoredStatus.UPGRADE_REQUIRED, "0.2.0", Phase.UPGRADE_REQUIRED),
        (StoredStatus.OFFLINE, "0.2.0", Phase.UPGRADE_REQUIRED),
        (StoredStatus.DECOMMISSIONED, "0.1.0", Phase.DECOMMISSIONED),
    ],
)
async def test_a_lost_lease_that_may_not_rejoin_ends_the_work(
    stored: StoredStatus, cluster: str, phase: Phase
) -> None:
    async with Harness() as h:
        h.members.row = row(stored, cluster)
        h.members.answer = "lost"
        await until(lambda: h.lease.phase is phase, str(phase))
        assert h.members.registered == 0 and "resume" not in h.work.calls
        beats = h.members.heartbeats
        await asyncio.sleep(0.3)  # three intervals: not a timing assertion, a quiet period
        assert h.members.heartbeats == beats, "an idle node heartbeats no more"


async def test_failed_heartbeats_past_the_fence_point_fence_the_node() -> None:
    async with Harness() as h:
        h.members.answer = "fail"
        await until(lambda: h.lease.phase is Phase.FENCED, "fenced")
        h.members.answer = "renew"
        await until(lambda: h.lease.phase is Phase.ONLINE, "back online")


async def test_a_stop_keeps_the_lease_and_never_resumes() -> None:
    async with Harness() as h:
        await h.lease.advance(Event.STOP, h.live.timing)
        beats = h.members.heartbeats
        await until(lambda: h.members.heartbeats > beats + 2, "heartbeats go on while stopping")
        assert h.lease.phase is Phase.STOPPING and "resume" not in h.work.calls


async def test_a_shorter_interval_adopted_during_a_heartbeat_applies_to_the_next_one() -> None:
    """The settings refresh adopts a shorter interval while a heartbeat is in flight (a node that
    came up on the default 10 s, as the first node of a cluster whose timing is then set): the
    next heartbeat must come at the new interval. It used to sleep the old one out (the pause
    began after the change had woken nobody), and peers declared the node offline."""
    async with Harness() as h:
        await until(lambda: h.members.heartbeats >= 1, "first heartbeat")
        slow = ClusterSettings().model_copy(
            update={"heartbeat_interval_seconds": 3600, "offline_threshold_seconds": 10800}
        )
        fast = ClusterSettings().model_copy(
            update={"heartbeat_interval_seconds": 0.1, "offline_threshold_seconds": 0.6}
        )

        def refresh_adopts_fast() -> None:  # once: inside the first heartbeat at the slow timing
            if h.live.timing.heartbeat_interval == 3600:
                h.live.adopt(fast)

        h.members.during_heartbeat = refresh_adopts_fast
        h.live.adopt(slow)  # wakes the keeper: its next heartbeat runs at the slow timing
        beats = h.members.heartbeats
        await until(lambda: h.members.heartbeats >= beats + 4, "heartbeats at the new interval")


async def test_an_attempt_that_ends_after_its_wait_still_counts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A heartbeat stuck long enough to fence the node ends (here: fails) while the loop is busy
    fencing, after its wait timed out. Its outcome is the next one the loop acts on. The loop
    used to start a new attempt over it, dropping the outcome ("Task exception was never
    retrieved" in a node's log after SIGSTOP/SIGCONT)."""
    unretrieved: list[str] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _, context: unretrieved.append(str(context["message"])))
    async with Harness() as h:
        await until(lambda: h.members.heartbeats >= 2, "heartbeats")
        fence = h.work.pause

        def fence_and_end_the_heartbeat(reason: str) -> None:
            fence(reason)
            h.members.hang_ends_with = OSError("the late outcome")
            h.members.answer = "renew"
            h.members.release_hang.set()

        h.work.pause = fence_and_end_the_heartbeat  # type: ignore[method-assign]
        h.members.answer = "hang"
        await until(lambda: h.members.release_hang.is_set(), "fenced while the heartbeat hangs")
        await until(lambda: h.lease.phase is Phase.ONLINE, "back online")
    gc.collect()
    assert "the late outcome" in caplog.text, caplog.text
    assert unretrieved == []
