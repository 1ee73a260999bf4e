"""Retries of failed jobs (``jobs/states.py``): exponential backoff with jitter, capped, and the
dead letter after the last attempt."""

from __future__ import annotations

import random

from dsm_node.jobs import states


def test_backoff_grows_exponentially_and_is_capped() -> None:
    b = states.Backoff(base_seconds=2, max_seconds=60, jitter=0)
    assert [b.delay(n) for n in (1, 2, 3, 4, 10)] == [2, 4, 8, 16, 60]
    jittered = states.Backoff(base_seconds=10, jitter=0.2)
    rnd = random.Random(1)
    assert all(8 <= jittered.delay(1, rnd) <= 12 for _ in range(100))
    assert states.after_failure(3, 3, b).retry is False
    assert states.after_failure(2, 3, b) == states.AfterFailure(True, 4)
