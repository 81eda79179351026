"""Fixtures shared by the integration tests: AMQP names of a test's own, a database engine on a test's own
database, clients of the moto S3 server, and for the usage statements' tests a priced database and the
statements that the GraphQL pool sends."""

from __future__ import annotations

import datetime as dt
import decimal
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aioboto3
import pytest
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine

from db.engine import create_engine
from db.migrate import migrate
from db.prices import Price, upsert_price
from exports.storage.s3 import S3Storage, client_config, open_s3_storage
from gateway.resources import Resources
from kernel.hours import floor_hour
from tests.conftest import RUN_ID
from tests.integration.ingest_support import delete_topology


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    """This test's own AMQP names, deleted afterwards."""
    name = f"test_{RUN_ID}_{uuid.uuid4().hex[:8]}."
    yield name
    await delete_topology(name)


@pytest.fixture
async def engine(migrated_database: str) -> AsyncIterator[AsyncEngine]:
    """An engine on this test's own migrated database."""
    engine = create_engine(migrated_database, pool_size=6)
    yield engine
    await engine.dispose()


@pytest.fixture(scope="module")
def session() -> Any:
    """An aioboto3 session for the moto server (it accepts any credentials)."""
    return aioboto3.Session(aws_access_key_id="test", aws_secret_access_key="test", region_name="us-east-1")


@pytest.fixture(scope="module")
async def s3(session: Any, s3_endpoint: str) -> AsyncIterator[Any]:
    """A raw S3 client, to look behind the code's back (objects, multipart uploads, lifecycle rules)."""
    async with session.client("s3", endpoint_url=s3_endpoint, config=client_config(s3_endpoint)) as client:
        yield client


@pytest.fixture
async def bucket(s3: Any) -> str:
    """A bucket of this test's own."""
    name = f"test-{RUN_ID}-{uuid.uuid4().hex[:8]}".lower()
    await s3.create_bucket(Bucket=name)
    return name


@pytest.fixture
async def storage(session: Any, s3_endpoint: str, bucket: str) -> AsyncIterator[S3Storage]:
    """The export store on this test's bucket."""
    async with open_s3_storage(bucket, endpoint_url=s3_endpoint, region="us-east-1", session=session) as store:
        yield store


@pytest.fixture(scope="module")
async def priced_database(empty_database_module: str) -> str:
    """A migrated database of the module's own with prices of models "sel-a" (two versions) and "sel-b"."""
    engine = create_engine(empty_database_module, pool_size=1)
    try:
        await migrate(engine)
        watermark = floor_hour(dt.datetime.now(dt.UTC))
        async with engine.begin() as connection:
            hour = dt.timedelta(hours=1)
            for model, since, rates in (
                (
                    "sel-a",
                    watermark - 100 * hour,
                    ("0.1", "1234567.891011", "0.0333333333333333333333333333331"),
                ),
                ("sel-a", watermark - 20 * hour, ("2.5", "0.000001", "1.25")),
                ("sel-b", watermark - 30 * hour, ("3", "15", "0.3")),
            ):
                await upsert_price(connection, Price(model, since, *map(decimal.Decimal, rates)), "test")
    finally:
        await engine.dispose()
    return empty_database_module


@pytest.fixture
async def statements(resources: Resources) -> AsyncIterator[list[str]]:
    """The statements that the GraphQL pool sends: through SQLAlchemy, and straight through asyncpg (the hot
    queries). The driver's log records arrive with call_soon: ``await asyncio.sleep(0)`` before reading."""
    sent: list[str] = []
    engine = resources.query_engine

    def log_query(record: object) -> None:
        sent.append(str(getattr(record, "query", "")))

    def watch_driver(dbapi_connection: object, record: object, proxy: object) -> None:
        driver = dbapi_connection.driver_connection  # type: ignore[attr-defined]
        driver.remove_query_logger(log_query)
        driver.add_query_logger(log_query)

    def log_statement(conn: object, cursor: object, statement: str, *args: object) -> None:
        sent.append(statement)

    event.listen(engine.sync_engine, "checkout", watch_driver)
    event.listen(engine.sync_engine, "before_cursor_execute", log_statement)
    try:
        yield sent
    finally:
        event.remove(engine.sync_engine, "checkout", watch_driver)
        event.remove(engine.sync_engine, "before_cursor_execute", log_statement)
        sent.clear()  # the driver's logger stays on pooled connections; nothing more is kept
