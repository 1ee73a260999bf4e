"""What follows from the cluster's heartbeat interval and offline threshold. Pure: no I/O here.

Every node derives the same values from the same two settings, which an administrator may change
while the cluster runs. The chain of events when a node goes silent, with T the offline threshold
and I the heartbeat interval, counted from its last committed heartbeat:

    T/3   the database server ends any membership session of the node that sits idle inside a
          transaction (row locks on node rows are released), and any statement of it that runs
          longer; TCP timeouts close its half-open connections
    2T/3  the node, if it is alive but cannot heartbeat, has stopped claiming and abandoned its
          jobs (it fenced itself); the server ends its job-pool sessions idle in a transaction
          (row locks on job rows are released, uncommitted work rolled back)
    T     peers may declare it offline; the first sweep after that (within I) does, and returns
          its jobs to the pool

What a silent node may hold that its peers need, and when they get it:
- its own row (a heartbeat in flight): peers' sweeps skip it until the server ends that session
  at T/3, long before they may declare the node offline at T;
- rows of peers its own sweep was marking offline: those peers were silent past T already;
- job rows its completion deleted: sweeps skip them; the server rolls the deletion back at 2T/3
  after the node froze; since its last committed heartbeat is at most about I older than that,
  the jobs return to the pool by T + I when I <= T/3 (the settings API requires a threshold well
  above the interval), and one interval later otherwise.
No membership statement waits on a lock for longer than min(I, T/6), so a heartbeat is never
still waiting when the next one is due; the sweep skips locked rows and returns to them later.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from dsm_node.cluster.status import fence_after

# Bounds that keep the arithmetic (and PostgreSQL's intervals) meaningful whatever is stored.
# The settings API refuses values outside narrower bounds; these only protect a running node
# from a value written some other way.
MIN_INTERVAL_SECONDS = 0.1
MAX_INTERVAL_SECONDS = 3600.0
MAX_THRESHOLD_SECONDS = 7 * 86400.0
# A threshold shorter than two intervals would declare healthy nodes offline between heartbeats.
MIN_THRESHOLD_INTERVALS = 2.0


@dataclass(frozen=True)
class Timing:
    """The effective heartbeat interval and offline threshold, and every timeout they imply."""

    heartbeat_interval: float
    offline_threshold: float

    @property
    def fence_after(self) -> float:
        return fence_after(self.offline_threshold)

    @property
    def membership_lock_timeout(self) -> float:
        """Longest wait of a membership statement on a row lock: at most one interval (the next
        heartbeat is then never late), and far below the fence point."""
        return min(self.heartbeat_interval, self.offline_threshold / 6)

    @property
    def membership_session_timeout(self) -> float:
        """Longest a membership statement may run, and a membership session may sit idle inside
        a transaction, before the server ends it (its locks freed): a third of the threshold."""
        return self.offline_threshold / 3

    @property
    def job_idle_in_transaction_timeout(self) -> float:
        """Longest a job-pool session may sit idle inside a transaction: the fence point. A live
        node abandons its jobs then anyway; a frozen one cannot, so the server does it."""
        return self.fence_after

    @property
    def tcp_user_timeout(self) -> float:
        """Unacknowledged data on a connection for this long closes it (both ends): a third of the
        threshold, at least a second."""
        return max(1.0, self.offline_threshold / 3)

    @property
    def keepalive(self) -> tuple[int, int, int]:
        """TCP keepalive (idle, interval, count) in whole seconds: a dead idle connection is
        noticed after about a third of the threshold (3 s at the least: keepalives count whole
        seconds). Only idle connections depend on it, and an idle connection holds no locks; a
        connection idle inside a transaction is ended by the idle-in-transaction timeout."""
        idle = max(1, round(self.offline_threshold / 6))
        interval = max(1, round(self.offline_threshold / 12))
        return idle, interval, 2

    @property
    def deadline_grace(self) -> float:
        """How long past its deadline a running job stays with its owner before the sweep returns
        it to the pool. The owner times a job out itself at the deadline (counted from before its
        claim, so never later than the database's deadline); the grace only spares it the race."""
        return 2 * self.heartbeat_interval

    def membership_session(self) -> dict[str, str]:
        """Server settings of the membership connections (heartbeat, sweep, takeover)."""
        return {
            "lock_timeout": _ms(self.membership_lock_timeout),
            "statement_timeout": _ms(self.membership_session_timeout),
            "idle_in_transaction_session_timeout": _ms(self.membership_session_timeout),
            **self._tcp_server(),
        }

    def job_session(self) -> dict[str, str]:
        """Server settings of the job pool's connections. No lock or statement timeout: job
        statements skip locked rows or touch only rows this node owns, and a transactional job
        may legitimately run long statements; only a transaction left idle is bounded."""
        return {
            "idle_in_transaction_session_timeout": _ms(self.job_idle_in_transaction_timeout),
            **self._tcp_server(),
        }

    def client_tcp(self) -> dict[str, int]:
        """libpq parameters of every connection the node opens: keepalives and
        ``tcp_user_timeout``, so the node's side also notices a dead link."""
        idle, interval, count = self.keepalive
        return {
            "keepalives": 1,
            "keepalives_idle": idle,
            "keepalives_interval": interval,
            "keepalives_count": count,
            "tcp_user_timeout": round(self.tcp_user_timeout * 1000),
        }

    def _tcp_server(self) -> dict[str, str]:
        idle, interval, count = self.keepalive
        return {
            "tcp_keepalives_idle": str(idle),
            "tcp_keepalives_interval": str(interval),
            "tcp_keepalives_count": str(count),
            "tcp_user_timeout": _ms(self.tcp_user_timeout),
        }


def _ms(seconds: float) -> str:
    return f"{max(1, round(seconds * 1000))}ms"


def effective(interval: float, threshold: float) -> tuple[Timing, list[str]]:
    """The timing a node works with for stored settings, clamped into bounds that keep the
    cluster working, with a readable line for each value it had to change."""
    problems: list[str] = []
    i = min(max(_finite(interval, 10.0), MIN_INTERVAL_SECONDS), MAX_INTERVAL_SECONDS)
    if i != interval:
        problems.append(f"heartbeat interval {interval!r} s is out of range; using {i:g} s")
    t = min(max(_finite(threshold, 180.0), MIN_THRESHOLD_INTERVALS * i), MAX_THRESHOLD_SECONDS)
    if t != threshold:
        problems.append(f"offline threshold {threshold!r} s is out of range; using {t:g} s")
    return Timing(i, t), problems


def _finite(value: Any, default: float) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return default
    return v if math.isfinite(v) else default


def reconcile_settings(model: Any, stored: dict[str, Any], last_good: Any) -> tuple[Any, list[str]]:
    """Builds ``model`` (a pydantic settings class) from stored values. A value the model refuses
    is replaced by the one from ``last_good`` (the settings the node worked with so far) instead of
    refusing them all, so that one bad row cannot stop a node; each replacement is reported."""
    values = {k: v for k, v in stored.items() if k in model.model_fields}
    problems: list[str] = []
    for _ in range(len(values) + 1):
        try:
            return model(**values), problems
        except ValidationError as e:
            bad = {str(err["loc"][0]) for err in e.errors() if err["loc"]} & set(values)
            if not bad:  # a rule across fields: keep what worked
                problems.append(f"stored settings refused ({_first_error(e)}); keeping the last")
                return last_good, problems
            for key in sorted(bad):
                problems.append(
                    f"stored setting {key}={values[key]!r} refused; keeping "
                    f"{getattr(last_good, key)!r}"
                )
                values[key] = getattr(last_good, key)
    return last_good, problems


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    return str(err.get("msg", e))
