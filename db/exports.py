"""Queries on ``export_jobs``."""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection


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


_COLUMNS = ", ".join(ExportJobRow.__dataclass_fields__)


async def get_export_job(connection: AsyncConnection, job_id: uuid.UUID) -> ExportJobRow | None:
    result = await connection.execute(text(f"SELECT {_COLUMNS} FROM export_jobs WHERE id = :id"), {"id": job_id})
    row = result.mappings().first()
    return ExportJobRow(**row) if row is not None else None
