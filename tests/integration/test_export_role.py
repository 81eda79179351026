"""The export role in a gateway process: at start-up it sets the bucket's lifecycle rule, its sweeper expires a
finished export whose retention has passed (the object goes, the job says EXPIRED, subscribers hear it), and
its worker runs queued jobs without being asked."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import uuid
from collections.abc import AsyncIterator

import aioboto3
import pytest
from asgi_lifespan import LifespanManager
from redis.asyncio import Redis
from sqlalchemy import text

from db.engine import create_engine
from db.exports import NewJob, Outcome, claim_job, get_export_job, succeed_job
from exports.job_events import job_channel
from exports.jobs import COST, create_job, incident_job, lease_of
from exports.storage.s3 import LIFECYCLE_RULE_ID
from gateway.app import create_app
from kernel.settings import ProcessRole, Settings
from tests.conftest import REDIS_URL, RUN_ID

SESSION = aioboto3.Session(aws_access_key_id="test", aws_secret_access_key="test", region_name="us-east-1")


@pytest.fixture
async def bucket(s3_endpoint: str) -> AsyncIterator[str]:
    name = f"export-role-{RUN_ID}-{uuid.uuid4().hex[:6]}".lower()
    async with SESSION.client("s3", endpoint_url=s3_endpoint) as s3:
        await s3.create_bucket(Bucket=name)
    yield name


async def test_export_role_sets_lifecycle_expires_old_files_and_runs_jobs(
    settings: Settings, migrated_database: str, s3_endpoint: str, bucket: str
) -> None:
    assert settings.database_url is not None
    engine = create_engine(migrated_database, pool_size=2)
    key = f"exports/old_org/2026/01/{uuid.uuid4()}.csv"
    async with SESSION.client("s3", endpoint_url=s3_endpoint) as s3:
        await s3.put_object(Bucket=bucket, Key=key, Body=b"org_id\r\n")
    try:
        # A finished export whose retention has passed, as a worker left it.
        async with engine.begin() as connection:
            old, _ = await create_job(connection, NewJob(
                org_id="old_org", kind=COST, requested_by="finance", idempotency_key=None, params={"month": "2026-01"},
                range_from=dt.datetime(2026, 1, 1, tzinfo=dt.UTC), range_to=dt.datetime(2026, 2, 1, tzinfo=dt.UTC),
            ))  # fmt: skip
            claimed = await claim_job(connection, "earlier-worker", dt.timedelta(minutes=1), 5)
            assert claimed is not None and claimed.id == old.id
            outcome = Outcome(1, {"requests": 0}, "0" * 64, key, dt.datetime.now(dt.UTC))
            assert await succeed_job(connection, lease_of(claimed), outcome, dt.timedelta(days=1))
            await connection.execute(text("UPDATE export_jobs SET expires_at = now() - interval '1 hour'"))
            now = dt.datetime.now(dt.UTC)
            queued, _ = await create_job(connection, incident_job(
                org_id="role_org", start=now - dt.timedelta(hours=1), end=now, requested_by="engineer", key=None
            ))  # fmt: skip
        own = settings.model_copy(
            update={
                "database_url": settings.database_url.__class__(migrated_database),
                "s3_bucket": bucket,
                "s3_endpoint_url": s3_endpoint,
                "export_poll_s": 0.1,
            }
        )
        redis = Redis.from_url(REDIS_URL)
        listener = redis.pubsub(ignore_subscribe_messages=True)
        # Subscribed before the process starts: nothing it announces is missed.
        await listener.subscribe(own.redis_prefix + job_channel(old.id), own.redis_prefix + job_channel(queued.id))
        try:
            async with LifespanManager(create_app(own, frozenset({ProcessRole.EXPORT})), startup_timeout=60):
                async with SESSION.client("s3", endpoint_url=s3_endpoint) as s3:
                    rules = (await s3.get_bucket_lifecycle_configuration(Bucket=bucket))["Rules"]
                    assert [r["ID"] for r in rules] == [LIFECYCLE_RULE_ID]
                    heard: dict[str, str] = {}
                    async with asyncio.timeout(30):
                        async for message in listener.listen():
                            if message["type"] == "message":
                                said = json.loads(message["data"])
                                heard[said["id"]] = said["status"]
                            if heard.get(str(old.id)) == "EXPIRED" and heard.get(str(queued.id)) == "SUCCEEDED":
                                break
                    listed = await s3.list_objects_v2(Bucket=bucket, Prefix="exports/")
                    keys = [item["Key"] for item in listed.get("Contents", [])]
                    assert key not in keys and len(keys) == 1 and str(queued.id) in keys[0]  # the new job's file
                async with engine.connect() as connection:
                    row = await get_export_job(connection, old.id)
                    done = await get_export_job(connection, queued.id)
                assert row is not None and row.status == "EXPIRED"
                assert done is not None and done.status == "SUCCEEDED" and done.row_count == 0
        finally:
            await listener.aclose()  # type: ignore[no-untyped-call]
            await redis.aclose()
    finally:
        await engine.dispose()
