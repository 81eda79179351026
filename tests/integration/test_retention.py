"""The retention sweeper on the real PostgreSQL and the moto S3 server: expired exports lose their object and
become EXPIRED, raw partitions go only once the rollups cover them (and ``usage`` answers the same after),
old event receipts are pruned, and concurrent sweeps neither fail nor do anything twice."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

import orjson
import pytest
from opentelemetry.metrics import get_meter
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from db.exports import get_export_job
from db.rollup import floor_hour, run_cycle, watermarks
from db.usage import UsageQuery, UsageRow, usage_rows
from exports.job_events import subscribe_job
from exports.retention import INGEST_GRACE, SweepLimits, SweepReport, on_start, raw_cut, sweep
from exports.storage import S3Storage, key_for, open_s3_storage
from exports.storage.s3 import LIFECYCLE_RULE_ID
from ingest.events import TimeWindow, validate
from ingest.metrics import IngestMetrics
from ingest.writer import EventWriter
from kernel.pubsub import LocalPubSub
from kernel.settings import Settings

RAW_DAYS = 30
SETTINGS = Settings(raw_retention_days=RAW_DAYS, export_retention_days=7)
DAY = dt.timedelta(days=1)


@pytest.fixture(scope="module")
async def storage(session: Any, s3: Any, s3_endpoint: str) -> AsyncIterator[S3Storage]:
    bucket = f"retention-{uuid.uuid4().hex[:12]}"
    await s3.create_bucket(Bucket=bucket)
    async with open_s3_storage(bucket, endpoint_url=s3_endpoint, region="us-east-1", session=session) as store:
        yield store


# --- helpers ----------------------------------------------------------------------------------------------


async def write_events(engine: AsyncEngine, org: str, times: Sequence[dt.datetime], tag: str = "") -> None:
    """Events through the real writer (validated with a window wide enough for old times)."""
    now = dt.datetime.now(dt.UTC)
    window = TimeWindow.around(now, retention_days=400)
    tag = tag or uuid.uuid4().hex[:8]
    events = [
        validate(
            {"specversion": "1.0", "id": f"{tag}-{i}", "source": "//retention/test", "type": "ai.usage.request.v1",
             "time": moment.isoformat(), "data": {"org_id": org, "model": "gpt-4o", "input_tokens": 100 + i,
             "output_tokens": 10, "latency_ms": 20.0, "status_code": 200}},
            window,
        )
        for i, moment in enumerate(times)
    ]  # fmt: skip
    writer = EventWriter(engine, None, None, IngestMetrics(get_meter("test_retention")))
    result = await writer.write(events, channel="http")
    assert result.accepted == len(events)


def noon(now: dt.datetime, days_ago: int) -> dt.datetime:
    """Midday (UTC) ``days_ago`` days before ``now``: minutes either side stay in the same daily partition."""
    return floor_hour(now - days_ago * DAY).replace(hour=12)


def partition_name(moment: dt.datetime) -> str:
    return f"usage_events_p{moment.astimezone(dt.UTC):%Y%m%d}"


async def partition_exists(engine: AsyncEngine, name: str) -> bool:
    async with engine.connect() as connection:
        return bool(await connection.scalar(text("SELECT to_regclass(:n) IS NOT NULL"), {"n": name}))


async def usage(engine: AsyncEngine, org: str, now: dt.datetime) -> list[UsageRow]:
    async with engine.connect() as connection:
        through = (await watermarks(connection)).materialized_through
        query = UsageQuery(org_id=org, start=floor_hour(now - 70 * DAY), end=floor_hour(now), granularity="DAY")
        return await usage_rows(connection, query, through)


async def new_export(engine: AsyncEngine, storage: S3Storage, expires_in: dt.timedelta) -> tuple[uuid.UUID, str]:
    """A SUCCEEDED job whose object is in the store, expiring ``expires_in`` from the database's now."""
    job_id, org = uuid.uuid4(), f"org_ret_{uuid.uuid4().hex[:6]}"
    key = key_for(org, dt.datetime.now(dt.UTC), job_id)
    upload = await storage.start(key)
    await upload.write(b"hour,requests\r\n")
    await upload.complete()
    async with engine.begin() as connection:
        await connection.execute(
            text(
                "INSERT INTO export_jobs (id, org_id, kind, status, requested_by, range_from, range_to, "
                "finished_at, attempts, row_count, object_key, expires_at) VALUES (:id, :org, 'COST', 'SUCCEEDED', "
                "'fin', now() - interval '40 days', now() - interval '10 days', now(), 1, 0, :key, now() + :ttl)"
            ),
            {"id": job_id, "org": org, "key": key, "ttl": expires_in},
        )
    return job_id, key


async def job_status(engine: AsyncEngine, job_id: uuid.UUID) -> str:
    async with engine.connect() as connection:
        row = await get_export_job(connection, job_id)
    assert row is not None
    return row.status


