"""The contract's input types."""

from __future__ import annotations

import datetime as dt
import decimal

import strawberry


@strawberry.input
class TimeRange:
    """A half-open range [from, to)."""

    from_: dt.datetime = strawberry.field(name="from")
    to: dt.datetime


@strawberry.input
class UsageFilter:
    models: list[str] | None = None
    project_ids: list[str] | None = None
    api_key_ids: list[str] | None = None


@strawberry.input
class CostExportInput:
    org_id: strawberry.ID | None = strawberry.field(
        default=None, description="null: every org (platform finance only)."
    )
    month: str | None = strawberry.field(
        default=None,
        description="YYYY-MM. Omitted: the current month, month to date. Buckets are UTC days.",
    )
    idempotency_key: str | None = strawberry.field(
        default=None,
        description="Same key and same input: the same job is returned, no second job is created.",
    )


@strawberry.input
class IncidentExportInput:
    org_id: strawberry.ID
    range: TimeRange
    filter: UsageFilter | None = None
    errors_only: bool | None = strawberry.field(default=False, description="Only events with status_code >= 400.")
    idempotency_key: str | None = None


@strawberry.input
class ModelPriceInput:
    model: str
    effective_from: dt.datetime = strawberry.field(description="Must fall on a whole UTC hour.")
    input_per_million: decimal.Decimal = strawberry.field(description="USD per 1,000,000 tokens.")
    output_per_million: decimal.Decimal
    cached_input_per_million: decimal.Decimal | None = strawberry.field(
        default=None, description="Defaults to inputPerMillion when omitted."
    )


ALL_INPUTS = (TimeRange, UsageFilter, CostExportInput, IncidentExportInput, ModelPriceInput)
