"""Fixtures shared by the integration tests: AMQP names of a test's own, a database engine on a test's own
database, and clients of the moto S3 server."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import aioboto3
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from db.engine import create_engine
from exports.storage.s3 import S3Storage, client_config, open_s3_storage
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
