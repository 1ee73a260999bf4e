"""Pure rules of a job's life: what happens after an attempt ends. No I/O here.

ready --claim--> running --success--> succeeded (history)
                    |--failure, attempts left--> ready (run_at = now + backoff)
                    |--failure, none left------> failed (history, dead letter, with the error)
                    |--past its deadline-------> as a failure (whoever owns it; the sweep does it)
                    |--owner offline-----------> ready (taken over; the attempt stays spent)
                    |--released----------------> ready (graceful shutdown, fencing: the attempt
                                                   is refunded, it does not count)
local jobs whose node leaves ---------------------> discarded (history)

Every claim increments the attempt counter, which with the owner is the fencing token and never
repeats; attempts counted against max_attempts are the claims minus the refunded releases.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from enum import StrEnum


class JobState(StrEnum):
    """``jobs.state``: the hot table holds only these (finished jobs are in ``job_history``)."""

    READY = "ready"
    RUNNING = "running"


class Outcome(StrEnum):
    """``job_history.outcome``: how a job left the pool."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    DISCARDED = "discarded"


class AttemptEnd(StrEnum):
    """How one attempt ended on the node that ran it (the ``outcome`` label of ``dsm_jobs``)."""

    SUCCEEDED = "succeeded"
    RETRYING = "retrying"  # failed, attempts left: back in the pool after a backoff
    FAILED = "failed"  # failed, none left: a dead letter
    LOST = "lost"  # another node held the job by then: nothing was recorded
    ABANDONED = "abandoned"  # cancelled (fenced, lost lease, shutdown): released or taken over


class PublicState(StrEnum):
    """The state a user sees (``GET /api/jobs/{id}``)."""

    SCHEDULED = "scheduled"
    READY = "ready"
    RETRYING = "retrying"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    DISCARDED = "discarded"


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff: base * 2^(attempt-1), capped, with +-jitter so retries do not align."""

    base_seconds: float = 2.0
    max_seconds: float = 3600.0
    jitter: float = 0.2

    def delay(self, attempt: int, rnd: random.Random | None = None) -> float:
        raw = min(self.max_seconds, self.base_seconds * (2 ** max(0, attempt - 1)))
        r = float((rnd or random).uniform(-self.jitter, self.jitter))
        return max(0.0, float(raw) * (1 + r))


@dataclass(frozen=True)
class AfterFailure:
    retry: bool
    delay_seconds: float = 0.0


def after_failure(
    attempt: int, max_attempts: int, backoff: Backoff, rnd: random.Random | None = None
) -> AfterFailure:
    """A failed attempt number ``attempt`` (1-based) is retried while attempts remain."""
    if attempt < max_attempts:
        return AfterFailure(True, backoff.delay(attempt, rnd))
    return AfterFailure(False)


def public_state(
    state: JobState | None, outcome: Outcome | None, attempt: int, run_at_in_future: bool
) -> PublicState:
    """The state a user sees, from a job's row: in the pool (``state``) or finished
    (``outcome``)."""
    if outcome is not None:
        return PublicState(outcome.value)
    if state is JobState.RUNNING:
        return PublicState.RUNNING
    if attempt > 0:
        return PublicState.RETRYING
    return PublicState.SCHEDULED if run_at_in_future else PublicState.READY
