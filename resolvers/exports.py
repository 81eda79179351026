"""Export jobs on the API: request (COST, INCIDENT), cancel, read, list, and follow (subscription).

The rules live in ``exports/`` (validation, idempotency, cancelling, the cursor); these resolvers check the
caller's org, write the audit row in the same transaction as the action (accepted or refused), and announce
committed status changes so that every replica's subscribers hear them.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

import strawberry
from sqlalchemy.ext.asyncio import AsyncConnection

from db.audit import record
from db.exports import FINAL_STATUSES, ExportJobRow, NewJob, get_export_job
from exports import jobs
from exports.job_events import announce_job, subscribe_job
from exports.job_list import encode_cursor, list_page
from kernel.auth import Caller, ensure_org_access
from kernel.errors import BadUserInput, GatewayError
from resolvers.validation import check_id, org_argument
from schema.context import Context
from schema.enums import ExportKind, ExportStatus
from schema.exports import ExportJob, ExportJobConnection, ExportJobEdge, ExportTotals
from schema.inputs import CostExportInput, IncidentExportInput
from schema.scalars import BigInt
from schema.usage import PageInfo

RECHECK_S = 5.0  # a subscription re-reads its job this often too (pub/sub messages can be lost)


def to_export_job(row: ExportJobRow) -> ExportJob:
    return ExportJob(
        id=strawberry.ID(str(row.id)),
        kind=ExportKind(row.kind),
        org_id=strawberry.ID(row.org_id) if row.org_id is not None else None,
        status=ExportStatus(row.status),
        requested_by=row.requested_by,
        created_at=row.created_at,
        started_at=row.started_at,
        finished_at=row.finished_at,
        from_=row.range_from,
        to=row.range_to,
        row_count=BigInt(row.row_count) if row.row_count is not None else None,
        totals=_totals(row.totals),
        checksum_sha256=row.checksum_sha256,
        expires_at=row.expires_at,
        error=row.error,
        attempts=row.attempts,
        snapshot_at=row.snapshot_at,
        job_id=row.id,
        object_key=row.object_key,
        kind_name=row.kind,
    )


def _totals(stored: dict[str, Any] | None) -> ExportTotals | None:
    if stored is None:
        return None
    totals = jobs.Totals.from_json(stored)
    return ExportTotals(
        requests=BigInt(totals.requests), input_tokens=BigInt(totals.input_tokens),
        cached_input_tokens=BigInt(totals.cached_input_tokens), output_tokens=BigInt(totals.output_tokens),
        spend=totals.spend, unpriced_models=list(totals.unpriced_models),
    )  # fmt: skip


def _parse_job_id(value: str) -> uuid.UUID:
    check_id(value, "id")
    try:
        return uuid.UUID(value)
    except ValueError:
        raise BadUserInput(f"export job id {value[:64]!r} is not a UUID") from None


async def _visible_job(info: strawberry.Info[Context, Any], id: str) -> ExportJobRow | None:
    caller = info.context.require_caller()
    job_id = _parse_job_id(id)
    async with info.context.resources.query_engine.connect() as connection:
        row = await get_export_job(connection, job_id)
    if row is not None:
        ensure_org_access(caller, row.org_id)
    return row


async def resolve_export_job(info: strawberry.Info[Context, Any], id: strawberry.ID) -> ExportJob | None:
    """One export job, if it exists and the caller may see its org."""
    row = await _visible_job(info, id)
    return to_export_job(row) if row is not None else None


async def resolve_export_jobs(
    info: strawberry.Info[Context, Any],
    org_id: strawberry.ID | None = None,
    status: ExportStatus | None = None,
    first: int = 20,
    after: str | None = None,
) -> ExportJobConnection:
    """The caller's jobs newest first (platform roles: every job), optionally of one org and one status."""
    caller = info.context.require_caller()
    if org_id is not None:
        org_argument(caller, org_id)
    visible = None if caller.all_orgs else [caller.org_id] if caller.org_id is not None else []
    async with info.context.resources.query_engine.connect() as connection:
        page = await list_page(
            connection, visible_orgs=visible, org_id=org_id, status=status.value if status else None,
            first=first, after=after,
        )  # fmt: skip
    edges = [ExportJobEdge(cursor=encode_cursor(row), node=to_export_job(row)) for row in page.rows]
    return ExportJobConnection(edges=edges, page_info=PageInfo(has_next_page=page.has_next_page,
                                                               end_cursor=page.end_cursor))  # fmt: skip


