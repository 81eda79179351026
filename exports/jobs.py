"""Export job rules: what a request may ask for, idempotency, cancelling, and the retry policy.

Idempotency: a job is identified by (org, kind, requester, key). The same key with the same input returns
the job created first, whatever its status; the same key with another input is refused
(:class:`IdempotencyConflict`, naming the key); no key creates a new job each time. The input compared is
the request's canonical form (``params``): filters sorted and without repeats, instants in UTC.

What "month to date" cuts at: the instant of the request, truncated to the whole second (UTC). The job's
range is [first of the month 00:00 UTC, that instant), recorded as ``range_to`` when the job is created, so
the file and a ``usage`` answer for the same range can be compared; the worker records the instant of the
database snapshot it read the rows in (``snapshot_at``). The canonical input of a month-to-date request is
the month it fell in: resent within the month with the same key it returns the first job (and its cut);
resent with that key in a later month it is another input (another month) and is refused. Naming the
current month explicitly is the same request as omitting it.
"""

from __future__ import annotations

import datetime as dt
import decimal
import random
import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from db import exports as queries
from db.exports import ExportJobRow, IncidentSelection, Lease, NewJob
from kernel.errors import BadUserInput, ErrorCode, Forbidden, GatewayError

COST, INCIDENT = "COST", "INCIDENT"
MAX_TEXT = 200  # ids, filter values and idempotency keys
MAX_FILTER_VALUES = 100
EARLIEST = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
LATEST = dt.datetime(9999, 1, 1, tzinfo=dt.UTC)
_MONTH = re.compile(r"(\d{4})-(0[1-9]|1[0-2])")


class ExportJobNotFound(GatewayError):
    code = ErrorCode.NOT_FOUND


class IdempotencyConflict(BadUserInput):
    """The idempotency key was used before for another input."""


class NotCancellable(BadUserInput):
    """The job has already ended (SUCCEEDED, FAILED or EXPIRED)."""


class IncidentTooLarge(BadUserInput):
    """An INCIDENT export would hold more rows than the cap."""


def _text(name: str, value: str, *, max_len: int = MAX_TEXT) -> str:
    if not value:
        raise BadUserInput(f"{name} must not be empty")
    if len(value) > max_len:
        raise BadUserInput(f"{name} is longer than {max_len} characters")
    if "\x00" in value:
        raise BadUserInput(f"{name} must not contain NUL characters")
    return value


def _instant(name: str, value: dt.datetime) -> dt.datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise BadUserInput(f"{name} must have a time zone offset")
    value = value.astimezone(dt.UTC)
    if not EARLIEST <= value < LATEST:
        raise BadUserInput(f"{name} must be between {EARLIEST.isoformat()} and {LATEST.isoformat()}")
    return value


def _values(name: str, values: Sequence[str] | None) -> list[str] | None:
    if values is None:
        return None
    if len(values) > MAX_FILTER_VALUES:
        raise BadUserInput(f"{name} has more than {MAX_FILTER_VALUES} values")
    return sorted({_text(name, value) for value in values})


def idempotency_key(value: str | None) -> str | None:
    return _text("idempotencyKey", value) if value is not None else None


def month_start(year: int, month: int) -> dt.datetime:
    return dt.datetime(year, month, 1, tzinfo=dt.UTC)


