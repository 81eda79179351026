"""The SQLAlchemy async engine (asyncpg underneath), created once per process."""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import unquote, urlencode, urlsplit, urlunsplit

from sqlalchemy import event
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine


def sqlalchemy_url(url: str) -> str:
    """``postgresql://…`` as SQLAlchemy's asyncpg dialect spells it. A Unix-socket folder given libpq's way,
    percent-encoded in place of the host (``postgresql://user@%2Fvar%2Frun%2Fpostgresql/db``), becomes the
    ``host`` query parameter that the dialect understands."""
    for prefix in ("postgresql+asyncpg://", "postgresql://", "postgres://"):
        if url.startswith(prefix):
            parts = urlsplit("postgresql+asyncpg://" + url.removeprefix(prefix))
            userinfo, _, host = parts.netloc.rpartition("@")
            if not host.lower().startswith("%2f"):
                return parts.geturl()
            socket_dir, _, port = host.partition(":")
            query = "&".join(q for q in (parts.query, urlencode({"host": unquote(socket_dir)})) if q)
            netloc = (f"{userinfo}@" if userinfo else "") + (f":{port}" if port else "")
            return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    raise ValueError("database URL must start with postgresql://")


POOL_TIMEOUT_S = 5.0  # the default of settings.db_pool_timeout_s


def create_engine(
    url: str,
    *,
    pool_size: int = 10,
    connect_timeout: float = 5.0,
    pool_timeout_s: float = POOL_TIMEOUT_S,
    statement_timeout_ms: int | None = None,
) -> AsyncEngine:
    """An engine whose sessions run in UTC without JIT, failing fast when the server is down. A request waits
    at most ``pool_timeout_s`` for a connection (SQLAlchemy's TimeoutError) and a statement runs at most
    ``statement_timeout_ms`` when given (PostgreSQL cancels it: QueryCanceledError); both answer a retryable
    UNAVAILABLE (schema/errors.py) instead of piling up requests, each holding its memory, behind a busy pool.
    No statement timeout unless given: the caller decides whose sessions may be cut (never a migration's)."""
    server_settings = {
        "TimeZone": "UTC",
        # The process id in application_name lets operators (and tests) find a process's sessions.
        "application_name": f"analytics-gateway/{os.getpid()}",
        # JIT compiles a usage statement over a month of partitions for 100+ ms (measured: 129 ms
        # of compilation for a 12 ms query), on each new connection's first executions.
        "jit": "off",
        # Timestamps as text in ISO 8601 ("2026-11-30 15:00:00"), whatever the server's default: db/usage_json.py
        # writes them into JSON.
        "DateStyle": "ISO, MDY",
    }
    if statement_timeout_ms is not None:
        # Per session, so it holds for every statement; a statement that needs longer (an export's COPY)
        # sets its own with SET LOCAL statement_timeout.
        server_settings["statement_timeout"] = str(statement_timeout_ms)
    engine = create_async_engine(
        sqlalchemy_url(url),
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_timeout=pool_timeout_s,
        connect_args={"timeout": connect_timeout, "server_settings": server_settings},
    )
    event.listen(engine.sync_engine, "checkout", _replace_closed)
    return engine


def _replace_closed(dbapi_connection: Any, record: Any, proxy: Any) -> None:
    """Hand out no connection that the server has closed (restart, fail-over, ``pg_terminate_backend``):
    the pool discards it and checks out another. asyncpg sees the server's close on its socket, so this
    costs no round trip, where SQLAlchemy's ``pool_pre_ping`` costs three per checkout (BEGIN, ping,
    ROLLBACK: 1.2 ms of a 27 ms usage answer in the benchmark)."""
    if dbapi_connection.driver_connection.is_closed():
        raise DisconnectionError("the server closed this connection")
