"""Export faults on the real services (issue 13, "Faults"): PostgreSQL, the moto S3 server over HTTP, and a real
``analytics-gateway serve --role export`` process.

- a worker killed (SIGKILL) mid-upload: another finishes the job; one object, attempts 2, no orphaned upload;
- the store unreachable or answering errors: retries, then FAILED with the reason, never SUCCEEDED;
- the database dropping the worker's connection mid-job: the attempt fails, the next one finishes the job;
- a cancel while RUNNING; two workers racing for one job; one idempotency key sent twice at once;
- a worker stopped during an attempt gives the job back.

Each test has a database and a bucket of its own (claims take the oldest runnable job of the whole table).
Where a test must act at a known point of an attempt, the worker's store is the real :class:`S3Storage` behind
:class:`GatedStorage`, which holds the first written part until the test lets it go: the attempt is then
mid-stream (rows left in the cursor) with a multipart upload open in S3.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
from asgi_lifespan import LifespanManager
from botocore.config import Config  # type: ignore[import-untyped]
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, NumberDataPoint
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from db.exports import ExportJobRow, get_export_job
from db.partitions import ensure_usage_partitions
from exports.job_events import announce_job
from exports.jobs import cancel_job, create_job, incident_job
from exports.metrics import ExportMetrics
from exports.storage import S3Storage, key_for, open_s3_storage
from exports.storage.protocol import Upload
from exports.storage.s3 import MIN_PART_SIZE, client_config
from exports.worker import ExportWorker
from gateway.app import create_app
from kernel.pubsub import LocalPubSub
from kernel.settings import ProcessRole, Settings
from tests.conftest import TEST_JWT_SECRET, TokenFactory
from tests.helpers import graphql
from tests.integration.serve_support import clean_env, free_port, serve

DAY = dt.date(2026, 11, 2)  # the incident window: one UTC day of events written straight into its partition
DAY_START = dt.datetime(DAY.year, DAY.month, DAY.day, tzinfo=dt.UTC)
DEADLINE_S = 30.0
BIG = 150_000  # rows of the SIGKILL test: about 20 MiB of CSV, two 8 MiB parts and a tail
MID = 80_000  # rows of the gated tests: the first 5 MiB part is written with rows left in the cursor
SMALL = 500


# --- fixtures and helpers ---------------------------------------------------------------------------------


def settings_for(database_url: str, **update: Any) -> Settings:
    """The worker's settings: no wait between attempts, a short lease (renewed every third of it)."""
    values: dict[str, Any] = {"export_lease_s": 2.0, "export_retry_base_s": 0.0, "export_poll_s": 0.2}
    return Settings(database_url=database_url, **(values | update))


def new_worker(
    engine: AsyncEngine, storage: Any, settings: Settings, metrics: ExportMetrics | None = None, **kwargs: Any
) -> ExportWorker:
    if metrics is None:
        metrics = ExportMetrics(MeterProvider().get_meter("test.export_faults"))
    return ExportWorker(engine, storage, None, settings, metrics, **kwargs)


async def insert_events(engine: AsyncEngine, org: str, count: int) -> None:
    """``count`` events of ``org`` on :data:`DAY`, 100 ms apart, in one statement (no receipts: exports read
    ``usage_events`` only). Every tenth is an error, so the file has empty and non-empty optional cells."""
    async with engine.begin() as connection:
        await ensure_usage_partitions(connection, DAY, DAY)
        await connection.execute(
            text(
                "INSERT INTO usage_events (org_id, event_time, source, event_id, project_id, api_key_id, model, "
                "input_tokens, cached_input_tokens, output_tokens, latency_ms, ttft_ms, status_code, error_type, "
                "region) SELECT :org, CAST(:start AS timestamptz) + n * interval '100 milliseconds', "
                "'//export-faults', "
                "'evt-' || lpad(n::text, 7, '0'), 'proj_' || (n % 7), 'key_' || (n % 3), 'gpt-4o', 1000 + n % 500, "
                "n % 100, 200 + n % 50, 12.5 + n % 300, CASE WHEN n % 2 = 0 THEN 3.25 END, "
                "CASE WHEN n % 10 = 0 THEN 503 ELSE 200 END, CASE WHEN n % 10 = 0 THEN 'upstream_timeout' END, "
                "'eu-west-1' FROM generate_series(1, :count) AS n"
            ),
            {"org": org, "start": DAY_START, "count": count},
        )


