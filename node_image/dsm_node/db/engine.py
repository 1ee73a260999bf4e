"""Creates SQLAlchemy engines (psycopg 3 underneath) with the session settings a node needs.

Some session settings follow the cluster's heartbeat interval and offline threshold, which an
administrator may change while nodes run (``cluster.timing`` says which values and why). They live
in a ``SessionLimits`` object shared with the engine: a new connection gets the current values when
it connects (server settings in ``options``, TCP keepalives and ``tcp_user_timeout`` as libpq
parameters), and a pooled connection is brought up to date with ``set_config`` when it is checked
out after a change (one round trip, only after a change).
"""

from __future__ import annotations

import threading
from typing import Any

import psycopg
import sqlalchemy.exc
from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import ConnectionPoolEntry

# force_custom_plan: the claim query's generic plan can turn into a sequential scan on a freshly
# emptied table (seen in measurements); re-planning costs microseconds.
BASE_OPTIONS = "-c plan_cache_mode=force_custom_plan"


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


class SessionLimits:
    """Settings every connection of an engine carries, changeable at run time.

    ``server``: PostgreSQL settings of the session (``lock_timeout``, ``statement_timeout``,
    ``idle_in_transaction_session_timeout``, the server side's ``tcp_user_timeout`` and keepalives),
    as strings PostgreSQL accepts (``'1500ms'``, ``'30s'``). ``client``: libpq connection
    parameters (``keepalives_idle``, ``tcp_user_timeout``, ...) that only a new connection can take.
    """

    def __init__(
        self, server: dict[str, str] | None = None, client: dict[str, int] | None = None
    ) -> None:
        self._lock = threading.Lock()
        self.server: dict[str, str] = dict(server or {})
        self.client: dict[str, int] = dict(client or {})
        self.generation = 0

    def update(self, server: dict[str, str], client: dict[str, int]) -> bool:
        """Records new values; pooled connections take them at their next checkout. Returns
        whether anything changed."""
        with self._lock:
            if server == self.server and client == self.client:
                return False
            self.server, self.client = dict(server), dict(client)
            self.generation += 1
            return True

    def snapshot(self) -> tuple[int, dict[str, str], dict[str, int]]:
        with self._lock:
            return self.generation, dict(self.server), dict(self.client)


def connection_options(server: dict[str, str]) -> str:
    """The libpq ``options`` string that sets these server settings at connection start."""
    return " ".join([BASE_OPTIONS, *(f"-c {k}={v}" for k, v in sorted(server.items()))])


def create_engine(
    url: str,
    *,
    pool_size: int = 8,
    max_overflow: int = 4,
    application_name: str = "dsm",
    limits: SessionLimits | None = None,
    connect_timeout_s: int = 5,
) -> AsyncEngine:
    engine = create_async_engine(
        sqlalchemy_url(url),
        pool_size=pool_size,
        max_overflow=max_overflow,
        pool_timeout=30,
        pool_pre_ping=False,
        connect_args={
            "application_name": application_name,
            "options": BASE_OPTIONS,
            "connect_timeout": connect_timeout_s,
        },
    )
    if limits is not None:
        _apply_limits(engine, limits)
    return engine


def _apply_limits(engine: AsyncEngine, limits: SessionLimits) -> None:
    @event.listens_for(engine.sync_engine, "do_connect")
    def on_connect(
        dialect: Any, record: ConnectionPoolEntry, cargs: Any, cparams: dict[str, Any]
    ) -> None:
        generation, server, client = limits.snapshot()
        # cparams is shared by every connect of this engine: overwrite, never append.
        cparams["options"] = connection_options(server)
        for key in ("keepalives", "keepalives_idle", "keepalives_interval", "keepalives_count"):
            cparams.pop(key, None)
        cparams.pop("tcp_user_timeout", None)
        cparams.update(client)
        record.info["limits_generation"] = generation

    @event.listens_for(engine.sync_engine, "checkout")
    def on_checkout(dbapi_connection: Any, record: ConnectionPoolEntry, proxy: Any) -> None:
        generation, server, _ = limits.snapshot()
        if record.info.get("limits_generation") == generation:
            return
        if server:
            try:
                _set_session(dbapi_connection, server)
            except Exception as e:
                if database_unavailable(e):  # a dead pooled connection: the pool replaces it
                    raise sqlalchemy.exc.DisconnectionError(str(e)) from e
                raise
        record.info["limits_generation"] = generation


def _set_session(dbapi_connection: Any, server: dict[str, str]) -> None:
    """Sets session settings on a pooled connection, in one round trip."""
    names = sorted(server)
    sql = "SELECT " + ", ".join(f"set_config(%s, %s, false) AS s{i}" for i in range(len(names)))
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(sql, [x for k in names for x in (k, server[k])])
    finally:
        cursor.close()
    # psycopg opened a transaction for the statement: commit, or the settings would be undone
    dbapi_connection.commit()


# SQLSTATE classes of errors that say nothing about the statement itself: connection exceptions,
# invalid transaction state (a session ended for idling in a transaction), transaction rollback,
# insufficient resources, object not in prerequisite state (lock timeouts), operator
# intervention (shutdown, cancel), system errors.
_TRANSIENT_SQLSTATE_CLASSES = ("08", "25", "40", "53", "55", "57", "58")


def database_unavailable(e: BaseException) -> bool:
    """True when an error means the database could not be reached or the session ended, so the
    same statement may well succeed later; False for an error in the statement or its data."""
    if isinstance(e, OSError | TimeoutError | sqlalchemy.exc.TimeoutError):
        return True
    if isinstance(e, sqlalchemy.exc.DisconnectionError | sqlalchemy.exc.ResourceClosedError):
        return True
    if isinstance(e, sqlalchemy.exc.DBAPIError):
        if e.connection_invalidated:
            return True
        if e.orig is not None:
            e = e.orig
    if isinstance(e, psycopg.OperationalError | psycopg.InterfaceError):
        return True
    if isinstance(e, psycopg.Error):
        return (e.sqlstate or "")[:2] in _TRANSIENT_SQLSTATE_CLASSES
    return False