async def receipts_before(engine: AsyncEngine, moment: dt.datetime) -> tuple[int, int]:
    """How many receipts are of events before ``moment``, and how many from it on."""
    async with engine.connect() as connection:
        row = (
            await connection.execute(
                text(
                    "SELECT count(*) FILTER (WHERE event_time < :m) AS old, count(*) FILTER (WHERE event_time >= :m) "
                    "AS young FROM event_receipts"
                ),
                {"m": moment},
            )
        ).one()
    return int(row.old), int(row.young)


# --- exports ----------------------------------------------------------------------------------------------


async def test_an_expired_export_loses_its_object_and_is_announced_a_young_one_is_untouched(
    engine: AsyncEngine, storage: S3Storage
) -> None:
    old_id, old_key = await new_export(engine, storage, -dt.timedelta(minutes=1))
    young_id, young_key = await new_export(engine, storage, dt.timedelta(days=1))
    pubsub = LocalPubSub()
    async with subscribe_job(pubsub, old_id) as messages:
        report = await sweep(engine, storage, SETTINGS, dt.datetime.now(dt.UTC), pubsub)
        announced = orjson.loads(await asyncio.wait_for(anext(messages), 5))
    assert (report.expired_jobs, report.objects_deleted, report.object_delete_failures) == (1, 1, 0)
    assert announced == {"id": str(old_id), "status": "EXPIRED", "attempts": 1}
    assert await job_status(engine, old_id) == "EXPIRED"
    assert not await storage.exists(old_key)
    assert await job_status(engine, young_id) == "SUCCEEDED"
    assert await storage.exists(young_key)


async def test_a_failed_delete_still_expires_the_job_and_is_counted(
    engine: AsyncEngine, storage: S3Storage, session: Any, s3_endpoint: str
) -> None:
    job_id, key = await new_export(engine, storage, -dt.timedelta(seconds=1))
    missing = f"no-such-bucket-{uuid.uuid4().hex[:8]}"  # its deletes answer NoSuchBucket
    async with open_s3_storage(missing, endpoint_url=s3_endpoint, region="us-east-1", session=session) as broken:
        report = await sweep(engine, broken, SETTINGS, dt.datetime.now(dt.UTC))
    assert (report.expired_jobs, report.objects_deleted, report.object_delete_failures) == (1, 0, 1)
    assert await job_status(engine, job_id) == "EXPIRED"
    assert await storage.exists(key)  # left to the lifecycle rule


async def test_on_start_sets_the_lifecycle_rule(s3: Any, storage: S3Storage) -> None:
    await on_start(storage, SETTINGS)
    rules = (await s3.get_bucket_lifecycle_configuration(Bucket=storage.bucket))["Rules"]
    (ours,) = [rule for rule in rules if rule["ID"] == LIFECYCLE_RULE_ID]
    assert ours["Expiration"] == {"Days": 8}  # a day beyond the retention: the sweeper deletes on time
    assert ours["AbortIncompleteMultipartUpload"] == {"DaysAfterInitiation": 1}


# --- raw partitions ---------------------------------------------------------------------------------------


async def test_old_partitions_go_only_once_the_rollups_cover_them_and_usage_is_unchanged(
    engine: AsyncEngine, storage: S3Storage
) -> None:
    now = dt.datetime.now(dt.UTC)
    org = f"org_ret_{uuid.uuid4().hex[:6]}"
    covered, dirty, young = noon(now, 60), noon(now, 45), noon(now, 2)
    await write_events(engine, org, [covered, covered + dt.timedelta(minutes=1), dirty, young])

    # No rollup yet: nothing old is covered.
    unrolled = await sweep(engine, storage, SETTINGS, now)
    assert unrolled.partitions_dropped == () and unrolled.partitions_waiting == 2

    assert (await run_cycle(engine, now)).ran
    await write_events(engine, org, [dirty + dt.timedelta(minutes=5)])  # a late event: its hour is dirty
    before = await usage(engine, org, now)
    assert sum(r.requests for r in before) == 5

    report = await sweep(engine, storage, SETTINGS, now)
    assert report.partitions_dropped == (partition_name(covered),)
    assert report.partitions_waiting == 1 and not report.partitions_busy
    assert not await partition_exists(engine, partition_name(covered))
    assert await partition_exists(engine, partition_name(dirty))
    assert await partition_exists(engine, partition_name(young))
    async with engine.connect() as connection:
        kept = await connection.scalar(
            text("SELECT sum(requests) FROM usage_hourly WHERE org_id = :o AND hour < :e"),
            {"o": org, "e": covered + DAY},
        )
    assert kept == 2  # the dropped day's rollup rows stay
    assert await usage(engine, org, now) == before

    # Once the dirty hour is re-rolled, its partition goes too; the answer still does not move.
    await run_cycle(engine, now)
    again = await sweep(engine, storage, SETTINGS, now)
    assert again.partitions_dropped == (partition_name(dirty),) and again.partitions_waiting == 0
    assert await usage(engine, org, now) == before


