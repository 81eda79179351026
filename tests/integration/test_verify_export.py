"""``verify_export`` and ``analytics-gateway verify-export`` on the real PostgreSQL and the moto S3 server.

Each job is built as the export worker builds it: events through the real writer (a duplicate, an unpriced
model, a price change inside the window, adversarial decimals, part of the window rolled up), the COST rows
from ``usage_rows`` in one REPEATABLE READ snapshot, encoded by ``exports/csv_format.py``, uploaded through
the S3 store, and the job claimed and marked SUCCEEDED through ``db/exports``.
"""

from __future__ import annotations

import datetime as dt
import decimal
import hashlib
import uuid
from collections.abc import Sequence
from typing import Any

import pytest
from opentelemetry.metrics import get_meter
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from db import exports as queries
from db.exports import ExportJobRow, NewJob, Outcome
from db.prices import EXACT, Price, upsert_price
from db.rollup import run_cycle, watermarks
from db.usage import UsageQuery, driver_connection, usage_rows
from exports.csv_format import COST, INCIDENT, encode
from exports.jobs import ExportJobNotFound, create_job, incident_selection, lease_of
from exports.storage import S3Storage, key_for
from exports.verify import NotVerifiable, verify_export
from ingest.events import TimeWindow, validate
from ingest.metrics import IngestMetrics
from ingest.writer import EventWriter
from kernel.hours import floor_hour
from tests.integration.serve_support import clean_env, run_cli

ORG = "org_verify"
PRICED, UNPRICED = "gpt-verify", "free-verify"
LEASE = dt.timedelta(seconds=60)
NOW = dt.datetime.now(dt.UTC)
RANGE_FROM = floor_hour(NOW - dt.timedelta(days=3)).replace(hour=0)
RANGE_TO = floor_hour(NOW) - dt.timedelta(hours=1)  # >= RANGE_FROM + 70 h
PRICE_CHANGE = RANGE_FROM + dt.timedelta(hours=24)


def event(
    n: str,
    at: dt.datetime,
    *,
    org: str = ORG,
    model: str = PRICED,
    project: str | None = "p1",
    tokens: tuple[int, int, int] = (1000, 100, 500),
    status: int = 200,
    region: str = "eu",
) -> dict[str, Any]:
    data: dict[str, Any] = {
        "org_id": org,
        "model": model,
        "input_tokens": tokens[0],
        "cached_input_tokens": tokens[1],
        "output_tokens": tokens[2],
        "latency_ms": 12.5,
        "status_code": status,
        "region": region,
    }
    if project is not None:
        data["project_id"] = project
    return {
        "specversion": "1.0",
        "id": n,
        "source": "//verify",
        "type": "ai.usage.request.v1",
        "time": at.isoformat(),
        "data": data,
    }


async def write(engine: AsyncEngine, events: Sequence[dict[str, Any]]) -> None:
    window = TimeWindow.around(dt.datetime.now(dt.UTC), retention_days=30)
    writer = EventWriter(engine, None, None, IngestMetrics(get_meter("test_verify_export")))
    await writer.write([validate(e, window) for e in events], channel="http")


async def seed(engine: AsyncEngine) -> None:
    """Prices (one change inside the window, digits no float keeps), then events of two orgs: a duplicate, an
    unpriced model, rows outside the window, hours rolled up and hours read raw."""
    async with engine.begin() as connection:
        for effective_from, input_, cached, output in (
            (RANGE_FROM - dt.timedelta(days=10), "0.1", "0.0333333333333333333333333333331", "1234567.891011"),
            (PRICE_CHANGE, "2.5", "1.25", "0.000001"),
        ):
            price = Price(
                PRICED, effective_from, decimal.Decimal(input_), decimal.Decimal(output), decimal.Decimal(cached)
            )
            await upsert_price(connection, price, "test")
    hour = dt.timedelta(hours=1)
    events = [
        event("e1", RANGE_FROM + hour),
        event("e1", RANGE_FROM + hour),  # a duplicate: counted once
        event("e2", RANGE_FROM + 26 * hour, tokens=(99_999_999, 99_999_998, 99_999_997), project=None),
        event("e3", RANGE_FROM + 50 * hour, model=UNPRICED, project="-p3", region="+eu"),
        event("e4", RANGE_FROM + 69 * hour, tokens=(7, 0, 3), project="p2"),
        event("e5", RANGE_FROM - dt.timedelta(microseconds=1)),  # before the window
        event("e6", RANGE_TO),  # at its end: outside
        event("o1", RANGE_FROM + 2 * hour, org="org_other", tokens=(5, 1, 5)),
    ]
    await write(engine, events)
    await run_cycle(engine, NOW)  # the rollups cover the window up to the last whole hour
    async with engine.connect() as connection:
        assert (await watermarks(connection)).materialized_through is not None


