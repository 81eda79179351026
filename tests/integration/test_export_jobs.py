"""The export job queue on the real PostgreSQL (and Redis for the announcements).

Claims take the oldest runnable job of the whole table, so this module runs on a database of its own
(migrated here): jobs that other tests leave QUEUED in the shared database cannot be claimed by these tests,
nor these jobs by theirs.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import decimal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
import pytest
from redis.asyncio import Redis
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from db import exports as queries
from db.engine import create_engine
from db.exports import ExportJobRow, IncidentSelection, Lease, Outcome
from db.migrate import migrate
from exports.job_events import announce_job, subscribe_job
from exports.job_lease import LeaseKeeper, LeaseLost
from exports.job_list import InvalidCursor, list_page
from exports.jobs import (
    ExportJobNotFound,
    IdempotencyConflict,
    IncidentTooLarge,
    NotCancellable,
    RetryPolicy,
    Totals,
    cancel_job,
    claim,
    cost_job,
    create_job,
    ensure_incident_within,
    fail_attempt,
    incident_job,
    incident_selection,
    lease_of,
)
from kernel.errors import BadUserInput, Forbidden
from kernel.pubsub import RedisPubSub
from tests.conftest import REDIS_URL, RUN_ID

LEASE = dt.timedelta(seconds=30)
NO_WAIT = RetryPolicy(max_attempts=3, base=dt.timedelta(0), cap=dt.timedelta(0), jitter=0)
NOW = dt.datetime(2026, 11, 29, 12, 34, 56, 789000, tzinfo=dt.UTC)


@pytest.fixture(scope="module")
async def engine(empty_database_module: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(empty_database_module, pool_size=12)
    await migrate(engine)
    yield engine
    await engine.dispose()


@pytest.fixture
async def clean(engine: AsyncEngine) -> AsyncEngine:
    """No job left runnable by an earlier test of this module."""
    async with engine.begin() as connection:
        await connection.execute(text("DELETE FROM export_jobs"))
    return engine


def _org() -> str:
    return f"org_jobs_{uuid.uuid4().hex[:8]}"


_NEW_ORG = "new org"


async def _create(
    engine: AsyncEngine,
    *,
    org_id: str | None = _NEW_ORG,
    month: str | None = "2026-10",
    requested_by: str = "fin",
    key: str | None = None,
    now: dt.datetime = NOW,
) -> tuple[ExportJobRow, bool]:
    """A COST job (by default of an org of its own, for a closed month)."""
    org_id = _org() if org_id == _NEW_ORG else org_id
    job = cost_job(org_id=org_id, month=month, requested_by=requested_by, key=key, now=now)
    async with engine.begin() as connection:
        return await create_job(connection, job)


async def _claim(engine: AsyncEngine, owner: str, policy: RetryPolicy = NO_WAIT) -> ExportJobRow | None:
    async with engine.begin() as connection:
        claimed, _ = await claim(connection, owner, LEASE, policy)
    return claimed


async def _job(engine: AsyncEngine, job_id: uuid.UUID) -> ExportJobRow:
    async with engine.connect() as connection:
        row = await queries.get_export_job(connection, job_id)
    assert row is not None
    return row


# Idempotency


async def test_the_same_key_and_input_return_the_same_job(engine: AsyncEngine) -> None:
    org = _org()
    first, created = await _create(engine, org_id=org, key="k-1")
    again, created_again = await _create(engine, org_id=org, key="k-1")
    assert (created, created_again) == (True, False)
    assert again.id == first.id and again.status == "QUEUED"
    assert first.params == {"month": "2026-10", "month_to_date": False}
    assert (first.range_from, first.range_to) == (
        dt.datetime(2026, 10, 1, tzinfo=dt.UTC),
        dt.datetime(2026, 11, 1, tzinfo=dt.UTC),
    )


async def test_the_same_key_with_another_input_is_refused_naming_the_key(engine: AsyncEngine) -> None:
    org = _org()
    first, _ = await _create(engine, org_id=org, key="monthly-close")
    with pytest.raises(IdempotencyConflict) as refused:
        await _create(engine, org_id=org, key="monthly-close", month="2026-09")
    assert "'monthly-close'" in refused.value.message and str(first.id) in refused.value.message
    assert refused.value.extensions == {"code": "BAD_USER_INPUT"}


async def test_no_key_makes_a_new_job_each_time(engine: AsyncEngine) -> None:
    org = _org()
    one, _ = await _create(engine, org_id=org)
    two, _ = await _create(engine, org_id=org)
    assert one.id != two.id


async def test_a_key_is_per_org_kind_and_requester(engine: AsyncEngine) -> None:
    org = _org()
    mine, _ = await _create(engine, org_id=org, key="k")
    theirs, created = await _create(engine, org_id=org, key="k", requested_by="someone-else")
    all_orgs, created_all = await _create(engine, org_id=None, key="k")
    assert created and created_all and len({mine.id, theirs.id, all_orgs.id}) == 3


async def test_month_to_date_resent_in_the_month_returns_the_first_job_and_its_cut(engine: AsyncEngine) -> None:
    org = _org()
    first, _ = await _create(engine, org_id=org, month=None, key="mtd")
    later, created = await _create(engine, org_id=org, month="2026-11", key="mtd", now=NOW + dt.timedelta(hours=5))
    assert not created and later.id == first.id
    assert first.range_to == NOW.replace(microsecond=0)  # cut at the request, to the second
    with pytest.raises(IdempotencyConflict, match="month 2026-11 to date"):
        await _create(engine, org_id=org, month=None, key="mtd", now=dt.datetime(2026, 12, 1, 9, tzinfo=dt.UTC))


async def test_concurrent_creates_with_one_key_make_one_job(engine: AsyncEngine) -> None:
    org = _org()
    job = incident_job(org_id=org, start=NOW - dt.timedelta(hours=1), end=NOW, requested_by="eng", key="page-42")

    async def create() -> tuple[ExportJobRow, bool]:
        async with engine.begin() as connection:
            # Hold the transaction open a moment after inserting, so the others meet the uncommitted row.
            result = await create_job(connection, job)
            await connection.execute(text("SELECT pg_sleep(0.05)"))
            return result

    results = await asyncio.gather(*(create() for _ in range(8)))
    assert len({row.id for row, _ in results}) == 1
    assert sum(created for _, created in results) == 1
    async with engine.connect() as connection:
        count = await connection.scalar(text("SELECT count(*) FROM export_jobs WHERE org_id = :o"), {"o": org})
    assert count == 1


async def test_a_create_that_meets_an_uncommitted_one_returns_its_job_once_committed(engine: AsyncEngine) -> None:
    org = _org()
    job = cost_job(org_id=org, month=None, requested_by="fin", key="close-nov", now=NOW)
    async with engine.begin() as first:
        mine, created = await create_job(first, job)
        assert created
        second = asyncio.create_task(_create(engine, org_id=org, month=None, key="close-nov"))
        await _until(lambda: _waiting_for_a_lock(engine))  # the second insert waits at the unique index
    theirs, created_again = await asyncio.wait_for(second, 5)
    assert theirs.id == mine.id and not created_again


async def _waiting_for_a_lock(engine: AsyncEngine) -> bool:
    async with engine.connect() as connection:
        waiting = await connection.scalar(
            text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock' AND query LIKE 'INSERT INTO export_jobs%'"
            )
        )
    return bool(waiting)


# Claims and leases


async def test_two_workers_racing_for_one_job_one_claims_it(clean: AsyncEngine) -> None:
    created, _ = await _create(clean)
    async with clean.begin() as first:
        claimed, _ = await claim(first, "worker-a", LEASE, NO_WAIT)  # locked, not yet committed
        assert claimed is not None and claimed.id == created.id
        # Skips the locked row (a claim that waited for the lock would time out here).
        assert await asyncio.wait_for(_claim(clean, "worker-b"), 5) is None
    # And with both claims really concurrent: one job, one winner.
    created, _ = await _create(clean)
    results = await asyncio.gather(*(_claim(clean, f"worker-{i}") for i in range(6)))
    winners = [row for row in results if row is not None]
    assert [row.id for row in winners] == [created.id]
    row = await _job(clean, created.id)
    assert (row.status, row.attempts, row.lease_owner) == ("RUNNING", 1, winners[0].lease_owner)
    assert row.started_at is not None and row.lease_expires_at is not None


async def test_an_expired_lease_is_reclaimed_as_attempt_two_and_the_old_owner_is_fenced(clean: AsyncEngine) -> None:
    created, _ = await _create(clean)
    first = await _claim(clean, "worker-a")
    assert first is not None and await _claim(clean, "worker-b") is None  # the lease holds
    async with clean.begin() as connection:
        await connection.execute(
            text("UPDATE export_jobs SET lease_expires_at = now() - interval '1 second' WHERE id = :id"),
            {"id": created.id},
        )
    second = await _claim(clean, "worker-b")
    assert second is not None and second.id == created.id
    assert (second.attempts, second.lease_owner, second.started_at) == (2, "worker-b", first.started_at)
    old = lease_of(first)
    async with clean.begin() as connection:
        assert not await queries.renew_lease(connection, old, LEASE)
        assert await queries.succeed_job(connection, old, _outcome(), dt.timedelta(days=1)) is None
        assert await queries.renew_lease(connection, lease_of(second), LEASE)


async def test_the_same_owner_claiming_again_fences_its_own_older_attempt(clean: AsyncEngine) -> None:
    created, _ = await _create(clean)
    first = await _claim(clean, "worker-a")
    assert first is not None
    async with clean.begin() as connection:
        await connection.execute(
            text("UPDATE export_jobs SET lease_expires_at = now() - interval '1 second' WHERE id = :id"),
            {"id": created.id},
        )
    second = await _claim(clean, "worker-a")
    assert second is not None and second.attempts == 2
    async with clean.begin() as connection:
        assert not await queries.renew_lease(connection, Lease(created.id, "worker-a", 1), LEASE)
        assert await queries.fail_attempt(connection, Lease(created.id, "worker-a", 1), "stale", None) is None
    assert (await _job(clean, created.id)).status == "RUNNING"


async def test_renew_after_cancel_returns_false_and_cancel_is_idempotent(clean: AsyncEngine) -> None:
    created, _ = await _create(clean)
    claimed = await _claim(clean, "worker-a")
    assert claimed is not None
    lease = lease_of(claimed)

    def anyone(_: str | None) -> bool:
        return True

    async with clean.begin() as connection:
        cancelled = await cancel_job(connection, created.id, anyone)
    assert cancelled.status == "CANCELLED" and cancelled.finished_at is not None
    async with clean.begin() as connection:
        assert not await queries.renew_lease(connection, lease, LEASE)
        again = await cancel_job(connection, created.id, anyone)
        assert again == cancelled  # unchanged
        assert await queries.fail_attempt(connection, lease, "late", None) is None
    assert await _claim(clean, "worker-b") is None


async def test_cancel_refuses_ended_jobs_and_other_orgs(clean: AsyncEngine) -> None:
    created, _ = await _create(clean)
    claimed = await _claim(clean, "worker-a")
    assert claimed is not None
    async with clean.begin() as connection:
        assert await queries.succeed_job(connection, lease_of(claimed), _outcome(), dt.timedelta(days=1))
    async with clean.begin() as connection:
        with pytest.raises(NotCancellable, match="SUCCEEDED"):
            await cancel_job(connection, created.id, lambda _org: True)
    queued, _ = await _create(clean)
    async with clean.begin() as connection:
        with pytest.raises(Forbidden):
            await cancel_job(connection, queued.id, lambda org: org == "someone_else")
        with pytest.raises(ExportJobNotFound):
            await cancel_job(connection, uuid.uuid4(), lambda _org: True)
    assert (await _job(clean, queued.id)).status == "QUEUED"


async def test_failed_attempts_are_retried_with_backoff_then_failed_with_the_error(clean: AsyncEngine) -> None:
    created, _ = await _create(clean)
    for attempt in (1, 2):
        claimed = await _claim(clean, "worker-a")
        assert claimed is not None and claimed.id == created.id and claimed.attempts == attempt
        async with clean.begin() as connection:
            requeued = await fail_attempt(connection, lease_of(claimed), "S3 answered 503 SlowDown", NO_WAIT)
        assert requeued is not None and requeued.status == "QUEUED" and requeued.lease_owner is None
        assert requeued.error == f"attempt {attempt} of 3: S3 answered 503 SlowDown"
    claimed = await _claim(clean, "worker-a")
    assert claimed is not None and claimed.attempts == 3
    async with clean.begin() as connection:
        failed = await fail_attempt(connection, lease_of(claimed), "S3 answered 503 SlowDown", NO_WAIT)
    assert failed is not None and failed.status == "FAILED" and failed.finished_at is not None
    assert failed.error == "attempt 3 of 3: S3 answered 503 SlowDown"
    assert await _claim(clean, "worker-a") is None


async def test_a_retry_waits_for_its_backoff(clean: AsyncEngine) -> None:
    patient = RetryPolicy(max_attempts=3, base=dt.timedelta(hours=1), cap=dt.timedelta(hours=1), jitter=0)
    created, _ = await _create(clean)
    claimed = await _claim(clean, "worker-a", patient)
    assert claimed is not None
    async with clean.begin() as connection:
        requeued = await fail_attempt(connection, lease_of(claimed), "timeout", patient)
        now = await connection.scalar(text("SELECT now()"))
    assert requeued is not None and requeued.next_attempt_at == now + dt.timedelta(hours=1)
    assert await _claim(clean, "worker-b", patient) is None
    async with clean.begin() as connection:
        await connection.execute(
            text("UPDATE export_jobs SET next_attempt_at = now() - interval '1 second' WHERE id = :id"),
            {"id": created.id},
        )
    again = await _claim(clean, "worker-b", patient)
    assert again is not None and again.attempts == 2 and again.next_attempt_at is None


async def test_a_non_retryable_error_fails_at_once(clean: AsyncEngine) -> None:
    created, _ = await _create(clean)
    claimed = await _claim(clean, "worker-a")
    assert claimed is not None and claimed.id == created.id
    async with clean.begin() as connection:
        failed = await fail_attempt(connection, lease_of(claimed), "more rows than the cap", NO_WAIT, retryable=False)
    assert failed is not None and failed.status == "FAILED" and failed.attempts == 1


async def test_a_job_whose_last_worker_died_is_failed_not_claimed(clean: AsyncEngine) -> None:
    created, _ = await _create(clean)
    async with clean.begin() as connection:
        await connection.execute(
            text(
                "UPDATE export_jobs SET status = 'RUNNING', attempts = 3, lease_owner = 'gone', "
                "lease_expires_at = now() - interval '1 second' WHERE id = :id"
            ),
            {"id": created.id},
        )
    async with clean.begin() as connection:  # a claim alone never takes a job that has no attempts left
        assert await queries.claim_job(connection, "worker-a", LEASE, NO_WAIT.max_attempts) is None
    async with clean.begin() as connection:
        claimed, abandoned = await claim(connection, "worker-a", LEASE, NO_WAIT)
    assert claimed is None
    assert [row.id for row in abandoned] == [created.id]
    row = await _job(clean, created.id)
    assert row.status == "FAILED" and row.lease_owner is None
    assert row.error is not None and "attempt 3 of 3 stopped without finishing" in row.error


async def test_success_records_the_outcome_exactly(clean: AsyncEngine) -> None:
    created, _ = await _create(clean)
    claimed = await _claim(clean, "worker-a")
    assert claimed is not None and claimed.id == created.id
    outcome = _outcome()
    async with clean.begin() as connection:
        done = await queries.succeed_job(connection, lease_of(claimed), outcome, dt.timedelta(days=30))
        now = await connection.scalar(text("SELECT now()"))
    assert done is not None and done.status == "SUCCEEDED" and done.lease_owner is None
    assert (done.row_count, done.checksum_sha256, done.object_key) == (3, "ab" * 32, "exports/x/2026/10/j.csv")
    assert done.expires_at == now + dt.timedelta(days=30) and done.finished_at == now
    assert done.totals is not None and Totals.from_json(done.totals) == _TOTALS
    assert done.totals["spend"] == "12345678901234567890.000000123456789"
    assert done.snapshot_at == outcome.snapshot_at


_TOTALS = Totals(3, 9_007_199_254_740_993, 0, 1, decimal.Decimal("12345678901234567890.000000123456789"))


def _outcome() -> Outcome:
    return Outcome(3, _TOTALS.to_json(), "ab" * 32, "exports/x/2026/10/j.csv", NOW)


# The lease keeper


async def test_the_keeper_renews_the_lease_and_stops_the_work_when_the_job_is_cancelled(clean: AsyncEngine) -> None:
    created, _ = await _create(clean)
    claimed = await _claim(clean, "worker-a")
    assert claimed is not None and claimed.lease_expires_at is not None
    first_expiry = claimed.lease_expires_at
    never = asyncio.Event()
    stopped: list[str] = []
    with pytest.raises(LeaseLost, match="cancelled or taken over"):
        async with LeaseKeeper(clean, lease_of(claimed), LEASE, every=dt.timedelta(milliseconds=20)) as keeper:
            await _until(lambda: _renewed_after(clean, created.id, first_expiry))
            async with clean.begin() as connection:
                await cancel_job(connection, created.id, lambda _org: True)
            try:
                await asyncio.wait_for(never.wait(), 5)  # the work
            except asyncio.CancelledError:
                stopped.append("cancelled by the keeper")
                raise
    assert keeper.lost.is_set() and stopped == ["cancelled by the keeper"]


async def test_the_keeper_leaves_a_body_that_ends_normally_alone(clean: AsyncEngine) -> None:
    await _create(clean)
    claimed = await _claim(clean, "worker-a")
    assert claimed is not None
    async with LeaseKeeper(clean, lease_of(claimed), LEASE, every=dt.timedelta(milliseconds=10)) as keeper:
        await asyncio.sleep(0)
    assert not keeper.lost.is_set()
    keeper.check()
    assert [task for task in asyncio.all_tasks() if task.get_name().startswith("lease ")] == []  # stopped


async def test_the_keeper_gives_up_when_it_cannot_renew_before_the_lease_expires(clean: AsyncEngine) -> None:
    await _create(clean)
    claimed = await _claim(clean, "worker-a")
    assert claimed is not None
    unreachable = create_engine("postgresql://postgres@127.0.0.1:1/nowhere", pool_size=1, connect_timeout=1)
    never = asyncio.Event()
    started = time.monotonic()
    try:
        with pytest.raises(LeaseLost, match="expired before it could be renewed"):
            async with LeaseKeeper(unreachable, lease_of(claimed), dt.timedelta(milliseconds=300),
                                   every=dt.timedelta(milliseconds=50)):  # fmt: skip
                await asyncio.wait_for(never.wait(), 5)
    finally:
        await unreachable.dispose()
    assert time.monotonic() - started < 3


async def _renewed_after(engine: AsyncEngine, job_id: uuid.UUID, expiry: dt.datetime) -> bool:
    row = await _job(engine, job_id)
    return row.lease_expires_at is not None and row.lease_expires_at > expiry


async def _until(condition: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


# Retention


async def test_expire_moves_succeeded_jobs_past_retention_and_returns_their_objects(clean: AsyncEngine) -> None:
    old, _ = await _create(clean)
    kept, _ = await _create(clean)
    for job, retention in ((old, dt.timedelta(0)), (kept, dt.timedelta(days=1))):
        claimed = await _claim(clean, "worker-a")
        assert claimed is not None and claimed.id == job.id
        outcome = Outcome(1, _TOTALS.to_json(), "cd" * 32, f"exports/{job.org_id}/2026/10/{job.id}.csv", NOW)
        async with clean.begin() as connection:
            assert await queries.succeed_job(connection, lease_of(claimed), outcome, retention)
    async with clean.begin() as connection:
        expired = await queries.expire_jobs(connection)
    assert [(row.id, row.status, row.object_key) for row in expired] == [
        (old.id, "EXPIRED", f"exports/{old.org_id}/2026/10/{old.id}.csv")
    ]
    assert (await _job(clean, kept.id)).status == "SUCCEEDED"
    async with clean.begin() as connection:
        assert await queries.expire_jobs(connection) == []


# Listing


async def test_list_pages_newest_first_scoped_and_filtered(clean: AsyncEngine) -> None:
    org, other = _org(), _org()
    mine = [(await _create(clean, org_id=org))[0] for _ in range(5)]
    async with clean.begin() as connection:  # two jobs with the same created_at: id breaks the tie
        for _ in range(2):
            mine.append(
                (
                    await create_job(
                        connection, cost_job(org_id=org, month="2026-10", requested_by="f", key=None, now=NOW)
                    )
                )[0]
            )
    theirs = (await _create(clean, org_id=other))[0]
    everyone = (await _create(clean, org_id=None))[0]
    expected = sorted(mine, key=lambda row: (row.created_at, row.id), reverse=True)

    seen: list[ExportJobRow] = []
    after: str | None = None
    async with clean.connect() as connection:
        while True:
            page = await list_page(connection, visible_orgs=[org], org_id=None, status=None, first=2, after=after)
            seen.extend(page.rows)
            if not page.has_next_page:
                break
            after = page.end_cursor
    assert [row.id for row in seen] == [row.id for row in expected]

    async with clean.connect() as connection:
        platform = await list_page(connection, visible_orgs=None, org_id=None, status=None, first=100, after=None)
        assert {theirs.id, everyone.id} <= {row.id for row in platform.rows} and len(platform.rows) == 9
        assert not platform.has_next_page
        only_other = await list_page(connection, visible_orgs=None, org_id=other, status=None, first=10, after=None)
        assert [row.id for row in only_other.rows] == [theirs.id]
        with pytest.raises(Forbidden):
            await list_page(connection, visible_orgs=[org], org_id=other, status=None, first=10, after=None)
        no_org = await list_page(connection, visible_orgs=[], org_id=None, status=None, first=10, after=None)
        assert no_org.rows == [] and no_org.end_cursor is None
    claimed = await _claim(clean, "worker-a")
    assert claimed is not None
    async with clean.connect() as connection:
        running = await list_page(connection, visible_orgs=None, org_id=None, status="RUNNING", first=10, after=None)
    assert [row.id for row in running.rows] == [claimed.id]


@pytest.mark.parametrize(
    "cursor",
    ["garbage", "", "x" * 500, "ajF8MjAyNi0xMS0yOVQxMjowMDowMCswMDowMHxub3QtYS11dWlkfDAwMDAwMDAwMDAwMA"],
)
async def test_a_tampered_cursor_is_a_clear_error(engine: AsyncEngine, cursor: str) -> None:
    async with engine.connect() as connection:
        with pytest.raises(InvalidCursor, match="is not a cursor of this list") as refused:
            await list_page(connection, visible_orgs=None, org_id=None, status=None, first=5, after=cursor)
    assert refused.value.extensions == {"code": "BAD_USER_INPUT"}


async def test_an_edited_cursor_is_refused(clean: AsyncEngine) -> None:
    for _ in range(3):
        await _create(clean)
    async with clean.connect() as connection:
        page = await list_page(connection, visible_orgs=None, org_id=None, status=None, first=1, after=None)
        assert page.end_cursor is not None
        raw = base64.urlsafe_b64decode(page.end_cursor + "=" * (-len(page.end_cursor) % 4)).decode()
        version, created, job_id, digest = raw.split("|")
        other_id = job_id[:-1] + ("0" if job_id[-1] != "0" else "1")  # a well-formed position of another job
        edited = "|".join((version, created, other_id, digest))
        forged = base64.urlsafe_b64encode(edited.encode()).decode().rstrip("=")
        with pytest.raises(InvalidCursor):
            await list_page(connection, visible_orgs=None, org_id=None, status=None, first=1, after=forged)


@pytest.mark.parametrize("first", [0, -1, 101])
async def test_first_is_bounded(engine: AsyncEngine, first: int) -> None:
    async with engine.connect() as connection:
        with pytest.raises(BadUserInput, match="between 1 and 100"):
            await list_page(connection, visible_orgs=None, org_id=None, status=None, first=first, after=None)


# The INCIDENT row count


async def _insert_events(connection: AsyncConnection, org: str, rows: list[tuple[dt.datetime, str, str, int]]) -> None:
    await connection.execute(text("SELECT analytics_ensure_usage_partition(CAST(:day AS date))"), {"day": NOW.date()})
    for index, (at, model, project, status) in enumerate(rows):
        await connection.execute(
            text(
                "INSERT INTO usage_events (org_id, event_time, source, event_id, project_id, api_key_id, model, "
                "input_tokens, output_tokens, latency_ms, status_code) "
                "VALUES (:org, :at, '//test', :id, :project, 'key_1', :model, 10, 5, 12.5, :status)"
            ),
            {"org": org, "at": at, "id": f"e{index}", "project": project, "model": model, "status": status},
        )


async def test_count_incident_rows_uses_the_exports_where(engine: AsyncEngine) -> None:
    org = _org()
    start = NOW.replace(minute=0, second=0, microsecond=0)
    async with engine.begin() as connection:
        await _insert_events(
            connection,
            org,
            [
                (start, "m1", "p1", 200),
                (start + dt.timedelta(minutes=1), "m1", "p2", 503),
                (start + dt.timedelta(minutes=2), "m2", "p1", 429),
                (start + dt.timedelta(minutes=3), "m2", "p1", 200),
                (start + dt.timedelta(hours=1), "m1", "p1", 500),  # at the range's end: outside
            ],
        )
        await _insert_events(connection, _org(), [(start, "m1", "p1", 500)])  # another org

    def selection(**filters: Any) -> IncidentSelection:
        job = incident_job(
            org_id=org, start=start, end=start + dt.timedelta(hours=1), requested_by="e", key=None, **filters
        )
        row = ExportJobRow(uuid.uuid4(), org, "INCIDENT", "QUEUED", "e", job.range_from, job.range_to, NOW, None,
                           None, 0, None, None, None, None, None, params=job.params)  # fmt: skip
        return incident_selection(row)

    async with engine.connect() as connection:
        assert await queries.count_incident_rows(connection, selection()) == 4
        assert await queries.count_incident_rows(connection, selection(errors_only=True)) == 2
        assert await queries.count_incident_rows(connection, selection(models=["m2"])) == 2
        assert await queries.count_incident_rows(connection, selection(models=["m2"], errors_only=True)) == 1
        assert await queries.count_incident_rows(connection, selection(project_ids=["p2", "p2"])) == 1
        assert await queries.count_incident_rows(connection, selection(api_key_ids=[])) == 0
        assert await ensure_incident_within(connection, selection(), cap=4) == 4
        with pytest.raises(IncidentTooLarge, match="4 rows, more than the limit of 3"):
            await ensure_incident_within(connection, selection(), cap=3)


# Announcements


async def test_each_state_change_is_announced_on_the_jobs_channel(engine: AsyncEngine) -> None:
    redis = Redis.from_url(REDIS_URL)
    pubsub = RedisPubSub(redis, f"test:{RUN_ID}:")
    created, _ = await _create(engine)
    try:
        async with subscribe_job(pubsub, created.id) as messages:
            await announce_job(pubsub, created)
            cancelled = created.__class__(**{**created.__dict__, "status": "CANCELLED"})
            await announce_job(pubsub, cancelled)
            received = [orjson.loads(await asyncio.wait_for(anext(messages), 5)) for _ in range(2)]
    finally:
        await redis.aclose()
    assert received == [
        {"id": str(created.id), "status": "QUEUED", "attempts": 0},
        {"id": str(created.id), "status": "CANCELLED", "attempts": 0},
    ]