async def test_a_partition_whose_end_is_past_the_watermark_stays(engine: AsyncEngine, storage: S3Storage) -> None:
    now = dt.datetime.now(dt.UTC)
    old = noon(now, 60)  # (60 days before now, in the day's last hour, M would end the day: the test failed 23-24 h)
    await write_events(engine, f"org_ret_{uuid.uuid4().hex[:6]}", [old])
    assert (await run_cycle(engine, floor_hour(old) + dt.timedelta(hours=1))).ran  # M inside the old day
    report = await sweep(engine, storage, SETTINGS, now)
    assert report.partitions_dropped == () and report.partitions_waiting == 1
    assert await partition_exists(engine, partition_name(old))


async def test_a_sweep_does_not_wait_behind_a_long_reader_and_drops_later(
    engine: AsyncEngine, storage: S3Storage
) -> None:
    now = dt.datetime.now(dt.UTC)
    old = now - 60 * DAY
    await write_events(engine, f"org_ret_{uuid.uuid4().hex[:6]}", [old])
    await run_cycle(engine, now)
    limits = SweepLimits(lock_timeout=dt.timedelta(milliseconds=100))
    async with engine.connect() as reader:  # an export's long snapshot holds usage_events
        await reader.execute(text("SELECT count(*) FROM usage_events"))
        busy = await asyncio.wait_for(sweep(engine, storage, SETTINGS, now, limits=limits), 5)
        await reader.rollback()
    assert busy.partitions_busy and busy.partitions_dropped == ()
    assert await partition_exists(engine, partition_name(old))
    later = await sweep(engine, storage, SETTINGS, now, limits=limits)
    assert later.partitions_dropped == (partition_name(old),) and not later.partitions_busy


# --- event receipts ---------------------------------------------------------------------------------------


async def test_receipts_older_than_the_horizon_are_pruned_in_batches_young_ones_kept(
    engine: AsyncEngine, storage: S3Storage
) -> None:
    now = dt.datetime.now(dt.UTC)
    cut = raw_cut(SETTINGS, now)
    assert cut == now - dt.timedelta(days=RAW_DAYS) - INGEST_GRACE
    org = f"org_ret_{uuid.uuid4().hex[:6]}"
    old = [cut - dt.timedelta(minutes=1 + i) for i in range(10)]
    young = [cut + dt.timedelta(minutes=1), now - DAY]
    await write_events(engine, org, old + young)
    assert await receipts_before(engine, cut) == (10, 2)
    report = await sweep(engine, storage, SETTINGS, now, limits=SweepLimits(receipt_batch=3))
    assert report.receipts_pruned == 10
    assert await receipts_before(engine, cut) == (0, 2)


async def test_receipts_pruning_is_bounded_per_sweep(engine: AsyncEngine, storage: S3Storage) -> None:
    now = dt.datetime.now(dt.UTC)
    await write_events(engine, "org_ret_bounded", [now - 40 * DAY - dt.timedelta(seconds=i) for i in range(10)])
    limits = SweepLimits(receipt_batch=3, receipt_batches=2)
    first = await sweep(engine, storage, SETTINGS, now, limits=limits)
    assert first.receipts_pruned == 6
    second = await sweep(engine, storage, SETTINGS, now, limits=limits)
    assert second.receipts_pruned == 4


# --- many sweepers ----------------------------------------------------------------------------------------


async def test_concurrent_sweeps_neither_fail_nor_do_anything_twice(engine: AsyncEngine, storage: S3Storage) -> None:
    now = dt.datetime.now(dt.UTC)
    jobs = [await new_export(engine, storage, -dt.timedelta(seconds=1)) for _ in range(12)]
    days = [noon(now, 50 + d) for d in range(4)]
    await write_events(engine, "org_ret_many", [d + dt.timedelta(minutes=m) for d in days for m in range(25)])
    await run_cycle(engine, now)
    limits = SweepLimits(jobs=5, receipt_batch=7)

    reports: list[SweepReport] = []
    for _ in range(3):  # rounds of four sweepers at once, until all is done
        reports += await asyncio.gather(*(sweep(engine, storage, SETTINGS, now, limits=limits) for _ in range(4)))

    expired = [row.id for report in reports for row in report.expired]
    assert sorted(expired) == sorted(job_id for job_id, _ in jobs)  # each job once
    assert sum(r.objects_deleted for r in reports) == len(jobs)
    assert sum(r.object_delete_failures for r in reports) == 0
    dropped = [name for report in reports for name in report.partitions_dropped]
    assert sorted(dropped) == sorted(partition_name(d) for d in days)  # each partition once
    assert sum(r.receipts_pruned for r in reports) == 100
    for job_id, key in jobs:
        assert await job_status(engine, job_id) == "EXPIRED"
        assert not await storage.exists(key)
    assert await receipts_before(engine, now) == (0, 0)