async def new_job(engine: AsyncEngine, org: str, key: str | None = None) -> ExportJobRow:
    """A QUEUED INCIDENT job for every event of ``org`` on :data:`DAY`."""
    job = incident_job(org_id=org, start=DAY_START, end=DAY_START + dt.timedelta(days=1), requested_by="oncall",
                       key=key)  # fmt: skip
    async with engine.begin() as connection:
        row, created = await create_job(connection, job)
    assert created
    return row


async def job_row(engine: AsyncEngine, job_id: uuid.UUID) -> ExportJobRow:
    async with engine.connect() as connection:
        row = await get_export_job(connection, job_id)
    assert row is not None
    return row


def new_org() -> str:
    return f"org_faults_{uuid.uuid4().hex[:8]}"


async def objects(s3: Any, bucket: str) -> list[str]:
    answer = await s3.list_objects_v2(Bucket=bucket, Prefix="exports/")
    return [item["Key"] for item in answer.get("Contents", [])]


async def open_uploads(s3: Any, bucket: str) -> list[dict[str, Any]]:
    answer = await s3.list_multipart_uploads(Bucket=bucket)
    return list(answer.get("Uploads", []))


async def assert_one_correct_file(s3: Any, bucket: str, row: ExportJobRow, rows: int) -> None:
    """Exactly one object, the job's, whose bytes hash to the recorded checksum and hold ``rows`` data rows,
    and no multipart upload left in the bucket."""
    assert row.status == "SUCCEEDED", row
    assert await objects(s3, bucket) == [row.object_key]
    answer = await s3.get_object(Bucket=bucket, Key=row.object_key)
    async with answer["Body"] as body:
        data = await body.read()
    assert hashlib.sha256(data).hexdigest() == row.checksum_sha256
    assert data.startswith(b"time,event_id,") and data.endswith(b"\r\n")
    assert data.count(b"\r\n") - 1 == row.row_count == rows
    assert row.totals is not None and row.totals["requests"] == rows
    assert await open_uploads(s3, bucket) == []


