"""Queries on ``export_jobs``: create (idempotent), claim with a lease, renew, finish, retry, cancel, expire,
list newest first; and the row selection of an INCIDENT export.

Every function takes an explicit connection and leaves the transaction to the caller (``engine.begin()``),
so an audit row can be written in the same transaction as the action. Times come from the database clock
(``now()``: the transaction's start), one clock for every worker whatever its host. The rules (validation,
idempotency, backoff, cursors) are in ``exports/jobs.py``.

A lease is fenced by owner and attempt: a worker whose lease was taken over (or whose job was cancelled) can
neither renew it nor finish the job, even if it is the same process that claimed it again.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from db.usage import driver_connection

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED, EXPIRED = (
    "QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED", "EXPIRED",
)  # fmt: skip
FINAL_STATUSES = frozenset({SUCCEEDED, FAILED, CANCELLED, EXPIRED})


@dataclass(frozen=True)
class ExportJobRow:
    id: uuid.UUID
    org_id: str | None
    kind: str
    status: str
    requested_by: str
    range_from: dt.datetime
    range_to: dt.datetime
    created_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    attempts: int
    row_count: int | None
    totals: dict[str, Any] | None
    checksum_sha256: str | None
    expires_at: dt.datetime | None
    error: str | None
    idempotency_key: str | None = None
    params: dict[str, Any] | None = None
    lease_owner: str | None = None
    lease_expires_at: dt.datetime | None = None
    object_key: str | None = None
    next_attempt_at: dt.datetime | None = None
    snapshot_at: dt.datetime | None = None


_COLUMNS = ", ".join(ExportJobRow.__dataclass_fields__)


def _row(mapping: Any) -> ExportJobRow:
    return ExportJobRow(**mapping)


async def get_export_job(connection: AsyncConnection, job_id: uuid.UUID) -> ExportJobRow | None:
    result = await connection.execute(text(f"SELECT {_COLUMNS} FROM export_jobs WHERE id = :id"), {"id": job_id})
    row = result.mappings().first()
    return _row(row) if row is not None else None


@dataclass(frozen=True)
class NewJob:
    """A job to create; ``params`` is the canonical input (JSON values only), compared for idempotency."""

    org_id: str | None
    kind: str
    requested_by: str
    idempotency_key: str | None
    params: dict[str, Any]
    range_from: dt.datetime
    range_to: dt.datetime


async def insert_job(connection: AsyncConnection, job: NewJob) -> tuple[ExportJobRow, bool]:
    """The new QUEUED job and True; or, when a job with the same (org, kind, requester, key) exists, that job
    and False (whatever its input: the caller compares). Two concurrent inserts with one key make one row:
    the second waits for the first's transaction at the unique index, then reads its row."""
    values = {
        "id": uuid.uuid4(), "org_id": job.org_id, "kind": job.kind, "requested_by": job.requested_by,
        "key": job.idempotency_key, "params": orjson.dumps(job.params).decode(),
        "range_from": job.range_from, "range_to": job.range_to,
    }  # fmt: skip
    inserted = await connection.execute(
        text(
            "INSERT INTO export_jobs (id, org_id, kind, requested_by, idempotency_key, params, range_from, range_to) "
            "VALUES (:id, :org_id, :kind, :requested_by, :key, CAST(:params AS jsonb), :range_from, :range_to) "
            "ON CONFLICT (coalesce(org_id, ''), kind, requested_by, idempotency_key) "
            "WHERE idempotency_key IS NOT NULL DO NOTHING "
            f"RETURNING {_COLUMNS}"
        ),
        values,
    )
    row = inserted.mappings().first()
    if row is not None:
        return _row(row), True
    # A conflict: the row is committed (ON CONFLICT waited for its transaction), and this statement's new
    # snapshot (READ COMMITTED) sees it.
    existing = await connection.execute(
        text(
            f"SELECT {_COLUMNS} FROM export_jobs WHERE coalesce(org_id, '') = coalesce(CAST(:org_id AS text), '') "
            "AND kind = :kind AND requested_by = :requested_by AND idempotency_key = :key"
        ),
        values,
    )
    return _row(existing.mappings().one()), False


