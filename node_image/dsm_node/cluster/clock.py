"""Pure rules of the "Manager Time Out of Sync" check. No I/O here.

Liveness never depends on a node's own clock (the database's ``now()`` is the only clock for
heartbeats and offline detection); a node's clock is only compared with the database's, because
the original product raises this alert when they disagree: by more than 30 seconds, or in time
zone.
"""

from __future__ import annotations

TIME_ALERT = "Manager Time Out of Sync"
MAX_CLOCK_SKEW_SECONDS = 30.0


def out_of_sync(
    skew: float, local_utc_offset: int, local_tz: str, db_utc_offset: float, db_tz: str
) -> str:
    """Why this node's clock is out of sync with the database's ("" when it is not).

    ``skew``: this node's clock minus the database's, in seconds; offsets in seconds east of
    UTC."""
    problems = []
    if abs(skew) > MAX_CLOCK_SKEW_SECONDS:
        problems.append(f"clock differs from the database's by {skew:+.1f} s")
    if int(db_utc_offset) != local_utc_offset:
        problems.append(
            f"time zone {local_tz} (UTC{local_utc_offset / 3600:+g}) differs from the "
            f"database's {db_tz} (UTC{db_utc_offset / 3600:+g})"
        )
    return "; ".join(problems)