async def new_job(
    engine: AsyncEngine, kind: str, org_id: str | None, params: dict[str, Any] | None = None
) -> uuid.UUID:
    job = NewJob(
        org_id=org_id,
        kind=kind,
        requested_by="finance@test",
        idempotency_key=None,
        params=params or {},
        range_from=RANGE_FROM,
        range_to=RANGE_TO,
    )
    async with engine.begin() as connection:
        row, _ = await create_job(connection, job)
    return row.id


async def run_export(engine: AsyncEngine, storage: S3Storage, job_id: uuid.UUID) -> ExportJobRow:
    """What the worker does: claim, read the rows in one snapshot, encode, upload, succeed."""
    async with engine.begin() as connection:
        claimed = await queries.claim_job(connection, "test-worker", LEASE, 5)
    assert claimed is not None and claimed.id == job_id
    async with engine.connect() as connection, connection.begin():
        await connection.execute(text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY"))
        snapshot_at = (await connection.execute(text("SELECT now()"))).scalar_one()
        if claimed.kind == "COST":
            query = UsageQuery(
                org_id=claimed.org_id,
                start=claimed.range_from,
                end=claimed.range_to,
                granularity="DAY",
                time_zone="UTC",
                group_by=frozenset({"model", "project_id"}),
            )
            usage = await usage_rows(connection, query, (await watermarks(connection)).materialized_through)
            rows: list[tuple[Any, ...]] = sorted(
                (
                    (
                        u.org_id,
                        u.project_id,
                        u.model,
                        u.bucket.astimezone(dt.UTC).date(),
                        u.requests,
                        u.input_tokens,
                        u.cached_input_tokens,
                        u.output_tokens,
                        u.spend,
                    )
                    for u in usage
                    if u.bucket is not None
                ),
                key=lambda r: (r[0], r[1] or "", r[2], r[3]),
            )
            unpriced = sorted({u.model for u in usage if u.unpriced})
        else:
            raw = await driver_connection(connection)
            rows = [tuple(r) for r in await raw.fetch(queries.INCIDENT_ROWS, *incident_selection(claimed).args())]
            unpriced = []
    data = encode(COST if claimed.kind == "COST" else INCIDENT, rows)
    cost = claimed.kind == "COST"
    with decimal.localcontext(EXACT):  # the default context (28 digits) would round this sum
        spend = sum((r[8] for r in rows), decimal.Decimal(0)) if cost else None
    counts = (5, 6, 7) if cost else (11, 12, 13)  # input, cached and output tokens
    totals: dict[str, Any] = {
        "requests": sum(r[4] for r in rows) if cost else len(rows),
        "input_tokens": sum(r[counts[0]] for r in rows),
        "cached_input_tokens": sum(r[counts[1]] for r in rows),
        "output_tokens": sum(r[counts[2]] for r in rows),
        "spend": format(spend, "f") if spend is not None else None,
    }
    if cost:
        totals["unpriced_models"] = unpriced
    key = key_for(claimed.org_id, claimed.created_at, claimed.id)
    await put(storage, key, data)
    outcome = Outcome(len(rows), totals, hashlib.sha256(data).hexdigest(), key, snapshot_at)
    async with engine.begin() as connection:
        done = await queries.succeed_job(connection, lease_of(claimed), outcome, dt.timedelta(days=30))
    assert done is not None and done.status == "SUCCEEDED"
    return done


async def put(storage: S3Storage, key: str, data: bytes) -> None:
    upload = await storage.start(key)
    await upload.write(data)
    await upload.complete()


async def stored(storage: S3Storage, key: str) -> bytes:
    return b"".join([chunk async for chunk in storage.read(key)])


@pytest.mark.parametrize("org_id", [ORG, None], ids=["one org", "all orgs"])
async def test_a_good_cost_export_verifies(engine: AsyncEngine, storage: S3Storage, org_id: str | None) -> None:
    await seed(engine)
    job = await run_export(engine, storage, await new_job(engine, "COST", org_id))
    result = await verify_export(engine, storage, job.id)
    assert result.findings == []
    assert result.ok
    assert result.row_count == job.row_count == (5 if org_id is None else 4)
    assert result.file_totals is not None and result.usage_totals is not None
    assert result.file_totals.requests == (5 if org_id is None else 4)
    assert str(result.file_totals.spend) == job.totals["spend"]  # type: ignore[index]
    assert result.usage_totals == result.file_totals
    assert job.totals["unpriced_models"] == [UNPRICED]  # type: ignore[index]
    assert "OK" in result.render()


async def test_a_tampered_byte_is_a_checksum_finding(engine: AsyncEngine, storage: S3Storage) -> None:
    await seed(engine)
    job = await run_export(engine, storage, await new_job(engine, "COST", ORG))
    assert job.object_key is not None
    data = await stored(storage, job.object_key)
    await put(storage, job.object_key, data.replace(b"gpt-verify", b"gpt-verifY", 1))  # same sums, other bytes
    result = await verify_export(engine, storage, job.id)
    assert not result.ok
    assert [f.check for f in result.findings] == ["checksum"]
    assert result.findings[0].found == hashlib.sha256(data.replace(b"gpt-verify", b"gpt-verifY", 1)).hexdigest()
    assert result.findings[0].expected == job.checksum_sha256


async def test_a_changed_number_is_found_against_the_totals_and_usage(engine: AsyncEngine, storage: S3Storage) -> None:
    await seed(engine)
    job = await run_export(engine, storage, await new_job(engine, "COST", ORG))
    assert job.object_key is not None
    data = await stored(storage, job.object_key)
    header, first, rest = data.split(b"\r\n", 2)
    cells = first.split(b",")
    cells[4] = str(int(cells[4]) + 1).encode()  # one more request in the first row
    await put(storage, job.object_key, b"\r\n".join([header, b",".join(cells), rest]))
    result = await verify_export(engine, storage, job.id)
    checks = {f.check: f for f in result.findings}
    assert set(checks) == {"checksum", "totals.requests", "usage.requests"}
    assert (checks["totals.requests"].found, checks["totals.requests"].expected) == ("5", "4")
    assert "does not match the job's own totals" in checks["usage.requests"].reason


async def test_a_late_event_makes_usage_differ_and_is_named(engine: AsyncEngine, storage: S3Storage) -> None:
    await seed(engine)
    job = await run_export(engine, storage, await new_job(engine, "COST", ORG))
    late_at = RANGE_FROM + dt.timedelta(hours=3)  # in an hour the rollups already cover
    await write(engine, [event("late-1", late_at, tokens=(10, 0, 20))])
    result = await verify_export(engine, storage, job.id)
    checks = {f.check: f for f in result.findings}
    assert set(checks) == {"usage.requests", "usage.input_tokens", "usage.output_tokens", "usage.spend"}
    assert (checks["usage.requests"].found, checks["usage.requests"].expected) == ("4", "5")
    reason = checks["usage.spend"].reason
    assert "1 event(s) arrived after the export's snapshot" in reason
    assert "without them usage equals the file exactly" in reason
    assert f"{late_at.date().isoformat()} (file 1 / usage 2 requests)" in reason
    assert "NOT OK: 4 finding(s)" in result.render()


async def test_an_incident_export_verifies_and_errors_only_is_not_compared(
    engine: AsyncEngine, storage: S3Storage
) -> None:
    await seed(engine)
    job = await run_export(engine, storage, await new_job(engine, "INCIDENT", ORG, {"errors_only": False}))
    result = await verify_export(engine, storage, job.id)
    assert result.findings == [] and result.row_count == 4
    assert result.usage_totals is not None and result.usage_totals.requests == 4
    errors = await run_export(engine, storage, await new_job(engine, "INCIDENT", ORG, {"errors_only": True}))
    result = await verify_export(engine, storage, errors.id)
    assert result.ok and result.row_count == 0 and result.usage_totals is None
    assert any("not comparable with usage: filtered" in note for note in result.notes)


async def test_a_job_that_has_not_succeeded_is_refused(engine: AsyncEngine, storage: S3Storage) -> None:
    job_id = await new_job(engine, "COST", ORG)
    with pytest.raises(NotVerifiable, match=f"export job {job_id} is QUEUED, not SUCCEEDED"):
        await verify_export(engine, storage, job_id)
    with pytest.raises(ExportJobNotFound):
        await verify_export(engine, storage, uuid.uuid4())


async def test_the_command_exits_0_when_ok_1_with_findings_2_on_bad_input(
    engine: AsyncEngine, storage: S3Storage, migrated_database: str, s3_endpoint: str, bucket: str
) -> None:
    await seed(engine)
    good = await run_export(engine, storage, await new_job(engine, "COST", ORG))
    bad = await run_export(engine, storage, await new_job(engine, "COST", None))
    assert bad.object_key is not None
    await put(storage, bad.object_key, (await stored(storage, bad.object_key))[:-3])  # truncated
    queued = await new_job(engine, "COST", ORG)
    env = clean_env(
        ANALYTICS_DATABASE_URL=migrated_database,
        ANALYTICS_S3_BUCKET=bucket,
        ANALYTICS_S3_ENDPOINT_URL=s3_endpoint,
        AWS_ACCESS_KEY_ID="test",
        AWS_SECRET_ACCESS_KEY="test",
    )

    code, stdout, _ = await run_cli("verify-export", str(good.id), env=env)
    assert (code, stdout.splitlines()[-1]) == (
        0,
        "OK: the file matches its checksum, row count, totals and the usage answer",
    )
    code, stdout, _ = await run_cli("verify-export", str(bad.id), env=env)
    assert code == 1 and "- checksum:" in stdout and "NOT OK" in stdout
    code, _, stderr = await run_cli("verify-export", "not-a-uuid", env=env)
    assert code == 2 and "is not an export job id" in stderr
    unknown = uuid.uuid4()
    code, _, stderr = await run_cli("verify-export", str(unknown), env=env)
    assert code == 2 and f"export job {unknown} does not exist" in stderr
    code, _, stderr = await run_cli("verify-export", str(queued), env=env)
    assert code == 2 and "is QUEUED, not SUCCEEDED" in stderr
