"""``Query.usage``: usage and spend of one org, bucketed and grouped.

Two ways to the same answer. When the series' selection is plain data (every field a bucket column, a group
column, ``__typename``, or a field the caller may not see) and its buckets have fixed-step ends, PostgreSQL
writes the series as JSON (db/usage_json.py) and the executor splices it in (``RenderedList``); otherwise the
rows come back and Python builds the report (resolvers/usage_report.py). Tests prove both give the same
response.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from typing import Annotated, Any, cast

import orjson
import strawberry
from strawberry.types.nodes import SelectedField, Selection

from db.usage import UsageQuery, usage_records
from db.usage_json import Column, Constant, SeriesSpec, renders, usage_json
from resolvers.freshness import to_freshness
from resolvers.usage_report import build_report
from resolvers.validation import check_ids, check_range, check_time_zone, org_argument
from schema.context import Context
from schema.cost import MAX_RANGE
from schema.enums import Granularity, UsageDimension
from schema.execution import ObjectPlan, RenderedList, list_plan
from schema.inputs import TimeRange, UsageFilter
from schema.scalars import BigInt
from schema.usage import UsageBucket, UsageReport, UsageTotals

DIMENSION_COLUMNS = {UsageDimension.MODEL: "model", UsageDimension.PROJECT: "project_id",
                     UsageDimension.API_KEY: "api_key_id"}  # fmt: skip


# Fields of UsageReport and its children whose values need prices (anywhere under ``usage``).
PRICED_FIELDS = frozenset({"spend", "unpricedModels"})
# Whether a plain-data series is rendered by PostgreSQL (tests switch it off to compare with the Python path).
SERIES_FROM_SQL = True
# Attributes of UsageBucket and UsageGroup that are columns of db.usage_json (same names).
BUCKET_COLUMNS = frozenset({"start", "end", "requests", "input_tokens", "cached_input_tokens", "output_tokens",
                            "total_tokens", "spend"})  # fmt: skip
GROUP_COLUMNS = frozenset({"model", "project_id", "api_key_id"})


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
    plan = list_plan(info._raw_info, "series") if SERIES_FROM_SQL and renders(query) else None
    spec = series_spec(plan) if plan is not None else None
    freshness = await context.loaders.freshness.load(org_id)  # also says where the rollups end
    async with context.resources.query_engine.connect() as connection:
        if plan is not None and spec is not None:
            rendered = await usage_json(connection, query, freshness.materialized_through, spec)
            totals = UsageTotals(
                requests=BigInt(rendered.requests), input_tokens=BigInt(rendered.input_tokens),
                cached_input_tokens=BigInt(rendered.cached_input_tokens), output_tokens=BigInt(rendered.output_tokens),
                total_tokens=BigInt(rendered.input_tokens + rendered.output_tokens), spend=rendered.spend,
            )  # fmt: skip
            series: Any = RenderedList(rendered.series, plan.signature)
            unpriced = rendered.unpriced_models
        else:
            report = build_report(query, await usage_records(connection, query, freshness.materialized_through))
            totals, unpriced = report.totals, report.unpriced_models
            series = cast(list[UsageBucket], report.series)  # SeriesItem: UsageBucket's attributes, as a tuple
    return UsageReport(
        org_id=org_id,
        from_=range.from_,
        to=range.to,
        granularity=granularity,
        time_zone=time_zone,
        currency="USD",
        totals=totals,
        series=series,
        unpriced_models=unpriced,
        freshness=to_freshness(freshness, context.resources.settings, dt.datetime.now(dt.UTC)),
    )


def series_spec(plan: ObjectPlan) -> SeriesSpec | None:
    """What PostgreSQL writes for a ``[UsageBucket]`` selection, or None when the selection is not plain data
    that it can write exactly (then Python builds the series)."""
    return _spec(plan, "UsageBucket", BUCKET_COLUMNS)


def _spec(plan: ObjectPlan, type_name: str, columns: frozenset[str]) -> SeriesSpec | None:
    if plan.type_name != type_name:
        return None
    entries: list[tuple[str, Column | Constant | SeriesSpec]] = []
    for field in plan.fields:
        value: Column | Constant | SeriesSpec | None
        if field.attribute is None:  # __typename
            value = Constant(orjson.dumps(field.typename).decode())
        elif field.denied:  # null, with the executor's FORBIDDEN error; a non-null one nulls its parent
            value = None if field.non_null else Constant("null")
        elif field.attribute == "group" and field.nested is not None and not field.object_list:
            value = _spec(field.nested, "UsageGroup", GROUP_COLUMNS)
        elif field.attribute in columns and field.nested is None and not field.leaf_list:
            value = Column(field.attribute)
        else:
            value = None
        if value is None:
            return None
        entries.append((field.key, value))
    return SeriesSpec(tuple(entries))
