"""Export job types."""

from __future__ import annotations

import datetime as dt
import decimal

import strawberry

from kernel.scopes import Scope
from schema.enums import ExportKind, ExportStatus
from schema.permissions import requires
from schema.scalars import BigInt


@strawberry.type
class ExportTotals:
    requests: BigInt
    input_tokens: BigInt
    cached_input_tokens: BigInt
    output_tokens: BigInt
    spend: decimal.Decimal | None = strawberry.field(extensions=requires(Scope.SPEND_READ))


@strawberry.type
class ExportJob:
    id: strawberry.ID
    kind: ExportKind
    org_id: strawberry.ID | None = strawberry.field(description="null for an all-org cost export.")
    status: ExportStatus
    requested_by: str
    created_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    from_: dt.datetime = strawberry.field(name="from", description="The window the export covers, [from, to).")
    to: dt.datetime
    row_count: BigInt | None
    totals: ExportTotals | None
    checksum_sha256: str | None
    expires_at: dt.datetime | None
    error: str | None
    attempts: int
