"""The SQLAlchemy async engine (asyncpg underneath), created once per process."""

from __future__ import annotations

import os

from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine


def sqlalchemy_url(url: str) -> str:
    """``postgresql://…`` as SQLAlchemy's asyncpg dialect spells it."""
    for prefix in ("postgresql+asyncpg://", "postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+asyncpg://" + url.removeprefix(prefix)
    raise ValueError("database URL must start with postgresql://")


def create_engine(url: str, *, pool_size: int = 10, connect_timeout: float = 5.0) -> AsyncEngine:
    """An engine whose sessions all run in UTC, failing fast when the server is down."""
    return create_async_engine(
        sqlalchemy_url(url),
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=True,
        connect_args={
            "timeout": connect_timeout,
            # The process id in application_name lets operators (and tests) find a process's sessions.
            "server_settings": {"TimeZone": "UTC", "application_name": f"analytics-gateway/{os.getpid()}"},
        },
    )
