"""When an agent heartbeats next: spread at random, never later than the interval (so the agents
of a lost node are re-homed within one interval)."""

from __future__ import annotations

import random

from dsm_node.agents.agent import heartbeat_delay


def test_the_next_heartbeat_comes_within_the_interval_and_spread_out() -> None:
    rng = random.Random(7)
    for interval in (0.5, 10.0, 180.0, 600.0):
        delays = [heartbeat_delay(interval, rng) for _ in range(5000)]
        assert max(delays) <= interval
        assert min(delays) >= 0.9 * interval
        # spread over the whole tenth: agents that lost their node together come back apart
        assert max(delays) - min(delays) > 0.09 * interval
        assert len({round(d, 6) for d in delays}) > 4000
