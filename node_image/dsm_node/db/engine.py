"""Creates SQLAlchemy engines (psycopg 3 underneath) with the session settings a node needs."""

from __future__ import annotations

from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine


def sqlalchemy_url(url: str) -> str:
    """Accepts plain ``postgresql://`` URLs (what users and Secrets hold) and picks psycopg 3."""
    u = make_url(url)
    if u.drivername in ("postgresql", "postgres", "postgresql+psycopg2"):
        u = u.set(drivername="postgresql+psycopg")
    if u.drivername != "postgresql+psycopg":
        raise ValueError(f"unsupported database URL scheme {u.drivername!r}: use postgresql://")
    return u.render_as_string(hide_password=False)


def libpq_url(url: str) -> str:
    """The same URL for plain psycopg / libpq (LISTEN connections, tools)."""
    u = make_url(sqlalchemy_url(url)).set(drivername="postgresql")
    return u.render_as_string(hide_password=False)


def create_engine(
    url: str,
    *,
    pool_size: int = 8,
    application_name: str = "dsm",
    idle_in_transaction_timeout_s: float | None = None,
    connect_timeout_s: int = 5,
) -> AsyncEngine:
    # force_custom_plan: the claim query's generic plan can turn into a sequential scan on a
    # freshly emptied table (seen in measurements); re-planning costs microseconds.
    options = "-c plan_cache_mode=force_custom_plan"
    if idle_in_transaction_timeout_s:
        # A paused node must not hold row locks that block the takeover of its work.
        options += (
            f" -c idle_in_transaction_session_timeout={int(idle_in_transaction_timeout_s * 1000)}"
        )
    return create_async_engine(
        sqlalchemy_url(url),
        pool_size=pool_size,
        max_overflow=4,
        pool_timeout=30,
        pool_pre_ping=False,
        connect_args={
            "application_name": application_name,
            "options": options,
            "connect_timeout": connect_timeout_s,
        },
    )