async def until(check: Callable[[], Any], what: str, deadline_s: float = DEADLINE_S, every_s: float = 0.05) -> Any:
    """Poll ``check`` (async) until it returns something truthy: waiting for a state another process or the
    store reaches, which has no event to await."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        result = await check()
        if result:
            return result
        await asyncio.sleep(every_s)
    raise AssertionError(f"timed out after {deadline_s} s waiting for {what}")


class GatedUpload:
    """The real upload; its first written part is passed on, then held until ``resume`` is set."""

    def __init__(self, inner: Upload, gate: GatedStorage) -> None:
        self._inner, self._gate = inner, gate

    async def write(self, part: bytes) -> None:
        await self._inner.write(part)
        if not self._gate.first_part.is_set():
            self._gate.first_part.set()
            await self._gate.resume.wait()

    async def complete(self) -> tuple[int, str]:
        return await self._inner.complete()

    async def abort(self) -> None:
        await self._inner.abort()


class GatedStorage:
    """The real S3 store, delegating everything; the first part written through it sets ``first_part`` and
    waits for ``resume`` (later parts and uploads pass straight through)."""

    def __init__(self, inner: S3Storage) -> None:
        self._inner = inner
        self.first_part = asyncio.Event()
        self.resume = asyncio.Event()

    async def start(self, key: str) -> GatedUpload:
        return GatedUpload(await self._inner.start(key), self)

    async def abort_incomplete(self, key: str) -> int:
        return await self._inner.abort_incomplete(key)

    async def delete(self, key: str) -> None:
        await self._inner.delete(key)

    async def exists(self, key: str) -> bool:
        return await self._inner.exists(key)

    def read(self, key: str) -> AsyncIterator[bytes]:
        return self._inner.read(key)

    async def download_url(self, key: str, ttl: dt.timedelta) -> str:
        return await self._inner.download_url(key, ttl)

    async def ensure_lifecycle(self, expire_days: int) -> None:
        await self._inner.ensure_lifecycle(expire_days)


def counter(reader: InMemoryMetricReader, name: str) -> int:
    data = reader.get_metrics_data()
    if data is None:
        return 0
    return sum(
        int(point.value)
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
        if metric.name == name
        for point in metric.data.data_points
        if isinstance(point, NumberDataPoint)
    )


# --- 1. SIGKILL mid-upload ---------------------------------------------------------------------------------


async def test_a_worker_killed_mid_upload_is_finished_by_another_once_with_no_orphaned_upload(
    migrated_database: str, engine: AsyncEngine, storage: S3Storage, s3: Any, bucket: str, s3_endpoint: str,
    tmp_path: Path,
) -> None:  # fmt: skip
    org = new_org()
    await insert_events(engine, org, BIG)
    job = await new_job(engine, org)
    env = clean_env(
        ANALYTICS_DATABASE_URL=migrated_database, ANALYTICS_JWT_SECRET=TEST_JWT_SECRET,
        ANALYTICS_S3_BUCKET=bucket, ANALYTICS_S3_ENDPOINT_URL=s3_endpoint, ANALYTICS_DATA_DIR=str(tmp_path),
        ANALYTICS_EXPORT_LEASE_S="2", ANALYTICS_EXPORT_POLL_S="0.2", ANALYTICS_EXPORT_RETRY_BASE_S="0",
    )  # fmt: skip
    async with serve(env, "--role", "export") as running:
        await until(lambda: open_uploads(s3, bucket), "the killed worker's multipart upload")
        running.process.kill()
        assert await running.process.wait() == -9
    killed = await job_row(engine, job.id)
    assert (killed.status, killed.attempts, await objects(s3, bucket)) == ("RUNNING", 1, [])
    assert [u["Key"] for u in await open_uploads(s3, bucket)] == [key_for(org, job.created_at, job.id)]

    worker = new_worker(engine, storage, settings_for(migrated_database))
    finished = await until(worker.run_once, "the second worker to take the job once its lease expired", every_s=0.1)
    assert finished.id == job.id and finished.attempts == 2
    assert await worker.run_once() is None
    head = await s3.head_object(Bucket=bucket, Key=finished.object_key)
    assert int(head["ETag"].strip('"').rsplit("-", 1)[1]) >= 3  # a multipart object of several parts
    await assert_one_correct_file(s3, bucket, await job_row(engine, job.id), BIG)


# --- 2. the store unreachable, or answering errors ---------------------------------------------------------


async def test_an_unreachable_store_fails_every_attempt_then_the_job_with_the_reason(
    migrated_database: str, engine: AsyncEngine, session: Any
) -> None:
    org = new_org()
    await insert_events(engine, org, SMALL)
    job = await new_job(engine, org)
    closed = f"http://127.0.0.1:{free_port()}"
    # The client's own retries are off: the job's retry policy is what is under test (and botocore's backoff
    # would add seconds per attempt).
    config = client_config(closed).merge(Config(retries={"max_attempts": 1, "mode": "standard"}, connect_timeout=2))
    reader = InMemoryMetricReader()
    metrics = ExportMetrics(MeterProvider(metric_readers=[reader]).get_meter("test.export_faults"))
    async with session.client("s3", endpoint_url=closed, config=config) as client:
        worker = new_worker(engine, S3Storage(client, "exports"), settings_for(migrated_database,
                            export_max_attempts=3), metrics)  # fmt: skip
        ended = [await worker.run_once() for _ in range(4)]
    assert [(r.status, r.attempts) if r else None for r in ended] == [("QUEUED", 1), ("QUEUED", 2), ("FAILED", 3),
                                                                       None]  # fmt: skip
    final = await job_row(engine, job.id)
    assert final.status == "FAILED" and final.object_key is None and final.checksum_sha256 is None
    assert final.error is not None and final.error.startswith("attempt 3 of 3: the export store could not be reached")
    assert "127.0.0.1" in final.error
    assert counter(reader, "analytics_export_jobs_failed") == 1


async def test_a_store_answering_no_such_bucket_fails_the_job_with_that_code(
    migrated_database: str, engine: AsyncEngine, session: Any, s3_endpoint: str
) -> None:
    org = new_org()
    await insert_events(engine, org, SMALL)
    job = await new_job(engine, org)
    reader = InMemoryMetricReader()
    metrics = ExportMetrics(MeterProvider(metric_readers=[reader]).get_meter("test.export_faults"))
    missing = f"missing-{uuid.uuid4().hex[:12]}"
    async with open_s3_storage(missing, endpoint_url=s3_endpoint, session=session) as store:
        worker = new_worker(engine, store, settings_for(migrated_database, export_max_attempts=3), metrics)
        ended = [await worker.run_once() for _ in range(4)]
    assert [r.status if r else None for r in ended] == ["QUEUED", "QUEUED", "FAILED", None]
    final = await job_row(engine, job.id)
    assert final.status == "FAILED" and final.attempts == 3 and final.object_key is None
    assert final.error is not None and "the export store refused the upload: NoSuchBucket" in final.error
    assert counter(reader, "analytics_export_jobs_failed") == 1


# --- 3. the database drops the worker's connection mid-job -------------------------------------------------


async def test_a_dropped_database_connection_fails_the_attempt_and_the_next_one_finishes_the_job(
    migrated_database: str, engine: AsyncEngine, storage: S3Storage, s3: Any, bucket: str
) -> None:
    org = new_org()
    await insert_events(engine, org, MID)
    job = await new_job(engine, org)
    gated = GatedStorage(storage)
    worker = new_worker(engine, gated, settings_for(migrated_database), part_size=MIN_PART_SIZE)
    attempt = asyncio.create_task(worker.run_once())
    await asyncio.wait_for(gated.first_part.wait(), DEADLINE_S)
    assert len(await open_uploads(s3, bucket)) == 1
    async with engine.connect() as connection:
        pids = (
            await connection.execute(
                text(
                    "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                    "AND pid <> pg_backend_pid() AND query LIKE 'SELECT CASE WHEN s.fits THEN%'"  # the lines statement
                )
            )
        ).scalars().all()  # fmt: skip
        assert len(pids) == 1, pids  # the export's snapshot, its cursor open
        assert await connection.scalar(text("SELECT pg_terminate_backend(:pid, 5000)"), {"pid": pids[0]})
    gated.resume.set()
    failed = await asyncio.wait_for(attempt, DEADLINE_S)
    assert failed is not None
    assert (failed.id, failed.status, failed.attempts) == (job.id, "QUEUED", 1), failed
    assert failed.error is not None and "the database failed while reading the rows" in failed.error
    # The cause, not the failed rollback on the dead connection that used to hide it.
    assert "closed" in failed.error and "__aexit__" not in failed.error, failed.error
    assert await objects(s3, bucket) == [] and await open_uploads(s3, bucket) == []

    finished = await worker.run_once()
    assert finished is not None and (finished.id, finished.attempts) == (job.id, 2)
    await assert_one_correct_file(s3, bucket, await job_row(engine, job.id), MID)


# --- 4. cancel while RUNNING -------------------------------------------------------------------------------


async def test_a_cancel_while_running_stops_the_attempt_and_leaves_no_object_or_upload(
    migrated_database: str, engine: AsyncEngine, storage: S3Storage, s3: Any, bucket: str
) -> None:
    org = new_org()
    await insert_events(engine, org, MID)
    job = await new_job(engine, org)
    gated = GatedStorage(storage)  # never resumed: only the lease keeper can end this attempt
    worker = new_worker(engine, gated, settings_for(migrated_database, export_lease_s=1.5), part_size=MIN_PART_SIZE)
    attempt = asyncio.create_task(worker.run_once())
    await asyncio.wait_for(gated.first_part.wait(), DEADLINE_S)
    assert len(await open_uploads(s3, bucket)) == 1
    async with engine.begin() as connection:
        cancelled = await cancel_job(connection, job.id, lambda _org: True)
    assert cancelled.status == "CANCELLED"
    started = time.monotonic()
    ended = await asyncio.wait_for(attempt, 10)
    # Only the lease keeper can end this attempt: it renews every 0.5 s and stops the attempt at its next renewal
    # (about 0.5 s; the bound leaves room for a loaded machine).
    assert time.monotonic() - started < 3.0
    assert ended is not None and ended.id == job.id
    final = await job_row(engine, job.id)
    assert (final.status, final.attempts, final.object_key) == ("CANCELLED", 1, None)
    assert await objects(s3, bucket) == [] and await open_uploads(s3, bucket) == []
    assert await worker.run_once() is None


async def test_an_announced_cancel_stops_the_attempt_at_once_whatever_the_lease(
    migrated_database: str, engine: AsyncEngine, storage: S3Storage, s3: Any, bucket: str
) -> None:
    """With a 60 s lease the periodic renewal would notice the cancel 20 s later; the worker listens on the
    job's channel and checks at once when the cancel is announced (as cancelExportJob does)."""
    org = new_org()
    await insert_events(engine, org, MID)
    job = await new_job(engine, org)
    gated = GatedStorage(storage)
    pubsub = LocalPubSub()
    settings = settings_for(migrated_database, export_lease_s=60.0)
    worker = ExportWorker(engine, gated, pubsub, settings, ExportMetrics(MeterProvider().get_meter("t")),
                          part_size=MIN_PART_SIZE)  # fmt: skip
    attempt = asyncio.create_task(worker.run_once())
    await asyncio.wait_for(gated.first_part.wait(), DEADLINE_S)
    async with engine.begin() as connection:
        cancelled = await cancel_job(connection, job.id, lambda _org: True)
    await announce_job(pubsub, cancelled)
    ended = await asyncio.wait_for(attempt, 5)  # 20 s without the announcement
    assert ended is not None and ended.id == job.id
    assert (await job_row(engine, job.id)).status == "CANCELLED"
    assert await objects(s3, bucket) == [] and await open_uploads(s3, bucket) == []