@dataclass(frozen=True)
class Lease:
    """A worker's hold on a job: valid while the job is RUNNING with this owner and attempt."""

    job_id: uuid.UUID
    owner: str
    attempt: int


_RUNNABLE = (
    "(status = 'QUEUED' AND (next_attempt_at IS NULL OR next_attempt_at <= now())) "
    "OR (status = 'RUNNING' AND lease_expires_at <= now() AND attempts < :max_attempts)"
)


async def claim_job(
    connection: AsyncConnection, owner: str, lease: dt.timedelta, max_attempts: int
) -> ExportJobRow | None:
    """Take the oldest runnable job (QUEUED and due, or RUNNING with an expired lease and attempts left):
    RUNNING, leased to ``owner`` for ``lease``, one more attempt; None when there is none. Concurrent
    claimers skip rows another one has locked, so each job goes to one of them."""
    result = await connection.execute(
        text(
            "WITH next AS (SELECT id FROM export_jobs "
            f"WHERE status IN ('QUEUED', 'RUNNING') AND ({_RUNNABLE}) "
            "ORDER BY created_at, id LIMIT 1 FOR UPDATE SKIP LOCKED) "
            "UPDATE export_jobs j SET status = 'RUNNING', lease_owner = :owner, "
            "lease_expires_at = now() + CAST(:lease AS interval), attempts = j.attempts + 1, "
            "started_at = coalesce(j.started_at, now()), next_attempt_at = NULL "
            f"FROM next WHERE j.id = next.id RETURNING {', '.join('j.' + c for c in ExportJobRow.__dataclass_fields__)}"
        ),
        {"owner": owner, "lease": lease, "max_attempts": max_attempts},
    )
    row = result.mappings().first()
    return _row(row) if row is not None else None


async def fail_abandoned(connection: AsyncConnection, max_attempts: int) -> list[ExportJobRow]:
    """RUNNING jobs whose lease expired with no attempt left become FAILED (their workers stopped)."""
    result = await connection.execute(
        text(
            "UPDATE export_jobs SET status = 'FAILED', finished_at = now(), lease_owner = NULL, "
            "lease_expires_at = NULL, error = concat_ws('; ', error, "
            "format('attempt %s of %s stopped without finishing (its worker stopped or lost the database); "
            "no attempts left', attempts, CAST(:max_attempts AS integer))) "
            "WHERE id IN (SELECT id FROM export_jobs WHERE status = 'RUNNING' AND lease_expires_at <= now() "
            "AND attempts >= :max_attempts FOR UPDATE SKIP LOCKED) "
            f"RETURNING {_COLUMNS}"
        ),
        {"max_attempts": max_attempts},
    )
    return [_row(row) for row in result.mappings()]


_HELD = "id = :id AND status = 'RUNNING' AND lease_owner = :owner AND attempts = :attempt"


def _lease_values(lease: Lease) -> dict[str, Any]:
    return {"id": lease.job_id, "owner": lease.owner, "attempt": lease.attempt}


async def renew_lease(connection: AsyncConnection, lease: Lease, duration: dt.timedelta) -> bool:
    """Extend the lease to now + ``duration``; False when the job is no longer this lease's (cancelled, taken
    over after the lease expired, or finished)."""
    result = await connection.execute(
        text(
            f"UPDATE export_jobs SET lease_expires_at = now() + CAST(:duration AS interval) WHERE {_HELD} RETURNING id"
        ),
        {**_lease_values(lease), "duration": duration},
    )
    return result.first() is not None


@dataclass(frozen=True)
class Outcome:
    """What a successful attempt produced. ``totals``: JSON values (decimals as strings)."""

    row_count: int
    totals: dict[str, Any]
    checksum_sha256: str
    object_key: str
    snapshot_at: dt.datetime


