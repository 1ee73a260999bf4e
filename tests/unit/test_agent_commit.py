"""Group commit and the wire format, with a fake recorder (the real one is exercised against
PostgreSQL in tests/integration/test_agents*.py)."""

from __future__ import annotations

import asyncio
import time

import pytest

from dsm_node.agents import protocol
from dsm_node.agents.committing import GroupCommitter
from dsm_node.agents.protocol import Heartbeat, ProtocolError
from dsm_node.agents.store import Accepted, BatchResult, Pending


def _pending(agent_id: int, bad: bool = False) -> Pending:
    hb = Heartbeat.model_validate(
        {"protocol": 1, "agentId": agent_id, "status": "error" if bad else "ok", "clock": 1.0}
    )
    return Pending(agent_id, 1, hb)


async def test_concurrent_heartbeats_share_a_commit_and_each_waits_for_it() -> None:
    batches: list[list[int]] = []
    committed: set[int] = set()

    async def record(batch: list[Pending]) -> BatchResult:
        await asyncio.sleep(0.05)  # a commit
        batches.append([p.agent_id for p in batch])
        committed.update(p.agent_id for p in batch)
        return BatchResult([Accepted(p.agent_id) for p in batch], 0)

    gc = GroupCommitter(record, max_batch=100, max_wait=0.01, committers=1)
    gc.start()

    async def one(i: int) -> None:
        outcome = await gc.submit(_pending(i))
        assert isinstance(outcome, Accepted) and outcome.acked == i
        assert i in committed  # answered only after its batch committed

    await asyncio.gather(*(one(i) for i in range(1, 201)))
    await gc.stop()
    assert sum(len(b) for b in batches) == 200
    assert len(batches) <= 10, batches  # 200 heartbeats, not 200 transactions
    assert max(len(b) for b in batches) <= 100


async def test_one_agent_never_twice_in_a_batch() -> None:
    batches: list[list[int]] = []

    async def record(batch: list[Pending]) -> BatchResult:
        batches.append([p.agent_id for p in batch])
        return BatchResult([Accepted(0) for _ in batch], 0)

    gc = GroupCommitter(record, max_batch=100, max_wait=0.01, committers=1)
    gc.start()
    await asyncio.gather(*(gc.submit(_pending(7)) for _ in range(3)), gc.submit(_pending(8)))
    await gc.stop()
    assert all(len(b) == len(set(b)) for b in batches), batches
    assert sorted(x for b in batches for x in b) == [7, 7, 7, 8]


async def test_a_heartbeat_that_breaks_its_batch_costs_only_itself() -> None:
    async def record(batch: list[Pending]) -> BatchResult:
        if any(p.heartbeat.status == "error" for p in batch):
            raise ValueError("invalid input syntax")  # not a database outage
        return BatchResult([Accepted(1) for _ in batch], 0)

    gc = GroupCommitter(record, max_batch=100, max_wait=0.01, committers=1)
    gc.start()
    outcomes = await asyncio.gather(*(gc.submit(_pending(i, bad=i == 3)) for i in range(1, 6)))
    await gc.stop()
    assert [type(o).__name__ for o in outcomes] == [
        "Accepted",
        "Accepted",
        "ProtocolError",
        "Accepted",
        "Accepted",
    ]
    refused = outcomes[2]
    assert isinstance(refused, ProtocolError) and refused.status == 400


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"not json", "malformed_json"),
        (b"[]", "invalid_request"),
        (b'{"protocol": 9, "agentId": 1, "status": "ok", "clock": 1}', "unsupported_protocol"),
        (b'{"protocol": 1, "agentId": 1, "status": "ok", "clock": NaN}', "invalid_request"),
        (b'{"protocol": 1, "agentId": true, "status": "ok", "clock": 1}', "invalid_request"),
    ],
)
def test_the_wire_format_refuses_with_a_code(body: bytes, code: str) -> None:
    with pytest.raises(ProtocolError) as e:
        protocol.parse_heartbeat(body)
    assert e.value.code == code and e.value.status == 400


def test_fingerprints_are_canonical() -> None:
    assert protocol.fingerprint({"a": 1, "b": 2}) == protocol.fingerprint({"b": 2, "a": 1})
    assert time.time() > 0