# --- 5. two workers racing for one job ---------------------------------------------------------------------


async def test_two_workers_racing_for_one_job_run_it_once(
    migrated_database: str, engine: AsyncEngine, storage: S3Storage, s3: Any, bucket: str
) -> None:
    org = new_org()
    await insert_events(engine, org, SMALL)
    job = await new_job(engine, org)
    settings = settings_for(migrated_database)
    first, second = new_worker(engine, storage, settings), new_worker(engine, storage, settings)
    ended = await asyncio.gather(first.run_once(), second.run_once())
    done = [row for row in ended if row is not None]
    assert len(done) == 1 and ended.count(None) == 1, ended
    assert (done[0].id, done[0].status, done[0].attempts) == (job.id, "SUCCEEDED", 1)
    await assert_one_correct_file(s3, bucket, await job_row(engine, job.id), SMALL)


# --- 6. one idempotency key sent twice at once -------------------------------------------------------------


INCIDENT = "mutation($i: IncidentExportInput!) { requestIncidentExport(input: $i) { id status } }"


async def test_one_idempotency_key_sent_twice_concurrently_makes_one_job(
    migrated_database: str, engine: AsyncEngine, settings: Settings, make_token: TokenFactory
) -> None:
    org = new_org()
    await insert_events(engine, org, SMALL)
    assert settings.database_url is not None
    own = settings.model_copy(update={"database_url": settings.database_url.__class__(migrated_database)})
    app = create_app(own, frozenset({ProcessRole.API}))
    token = make_token("engineer", org=org)
    window = {"from": DAY_START.isoformat(), "to": (DAY_START + dt.timedelta(days=1)).isoformat()}
    keys = [f"twice-{n}-{uuid.uuid4().hex[:8]}" for n in range(5)]
    async with (
        LifespanManager(app, startup_timeout=60) as manager,
        httpx.AsyncClient(transport=httpx.ASGITransport(app=manager.app), base_url="http://gateway.test") as http,
    ):
        for key in keys:
            variables: dict[str, object] = {"i": {"orgId": org, "range": window, "idempotencyKey": key}}
            answers = await asyncio.gather(*(graphql(http, INCIDENT, token, variables) for _ in range(2)))
            bodies = [answer.json() for answer in answers]
            assert all("errors" not in body for body in bodies), bodies
            ids = {body["data"]["requestIncidentExport"]["id"] for body in bodies}
            assert len(ids) == 1, bodies
    async with engine.connect() as connection:
        counts = (
            await connection.execute(
                text("SELECT idempotency_key, count(*) FROM export_jobs WHERE org_id = :org GROUP BY 1"), {"org": org}
            )
        ).all()  # fmt: skip
    assert sorted((key, int(count)) for key, count in counts) == sorted((key, 1) for key in keys)