async def succeed_job(
    connection: AsyncConnection, lease: Lease, outcome: Outcome, retention: dt.timedelta
) -> ExportJobRow | None:
    """SUCCEEDED with the outcome, kept for ``retention`` from now; None when the lease is no longer held
    (the caller then deletes the object it stored: the job is someone else's or cancelled)."""
    result = await connection.execute(
        text(
            "UPDATE export_jobs SET status = 'SUCCEEDED', finished_at = now(), lease_owner = NULL, "
            "lease_expires_at = NULL, row_count = :row_count, totals = CAST(:totals AS jsonb), "
            "checksum_sha256 = :checksum, object_key = :object_key, snapshot_at = :snapshot_at, "
            f"expires_at = now() + CAST(:retention AS interval), error = NULL WHERE {_HELD} RETURNING {_COLUMNS}"
        ),
        {
            **_lease_values(lease),
            "row_count": outcome.row_count,
            "totals": orjson.dumps(outcome.totals).decode(),
            "checksum": outcome.checksum_sha256,
            "object_key": outcome.object_key,
            "snapshot_at": outcome.snapshot_at,
            "retention": retention,
        },
    )
    row = result.mappings().first()
    return _row(row) if row is not None else None


async def fail_attempt(
    connection: AsyncConnection, lease: Lease, error: str, retry_after: dt.timedelta | None
) -> ExportJobRow | None:
    """End this attempt with ``error``: QUEUED again, due after ``retry_after``; or FAILED when it is None.
    None when the lease is no longer held."""
    result = await connection.execute(
        text(
            "UPDATE export_jobs SET lease_owner = NULL, lease_expires_at = NULL, error = :error, "
            "status = CASE WHEN CAST(:retry_after AS interval) IS NULL THEN 'FAILED' ELSE 'QUEUED' END, "
            "finished_at = CASE WHEN CAST(:retry_after AS interval) IS NULL THEN now() END, "
            "next_attempt_at = now() + CAST(:retry_after AS interval) "
            f"WHERE {_HELD} RETURNING {_COLUMNS}"
        ),
        {**_lease_values(lease), "error": error, "retry_after": retry_after},
    )
    row = result.mappings().first()
    return _row(row) if row is not None else None


async def lock_job(connection: AsyncConnection, job_id: uuid.UUID) -> ExportJobRow | None:
    """The job, locked until the end of the transaction (to decide on it and change it)."""
    result = await connection.execute(
        text(f"SELECT {_COLUMNS} FROM export_jobs WHERE id = :id FOR UPDATE"), {"id": job_id}
    )
    row = result.mappings().first()
    return _row(row) if row is not None else None


async def cancel_job(connection: AsyncConnection, job_id: uuid.UUID) -> ExportJobRow | None:
    """CANCELLED if QUEUED or RUNNING (its worker learns it at its next renewal); None otherwise."""
    result = await connection.execute(
        text(
            "UPDATE export_jobs SET status = 'CANCELLED', finished_at = now(), lease_owner = NULL, "
            "lease_expires_at = NULL, next_attempt_at = NULL "
            f"WHERE id = :id AND status IN ('QUEUED', 'RUNNING') RETURNING {_COLUMNS}"
        ),
        {"id": job_id},
    )
    row = result.mappings().first()
    return _row(row) if row is not None else None


async def expire_jobs(connection: AsyncConnection, limit: int = 1000) -> list[ExportJobRow]:
    """SUCCEEDED jobs past ``expires_at`` become EXPIRED (at most ``limit`` per call; rows another sweeper
    holds are skipped). The caller deletes their ``object_key`` objects after the commit: a deletion that
    fails leaves an object no link reaches, which the storage's lifecycle rule removes."""
    result = await connection.execute(
        text(
            "UPDATE export_jobs SET status = 'EXPIRED' WHERE id IN (SELECT id FROM export_jobs "
            "WHERE status = 'SUCCEEDED' AND expires_at <= now() ORDER BY expires_at LIMIT :limit "
            f"FOR UPDATE SKIP LOCKED) RETURNING {_COLUMNS}"
        ),
        {"limit": limit},
    )
    return [_row(row) for row in result.mappings()]


