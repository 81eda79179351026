"""``Query.usage``: usage and spend of one org, bucketed and grouped."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from typing import Annotated, Any, cast

import strawberry
from strawberry.types.nodes import SelectedField, Selection

from db.usage import UsageQuery, usage_records
from resolvers.freshness import to_freshness
from resolvers.usage_report import build_report
from resolvers.validation import check_ids, check_range, check_time_zone, org_argument
from schema.context import Context
from schema.cost import MAX_RANGE
from schema.enums import Granularity, UsageDimension
from schema.inputs import TimeRange, UsageFilter
from schema.usage import UsageBucket, UsageReport

DIMENSION_COLUMNS = {UsageDimension.MODEL: "model", UsageDimension.PROJECT: "project_id",
                     UsageDimension.API_KEY: "api_key_id"}  # fmt: skip


# Fields of UsageReport and its children whose values need prices (anywhere under ``usage``).
PRICED_FIELDS = frozenset({"spend", "unpricedModels"})


def selects_spend(selections: Iterable[Selection]) -> bool:
    """Whether any field under ``selections`` (through fragments, whatever its alias, @skip or @include:
    in doubt, prices are read) needs prices."""
    return any(
        (isinstance(selection, SelectedField) and selection.name in PRICED_FIELDS)
        or selects_spend(selection.selections)
        for selection in selections
    )


def usage_query(
    org_id: str, range: TimeRange, granularity: Granularity, filter: UsageFilter | None,
    group_by: list[UsageDimension], time_zone: str, *, spend: bool = True,
) -> UsageQuery:  # fmt: skip
    check_range(range.from_, range.to, MAX_RANGE[granularity.value], f"granularity {granularity.value}")
    check_time_zone(time_zone)
    return UsageQuery(
        org_id=org_id,
        start=range.from_,
        end=range.to,
        granularity=granularity.value,
        time_zone=time_zone,
        group_by=frozenset(DIMENSION_COLUMNS[d] for d in group_by),
        models=check_ids(filter.models, "filter.models", model=True) if filter else None,
        project_ids=check_ids(filter.project_ids, "filter.projectIds") if filter else None,
        api_key_ids=check_ids(filter.api_key_ids, "filter.apiKeyIds") if filter else None,
        spend=spend,
    )


async def resolve_usage(
    info: strawberry.Info[Context, Any],
    org_id: strawberry.ID,
    range: TimeRange,
    granularity: Granularity = Granularity.DAY,
    filter: UsageFilter | None = None,
    group_by: list[UsageDimension] = (),  # type: ignore[assignment]  # immutable default, shown as []
    time_zone: Annotated[
        str,
        strawberry.argument(
            description="IANA zone for DAY and MONTH bucket boundaries, e.g. Europe/Berlin, Asia/Kolkata."
        ),
    ] = "UTC",
) -> UsageReport:
    context = info.context
    org_argument(context.require_caller(), org_id)
    spend = selects_spend(info.selected_fields)
    query = usage_query(org_id, range, granularity, filter, list(group_by), time_zone, spend=spend)
    freshness = await context.loaders.freshness.load(org_id)  # also says where the rollups end
    async with context.resources.query_engine.connect() as connection:
        rows = await usage_records(connection, query, freshness.materialized_through)
    report = build_report(query, rows)
    return UsageReport(
        org_id=org_id,
        from_=range.from_,
        to=range.to,
        granularity=granularity,
        time_zone=time_zone,
        currency="USD",
        totals=report.totals,
        series=cast(list[UsageBucket], report.series),  # SeriesItem: UsageBucket's attributes, as a tuple
        unpriced_models=report.unpriced_models,
        freshness=to_freshness(freshness, context.resources.settings, dt.datetime.now(dt.UTC)),
    )