# --- 7. a worker stopped during an attempt -----------------------------------------------------------------


async def test_a_worker_stopped_during_an_attempt_releases_the_job_and_aborts_its_upload(
    migrated_database: str, engine: AsyncEngine, storage: S3Storage, s3: Any, bucket: str
) -> None:
    org = new_org()
    await insert_events(engine, org, MID)
    job = await new_job(engine, org)
    gated = GatedStorage(storage)  # never resumed: the attempt outlasts the grace period
    settings = settings_for(migrated_database, export_lease_s=30.0)  # released by the worker, not by expiry
    stopping = new_worker(engine, gated, settings, part_size=MIN_PART_SIZE)
    await stopping.start()
    await asyncio.wait_for(gated.first_part.wait(), DEADLINE_S)
    assert len(await open_uploads(s3, bucket)) == 1
    started = time.monotonic()
    await stopping.stop(grace_s=1.0)
    assert time.monotonic() - started < 3.0  # half the grace, then the release (about 0.6 s in all)
    released = await job_row(engine, job.id)
    assert (released.status, released.attempts, released.lease_owner) == ("QUEUED", 1, None)
    assert released.error is not None and "the worker stopped during the attempt" in released.error
    assert await objects(s3, bucket) == [] and await open_uploads(s3, bucket) == []

    finished = await new_worker(engine, storage, settings).run_once()
    assert finished is not None and (finished.id, finished.attempts) == (job.id, 2)
    await assert_one_correct_file(s3, bucket, await job_row(engine, job.id), MID)