async def _request(
    info: strawberry.Info[Context, Any],
    action: str,
    org_id: str | None,
    detail: dict[str, Any],
    create: Callable[[AsyncConnection, Caller], Awaitable[NewJob]],
) -> ExportJob:
    """Create (or find, by idempotency key) a job and audit the request, accepted or refused, in one
    transaction; announce a new job after the commit."""
    caller = info.context.require_caller()
    resources = info.context.resources
    try:
        async with resources.query_engine.begin() as connection:
            new = await create(connection, caller)
            row, created = await jobs.create_job(connection, new)
            await record(connection, actor=caller.subject, action=action, org_id=org_id, target=str(row.id),
                         outcome="created" if created else "existing", detail=detail)  # fmt: skip
    except GatewayError as refused:
        async with resources.query_engine.begin() as connection:
            await record(connection, actor=caller.subject, action=action, org_id=org_id,
                         outcome=f"refused: {refused.message}"[:500], detail=detail)  # fmt: skip
        raise
    if created:
        await announce_job(resources.pubsub, row)
    return to_export_job(row)


async def resolve_request_cost_export(info: strawberry.Info[Context, Any], input: CostExportInput) -> ExportJob:
    """A COST export of one org (or every org: platform roles only) for a month or the month to date."""
    org_id = str(input.org_id) if input.org_id is not None else None
    detail = {"month": input.month, "idempotency_key": input.idempotency_key}

    async def create(connection: AsyncConnection, caller: Caller) -> NewJob:
        if org_id is None:
            ensure_org_access(caller, None)
        else:
            org_argument(caller, org_id)
        return jobs.cost_job(org_id=org_id, month=input.month, requested_by=caller.subject,
                             key=input.idempotency_key, now=dt.datetime.now(dt.UTC))  # fmt: skip

    return await _request(info, "requestCostExport", org_id, detail, create)


async def resolve_request_incident_export(info: strawberry.Info[Context, Any], input: IncidentExportInput) -> ExportJob:
    """An INCIDENT export: one org's events in a window, filtered; refused above the row cap, naming both."""
    org_id = str(input.org_id)
    window = input.range
    detail = {"from": window.from_.isoformat(), "to": window.to.isoformat(), "errors_only": bool(input.errors_only),
              "idempotency_key": input.idempotency_key}  # fmt: skip
    cap = info.context.resources.settings.export_incident_max_rows

    async def create(connection: AsyncConnection, caller: Caller) -> NewJob:
        org_argument(caller, org_id)
        found = input.filter
        new = jobs.incident_job(
            org_id=org_id, start=window.from_, end=window.to, models=found.models if found else None,
            project_ids=found.project_ids if found else None, api_key_ids=found.api_key_ids if found else None,
            errors_only=bool(input.errors_only), requested_by=caller.subject, key=input.idempotency_key,
        )  # fmt: skip
        selection = jobs.incident_selection(new)
        await jobs.ensure_incident_within(connection, selection, cap)
        return new

    return await _request(info, "requestIncidentExport", org_id, detail, create)


async def resolve_cancel_export_job(info: strawberry.Info[Context, Any], id: strawberry.ID) -> ExportJob:
    """Cancel a QUEUED or RUNNING job (a RUNNING one aborts its upload at its next lease renewal); idempotent."""
    caller = info.context.require_caller()
    resources = info.context.resources
    job_id = _parse_job_id(id)
    try:
        async with resources.query_engine.begin() as connection:
            row = await jobs.cancel_job(connection, job_id, caller.can_see_org)
            await record(connection, actor=caller.subject, action="cancelExportJob", org_id=row.org_id,
                         target=str(job_id), outcome="ok")  # fmt: skip
    except GatewayError as refused:
        async with resources.query_engine.begin() as connection:
            await record(connection, actor=caller.subject, action="cancelExportJob", target=str(job_id),
                         outcome=f"refused: {refused.message}"[:500])  # fmt: skip
        raise
    await announce_job(resources.pubsub, row)
    return to_export_job(row)


async def subscribe_export_job(
    info: strawberry.Info[Context, Any], id: strawberry.ID
) -> AsyncGenerator[ExportJob, None]:
    """The job now, then on every status change (from any replica), until a final status has been pushed."""
    caller = info.context.require_caller()
    job_id = _parse_job_id(id)
    resources = info.context.resources
    async with subscribe_job(resources.pubsub, job_id) as messages:  # subscribed before the first read
        next_message = asyncio.ensure_future(anext(messages))
        try:
            last: tuple[str, int] | None = None
            while True:
                async with resources.query_engine.connect() as connection:
                    row = await get_export_job(connection, job_id)
                if row is None:
                    raise jobs.ExportJobNotFound(f"export job {job_id} does not exist")
                ensure_org_access(caller, row.org_id)
                if (row.status, row.attempts) != last:
                    last = (row.status, row.attempts)
                    yield to_export_job(row)
                if row.status in FINAL_STATUSES:
                    return
                done, _ = await asyncio.wait({next_message}, timeout=RECHECK_S)
                if done:
                    next_message.result()
                    next_message = asyncio.ensure_future(anext(messages))
        finally:
            next_message.cancel()
