"""Types of usage, spend, freshness and prices."""

from __future__ import annotations

import datetime as dt
import decimal

import strawberry

from kernel.scopes import Scope
from schema.enums import FreshnessStatus, Granularity
from schema.permissions import requires
from schema.scalars import BigInt


@strawberry.type
class Freshness:
    org_id: strawberry.ID | None
    last_event_at: dt.datetime | None = strawberry.field(
        description="Event time of the newest event ingested for this org (null: none yet)."
    )
    last_ingested_at: dt.datetime | None = strawberry.field(
        description="When the newest batch for this org was committed."
    )
    materialized_through: dt.datetime | None = strawberry.field(
        description="Rollups are complete up to this instant; later data is served from raw events."
    )
    lag_seconds: float = strawberry.field(
        description="Seconds between now and the instant up to which ingested data is queryable."
    )
    status: FreshnessStatus
    as_of: dt.datetime


@strawberry.type
class UsageGroup:
    model: str | None = None
    project_id: str | None = None
    api_key_id: str | None = None


@strawberry.type
class UsageTotals:
    requests: BigInt
    input_tokens: BigInt
    cached_input_tokens: BigInt
    output_tokens: BigInt
    total_tokens: BigInt
    spend: decimal.Decimal | None = strawberry.field(extensions=requires(Scope.SPEND_READ))


@strawberry.type
class UsageBucket:
    start: dt.datetime
    end: dt.datetime
    group: UsageGroup = strawberry.field(description="Set for the dimensions named in groupBy, null otherwise.")
    requests: BigInt
    input_tokens: BigInt
    cached_input_tokens: BigInt
    output_tokens: BigInt
    total_tokens: BigInt
    spend: decimal.Decimal | None = strawberry.field(extensions=requires(Scope.SPEND_READ))


@strawberry.type
class UsageReport:
    org_id: strawberry.ID
    from_: dt.datetime = strawberry.field(name="from")
    to: dt.datetime
    granularity: Granularity
    time_zone: str
    currency: str
    totals: UsageTotals
    series: list[UsageBucket] = strawberry.field(
        description=(
            "Buckets with no traffic are omitted. Ordered by start, then group. start and end are aligned to "
            "granularity boundaries in timeZone (HOUR and MINUTE in UTC); a bucket cut by the range counts only "
            "events inside the range."
        )
    )
    unpriced_models: list[str] | None = strawberry.field(
        extensions=requires(Scope.SPEND_READ),
        description=(
            "Models seen in the range that have no price in effect; their spend counts as 0 until priced. "
            "Null, with a FORBIDDEN error, without SPEND_READ."
        ),
    )
    freshness: Freshness


@strawberry.type
class OrgSpend:
    org_id: strawberry.ID
    requests: BigInt
    total_tokens: BigInt
    spend: decimal.Decimal


@strawberry.type
class OrgSpendEdge:
    cursor: str
    node: OrgSpend


@strawberry.type
class PageInfo:
    has_next_page: bool
    end_cursor: str | None


@strawberry.type
class OrgSpendConnection:
    edges: list[OrgSpendEdge]
    page_info: PageInfo
    total_spend: decimal.Decimal


@strawberry.type
class ModelPrice:
    model: str
    effective_from: dt.datetime
    input_per_million: decimal.Decimal
    output_per_million: decimal.Decimal
    cached_input_per_million: decimal.Decimal
    currency: str