def next_month(start: dt.datetime) -> dt.datetime:
    return month_start(start.year + start.month // 12, start.month % 12 + 1)


def cost_job(*, org_id: str | None, month: str | None, requested_by: str, key: str | None, now: dt.datetime) -> NewJob:
    """A COST job for ``month`` (``YYYY-MM``; None: the current month to date). A past month covers the whole
    month; the current one is cut at ``now`` truncated to the second (see the module's docstring)."""
    current = month_start(now.astimezone(dt.UTC).year, now.astimezone(dt.UTC).month)
    if month is None:
        start = current
    else:
        match = _MONTH.fullmatch(month)
        if match is None:
            raise BadUserInput(f"month {month[:20]!r} is not YYYY-MM")
        if int(match[1]) < EARLIEST.year:  # (checked before building a date: year 0 has none)
            raise BadUserInput(f"month {month!r} is before {EARLIEST:%Y-%m}")
        start = month_start(int(match[1]), int(match[2]))
        if start > current:
            raise BadUserInput(f"month {month!r} has not started yet (now {now.astimezone(dt.UTC):%Y-%m-%d} UTC)")
    to_date = start == current
    end = now.astimezone(dt.UTC).replace(microsecond=0) if to_date else next_month(start)
    if end <= start:
        raise BadUserInput("the month to date is empty during its first second; ask again, or for the last month")
    return NewJob(
        org_id=_text("orgId", org_id) if org_id is not None else None,
        kind=COST,
        requested_by=requested_by,
        idempotency_key=idempotency_key(key),
        params={"month": f"{start:%Y-%m}", "month_to_date": to_date},
        range_from=start,
        range_to=end,
    )


def incident_job(
    *,
    org_id: str,
    start: dt.datetime,
    end: dt.datetime,
    models: Sequence[str] | None = None,
    project_ids: Sequence[str] | None = None,
    api_key_ids: Sequence[str] | None = None,
    errors_only: bool = False,
    requested_by: str,
    key: str | None,
) -> NewJob:
    """An INCIDENT job: the events of one org in [start, end), filtered (None: no filter on that field)."""
    start, end = _instant("range.from", start), _instant("range.to", end)
    if start >= end:
        raise BadUserInput("range.from must be before range.to")
    params = {
        "from": start.isoformat(), "to": end.isoformat(), "models": _values("filter.models", models),
        "project_ids": _values("filter.projectIds", project_ids),
        "api_key_ids": _values("filter.apiKeyIds", api_key_ids), "errors_only": bool(errors_only),
    }  # fmt: skip
    return NewJob(
        org_id=_text("orgId", org_id),
        kind=INCIDENT,
        requested_by=requested_by,
        idempotency_key=idempotency_key(key),
        params=params,
        range_from=start,
        range_to=end,
    )


async def create_job(connection: AsyncConnection, job: NewJob) -> tuple[ExportJobRow, bool]:
    """The job (QUEUED) and whether it was created now; the earlier job of the same key and input, and False.
    Raises :class:`IdempotencyConflict` when the key was used for another input."""
    row, created = await queries.insert_job(connection, job)
    if not created and row.params != job.params:
        raise IdempotencyConflict(
            f"idempotency key {job.idempotency_key!r} was already used for export job {row.id} with another "
            f"input ({_describe(row.kind, row.params)}); use a new key for this request"
        )
    return row, created


def _describe(kind: str, params: dict[str, Any] | None) -> str:
    params = params or {}
    if kind == COST:
        return f"month {params.get('month')}" + (" to date" if params.get("month_to_date") else "")
    return f"range {params.get('from')} to {params.get('to')}" + (", errors only" if params.get("errors_only") else "")


def incident_selection(row: ExportJobRow | NewJob) -> IncidentSelection:
    """The events an INCIDENT job (or a job about to be created) exports, from its canonical input."""
    if row.kind != INCIDENT or row.org_id is None:
        raise ValueError(f"{row} is not an INCIDENT export")
    params = row.params or {}
    return IncidentSelection(
        org_id=row.org_id, start=row.range_from, end=row.range_to, models=params.get("models"),
        project_ids=params.get("project_ids"), api_key_ids=params.get("api_key_ids"),
        errors_only=bool(params.get("errors_only")),
    )  # fmt: skip


async def ensure_incident_within(connection: AsyncConnection, selection: IncidentSelection, cap: int) -> int:
    """The row count of the selection; :class:`IncidentTooLarge` naming the cap and the count above it."""
    count = await queries.count_incident_rows(connection, selection)
    if count > cap:
        raise IncidentTooLarge(
            f"the incident export would hold {count:,} rows, more than the limit of {cap:,}; "
            "narrow the range or the filter, or ask for errors only"
        )
    return count


async def cancel_job(
    connection: AsyncConnection, job_id: uuid.UUID, may_see: Callable[[str | None], bool]
) -> ExportJobRow:
    """Cancel a QUEUED or RUNNING job (its worker learns it at its next lease renewal). Idempotent: a CANCELLED
    job is returned unchanged. A job that ended otherwise is refused (:class:`NotCancellable`); a missing one
    is :class:`ExportJobNotFound`; one of an org the caller may not see (``may_see(org_id)`` false; None: an
    all-org job) is FORBIDDEN, as reading it is."""
    row = await queries.lock_job(connection, job_id)
    if row is None:
        raise ExportJobNotFound(f"export job {job_id} does not exist")
    if not may_see(row.org_id):
        raise Forbidden(f"caller may not see export job {job_id}")
    if row.status == queries.CANCELLED:
        return row
    if row.status in queries.FINAL_STATUSES:
        raise NotCancellable(
            f"export job {job_id} has already ended ({row.status}); only QUEUED or RUNNING jobs can be cancelled"
        )
    cancelled = await queries.cancel_job(connection, job_id)
    assert cancelled is not None  # the row is locked and QUEUED or RUNNING
    return cancelled


@dataclass(frozen=True)
class Totals:
    """The column sums of an export's file; ``spend`` None when the export has no spend column.
    ``unpriced_models``: models with rows in hours that had no price (their spend counts as 0, as in
    ``usage``'s ``unpricedModels``)."""

    requests: int
    input_tokens: int
    cached_input_tokens: int
    output_tokens: int
    spend: decimal.Decimal | None
    unpriced_models: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """As stored in ``totals``: counts as JSON integers (jsonb numbers are exact), spend as a decimal
        string with no exponent, exactly as summed."""
        spend = None if self.spend is None else format(self.spend, "f")
        return {"requests": self.requests, "input_tokens": self.input_tokens,
                "cached_input_tokens": self.cached_input_tokens, "output_tokens": self.output_tokens,
                "spend": spend, "unpriced_models": list(self.unpriced_models)}  # fmt: skip

    @classmethod
    def from_json(cls, totals: dict[str, Any]) -> Totals:
        spend = totals.get("spend")
        return cls(int(totals["requests"]), int(totals["input_tokens"]), int(totals["cached_input_tokens"]),
                   int(totals["output_tokens"]), decimal.Decimal(spend) if spend is not None else None,
                   tuple(totals.get("unpriced_models") or ()))  # fmt: skip


@dataclass(frozen=True)
class RetryPolicy:
    """Attempts with exponential backoff: after failed attempt n, wait ``base * 2**(n-1)`` (at most ``cap``),
    less up to ``jitter`` of it at random so that jobs failing together do not retry together; after
    ``max_attempts`` attempts the job is FAILED."""

    max_attempts: int = 5
    base: dt.timedelta = dt.timedelta(seconds=10)
    cap: dt.timedelta = dt.timedelta(minutes=10)
    jitter: float = 0.2

    def __post_init__(self) -> None:
        if self.max_attempts < 1 or self.base < dt.timedelta(0) or self.cap < self.base or not 0 <= self.jitter < 1:
            raise ValueError(f"invalid retry policy {self}")

    def retry_after(self, attempt: int, rand: Callable[[], float] = random.random) -> dt.timedelta | None:
        """How long to wait after failed attempt ``attempt`` (1-based); None: no attempts left."""
        if attempt >= self.max_attempts:
            return None
        delay = min(self.cap, self.base * (1 << min(max(attempt - 1, 0), 32)))
        return delay * (1 - self.jitter * rand())


async def claim(
    connection: AsyncConnection, owner: str, lease: dt.timedelta, policy: RetryPolicy
) -> tuple[ExportJobRow | None, list[ExportJobRow]]:
    """The job this worker claimed (None: nothing runnable), and the jobs FAILED on the way because their
    last attempt's worker stopped (announce both after the commit)."""
    abandoned = await queries.fail_abandoned(connection, policy.max_attempts)
    claimed = await queries.claim_job(connection, owner, lease, policy.max_attempts)
    return claimed, abandoned


def lease_of(row: ExportJobRow) -> Lease:
    """The lease a claimed job's row holds."""
    if row.status != queries.RUNNING or row.lease_owner is None:
        raise ValueError(f"export job {row.id} is not leased")
    return Lease(row.id, row.lease_owner, row.attempts)


async def fail_attempt(
    connection: AsyncConnection, lease: Lease, error: str, policy: RetryPolicy, *, retryable: bool = True
) -> ExportJobRow | None:
    """End the attempt with a human-readable ``error``: QUEUED again after the policy's backoff, or FAILED
    when no attempts are left or the error is not ``retryable``. None when the lease was lost."""
    retry_after = policy.retry_after(lease.attempt) if retryable else None
    message = f"attempt {lease.attempt} of {policy.max_attempts}: {error}"
    return await queries.fail_attempt(connection, lease, message[:2000], retry_after)
