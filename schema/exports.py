"""Export job types."""

from __future__ import annotations

import datetime as dt
import decimal
import uuid
from typing import Any

import strawberry

from exports.links import issue_download_url
from kernel.errors import Forbidden
from kernel.scopes import Scope
from schema.context import Context
from schema.enums import ExportKind, ExportStatus
from schema.permissions import requires
from schema.scalars import BigInt
from schema.usage import PageInfo


@strawberry.type
class ExportTotals:
    requests: BigInt
    input_tokens: BigInt
    cached_input_tokens: BigInt
    output_tokens: BigInt
    spend: decimal.Decimal | None = strawberry.field(extensions=requires(Scope.SPEND_READ))
    unpriced_models: list[str] = strawberry.field(
        default_factory=list,
        description=(
            "COST exports: models with usage in hours that had no price; their spend counts as 0, as in usage."
        ),
    )


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
    snapshot_at: dt.datetime | None = strawberry.field(
        default=None,
        description=(
            "The instant the file's data was cut at (its database snapshot): events committed later are not in "
            "it, even when their time falls inside [from, to)."
        ),
    )
    job_id: strawberry.Private[uuid.UUID] = uuid.UUID(int=0)
    object_key: strawberry.Private[str | None] = None

    kind_name: strawberry.Private[str] = ""

    @strawberry.field(  # type: ignore[untyped-decorator]
        description="A fresh short-lived signed URL, only while SUCCEEDED; each issue of one is audited."
    )
    async def download_url(self, info: strawberry.Info[Context, Any]) -> str | None:
        caller = info.context.require_caller()
        if self.kind_name == "COST" and not caller.has_scope(Scope.SPEND_READ):
            # The file's spend_usd column is spend: the same scope as spend in the API.
            raise Forbidden("downloading a COST export needs the SPEND_READ scope")
        resources = info.context.resources
        return await issue_download_url(
            resources.query_engine, resources.storage, actor=caller.subject, job_id=self.job_id,
            org_id=self.org_id, status=self.status.value, object_key=self.object_key,
            ttl=dt.timedelta(seconds=resources.settings.export_link_ttl_s),
        )  # fmt: skip


@strawberry.type
class ExportJobEdge:
    cursor: str
    node: ExportJob


@strawberry.type
class ExportJobConnection:
    edges: list[ExportJobEdge]
    page_info: PageInfo