async def list_jobs(
    connection: AsyncConnection,
    *,
    org_ids: Sequence[str] | None,
    status: str | None,
    after: tuple[dt.datetime, uuid.UUID] | None,
    limit: int,
) -> list[ExportJobRow]:
    """Up to ``limit`` jobs newest first (created_at, then id, both descending), strictly after the position
    ``after``; of the orgs ``org_ids`` (None: every job, all-org ones included)."""
    clauses = ["true"]
    values: dict[str, Any] = {"limit": limit}
    if org_ids is not None:
        clauses.append("org_id = ANY(:org_ids)")
        values["org_ids"] = list(org_ids)
    if status is not None:
        clauses.append("status = :status")
        values["status"] = status
    if after is not None:
        clauses.append("(created_at, id) < (CAST(:after_created AS timestamptz), CAST(:after_id AS uuid))")
        values["after_created"], values["after_id"] = after
    result = await connection.execute(
        text(
            f"SELECT {_COLUMNS} FROM export_jobs WHERE {' AND '.join(clauses)} "
            "ORDER BY created_at DESC, id DESC LIMIT :limit"
        ),
        values,
    )
    return [_row(row) for row in result.mappings()]


@dataclass(frozen=True)
class IncidentSelection:
    """The events of an INCIDENT export: one org, [start, end), optional filters (None: no filter; an empty
    list matches nothing), and with ``errors_only`` only status codes >= 400."""

    org_id: str
    start: dt.datetime
    end: dt.datetime
    models: Sequence[str] | None = None
    project_ids: Sequence[str] | None = None
    api_key_ids: Sequence[str] | None = None
    errors_only: bool = False

    def args(self) -> tuple[object, ...]:
        def listed(values: Sequence[str] | None) -> list[str] | None:
            return list(values) if values is not None else None

        return (self.org_id, self.start, self.end, listed(self.models), listed(self.project_ids),
                listed(self.api_key_ids), self.errors_only)  # fmt: skip


# The one WHERE of an INCIDENT export, for its count and for its rows. $1 org, $2 start, $3 end,
# $4-$6 filters, $7 errors only.
INCIDENT_WHERE = (
    "e.org_id = $1 AND e.event_time >= $2 AND e.event_time < $3 "
    "AND ($4::text[] IS NULL OR e.model = ANY($4::text[])) "
    "AND ($5::text[] IS NULL OR e.project_id = ANY($5::text[])) "
    "AND ($6::text[] IS NULL OR e.api_key_id = ANY($6::text[])) "
    "AND (NOT $7::boolean OR e.status_code >= 400)"
)

# The rows of an INCIDENT export in the contract's column order, sorted by time then id (then source, so
# that the order is total). For a server-side cursor or ``COPY (...) TO STDOUT`` with ``selection.args()``.
INCIDENT_ROWS = (
    "SELECT e.event_time, e.event_id, e.source, e.org_id, e.project_id, e.api_key_id, e.model, e.status_code, "
    "e.error_type, e.latency_ms, e.ttft_ms, e.input_tokens, e.cached_input_tokens, e.output_tokens, e.region "
    f"FROM usage_events e WHERE {INCIDENT_WHERE} ORDER BY e.event_time, e.event_id, e.source"
)


async def count_incident_rows(connection: AsyncConnection, selection: IncidentSelection) -> int:
    """How many rows the INCIDENT export of ``selection`` holds. One statement on the driver's connection: in
    the connection's transaction once a statement has begun it (SQLAlchemy begins lazily), else on its own."""
    raw = await driver_connection(connection)
    count = await raw.fetchval(f"SELECT count(*) FROM usage_events e WHERE {INCIDENT_WHERE}", *selection.args())
    return int(count)
