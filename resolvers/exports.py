"""Export job resolvers: thin maps from ``db.exports`` rows to API types."""

from __future__ import annotations

import decimal
import uuid
from typing import Any

import strawberry

from db.exports import ExportJobRow, get_export_job
from kernel.auth import ensure_org_access
from kernel.errors import BadUserInput
from schema.context import Context
from schema.enums import ExportKind, ExportStatus
from schema.exports import ExportJob, ExportTotals
from schema.scalars import BigInt


async def resolve_export_job(info: strawberry.Info[Context, Any], id: strawberry.ID) -> ExportJob | None:
    """One export job, if it exists and the caller may see its org."""
    caller = info.context.require_caller()
    job_id = _parse_job_id(id)
    async with info.context.resources.query_engine.connect() as connection:
        row = await get_export_job(connection, job_id)
    if row is None:
        return None
    ensure_org_access(caller, row.org_id)
    return to_export_job(row)


def _parse_job_id(value: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise BadUserInput(f"export job id {value!r} is not a UUID") from None


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
    )


def _totals(totals: dict[str, Any] | None) -> ExportTotals | None:
    if totals is None:
        return None
    spend = totals.get("spend")
    return ExportTotals(
        requests=BigInt(int(totals["requests"])),
        input_tokens=BigInt(int(totals["input_tokens"])),
        cached_input_tokens=BigInt(int(totals["cached_input_tokens"])),
        output_tokens=BigInt(int(totals["output_tokens"])),
        spend=decimal.Decimal(spend) if spend is not None else None,
    )
