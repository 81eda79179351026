"""The engine's sessions: settings, and no connection the server closed is handed out."""

from __future__ import annotations

import asyncio

import asyncpg
from sqlalchemy import text

from db.engine import create_engine


async def test_sessions_run_in_utc_without_jit(database_url: str) -> None:
    engine = create_engine(database_url, pool_size=1)
    try:
        async with engine.connect() as connection:
            query = text("SELECT current_setting('TimeZone'), current_setting('jit')")
            settings = (await connection.execute(query)).one()
    finally:
        await engine.dispose()
    assert tuple(settings) == ("UTC", "off")


async def test_a_connection_the_server_closed_is_replaced_at_checkout(database_url: str) -> None:
    engine = create_engine(database_url, pool_size=1)
    try:
        async with engine.connect() as connection:
            first_pid = await connection.scalar(text("SELECT pg_backend_pid()"))
            driver = (await connection.get_raw_connection()).driver_connection
        closed = asyncio.Event()
        driver.add_termination_listener(lambda _: closed.set())
        admin = await asyncpg.connect(database_url)
        try:
            assert await admin.fetchval("SELECT pg_terminate_backend($1)", first_pid)
        finally:
            await admin.close()
        await asyncio.wait_for(closed.wait(), 10)  # the pooled connection has seen the server close it

        async with engine.connect() as connection:  # no error: the pool replaced it
            second_pid = await connection.scalar(text("SELECT pg_backend_pid()"))
    finally:
        await engine.dispose()
    assert second_pid != first_pid
