"""The engine's sessions: settings, and no connection the server closed is handed out."""

from __future__ import annotations

import asyncio
from urllib.parse import quote, urlsplit

import asyncpg
from sqlalchemy import text

from db.engine import create_engine, sqlalchemy_url


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


async def test_a_unix_socket_folder_in_place_of_the_host_connects_over_the_socket(database_url: str) -> None:
    admin = await asyncpg.connect(database_url)
    try:
        folders = await admin.fetchval("SHOW unix_socket_directories")
    finally:
        await admin.close()
    folder = folders.split(",")[0].strip()
    parts = urlsplit(database_url)
    userinfo = parts.netloc.rpartition("@")[0]
    socket_url = f"postgresql://{userinfo}@{quote(folder, safe='')}:{parts.port or 5432}{parts.path}"
    engine = create_engine(socket_url, pool_size=1)
    try:
        async with engine.connect() as connection:
            server_address = await connection.scalar(text("SELECT inet_server_addr()"))
            database = await connection.scalar(text("SELECT current_database()"))
    finally:
        await engine.dispose()
    assert server_address is None  # a Unix socket, not TCP
    assert database == parts.path.lstrip("/")


def test_urls_become_the_dialects_spelling() -> None:
    assert sqlalchemy_url("postgres://u:p%40ss@db.example:5433/a?sslmode=require") == (
        "postgresql+asyncpg://u:p%40ss@db.example:5433/a?sslmode=require"
    )
    assert sqlalchemy_url("postgresql://u@%2Fvar%2Frun%2Fpostgresql:5433/a?application_name=x") == (
        "postgresql+asyncpg://u@:5433/a?application_name=x&host=%2Fvar%2Frun%2Fpostgresql"
    )
