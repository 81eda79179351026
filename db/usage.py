"""Usage aggregates: rollups where they are complete, raw events everywhere else.

For a range [start, end) the whole UTC hours in [rollup_from, rollup_to) come
from ``usage_hourly`` (rollup_to never passes the materialized watermark M);
the edges, everything from M on, dirty hours (late events not yet re-rolled)
and hours that a bucket boundary cuts (zones with :30 or :45 offsets) come
from ``usage_events``. Every row is tagged with the price period in effect
for it, so spend can be computed exactly by the caller. One SQL statement
sees one snapshot, so rollups and raw events never double count.
"""

from __future__ import annotations

import datetime as dt
import zoneinfo
from collections.abc import Sequence
from dataclasses import dataclass, field

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from db.prices import PricePeriod

HOUR = dt.timedelta(hours=1)
BUCKET_SQL = {
    "MINUTE": "date_trunc('minute', t, 'UTC')",
    "HOUR": "date_trunc('hour', t, 'UTC')",
    "DAY": "date_trunc('day', t, CAST(:tz AS text))",
    "MONTH": "date_trunc('month', t, CAST(:tz AS text))",
}
DIMENSIONS = ("model", "project_id", "api_key_id")


@dataclass(frozen=True)
class UsageQuery:
    """What to aggregate. ``org_id`` None: every org, grouped by org (spend ranking)."""

    org_id: str | None
    start: dt.datetime
    end: dt.datetime
    granularity: str | None = "DAY"
    time_zone: str = "UTC"
    group_by: frozenset[str] = frozenset()
    models: Sequence[str] | None = None
    project_ids: Sequence[str] | None = None
    api_key_ids: Sequence[str] | None = None


@dataclass(frozen=True)
class UsageRow:
    org_id: str
    bucket: dt.datetime | None
    model: str
    project_id: str | None
    api_key_id: str | None
    price_from: dt.datetime | None
    requests: int
    input_tokens: int
    cached_input_tokens: int
    output_tokens: int


@dataclass(frozen=True)
class Plan:
    """Which hours come from rollups; computed from the range and M."""

    rollup_from: dt.datetime
    rollup_to: dt.datetime
    split_hours: list[dt.datetime] = field(default_factory=list)


def plan(query: UsageQuery, materialized_through: dt.datetime | None) -> Plan:
    rollup_from = min(_ceil_hour(query.start), query.end)
    limit = _floor_hour(query.end)
    if materialized_through is not None:
        limit = min(limit, materialized_through)
    if query.granularity == "MINUTE" or materialized_through is None:
        limit = rollup_from
    rollup_to = max(rollup_from, limit)
    return Plan(rollup_from, rollup_to, _split_hours(query, rollup_from, rollup_to))


def _split_hours(query: UsageQuery, start: dt.datetime, end: dt.datetime) -> list[dt.datetime]:
    """Hours in [start, end) that a DAY or MONTH boundary in the zone cuts."""
    if query.granularity not in ("DAY", "MONTH") or start >= end:
        return []
    zone = zoneinfo.ZoneInfo(query.time_zone)
    split: list[dt.datetime] = []
    boundary = bucket_start(start, query.granularity, zone)
    while boundary < end:
        boundary = bucket_end(boundary, query.granularity, zone)
        if start < boundary < end and boundary != _floor_hour(boundary):
            split.append(_floor_hour(boundary))
    return split


def bucket_start(moment: dt.datetime, granularity: str, zone: zoneinfo.ZoneInfo) -> dt.datetime:
    local = moment.astimezone(zone)
    if granularity == "MONTH":
        local = local.replace(day=1)
    if granularity in ("DAY", "MONTH"):
        local = dt.datetime(local.year, local.month, local.day, tzinfo=zone)
    elif granularity == "HOUR":
        local = local.astimezone(dt.UTC).replace(minute=0, second=0, microsecond=0)
    else:
        local = local.astimezone(dt.UTC).replace(second=0, microsecond=0)
    return local.astimezone(dt.UTC)


def bucket_end(start: dt.datetime, granularity: str, zone: zoneinfo.ZoneInfo) -> dt.datetime:
    """The next boundary after bucket ``start`` (local midnight for DAY and MONTH: 23 or 25 hours on DST days)."""
    if granularity == "MINUTE":
        return start + dt.timedelta(minutes=1)
    if granularity == "HOUR":
        return start + HOUR
    local = start.astimezone(zone)
    if granularity == "DAY":
        following = local.date() + dt.timedelta(days=1)
    else:
        following = (local.date().replace(day=28) + dt.timedelta(days=4)).replace(day=1)
    return dt.datetime(following.year, following.month, following.day, tzinfo=zone).astimezone(dt.UTC)


def _floor_hour(moment: dt.datetime) -> dt.datetime:
    return moment.astimezone(dt.UTC).replace(minute=0, second=0, microsecond=0)


def _ceil_hour(moment: dt.datetime) -> dt.datetime:
    floor = _floor_hour(moment)
    return floor if floor == moment else floor + HOUR


def _filters(alias: str, query: UsageQuery) -> str:
    clauses = []
    for column, values in (("model", query.models), ("project_id", query.project_ids),
                           ("api_key_id", query.api_key_ids)):  # fmt: skip
        if values is not None:
            clauses.append(f"AND {alias}.{column} = ANY(CAST(:{column}s AS text[]))")
    if query.org_id is not None:
        clauses.append(f"AND {alias}.org_id = :org_id")
    return " ".join(clauses)


_ROWS = """
WITH raw_hours AS (
    SELECT org_id, hour FROM rollup_dirty d
    WHERE d.hour >= :rollup_from AND d.hour < :rollup_to {org_filter_d}
    UNION
    SELECT CAST(:org_id AS text), unnest(CAST(:split_hours AS timestamptz[]))
), prices AS (
    SELECT * FROM unnest(CAST(:price_models AS text[]), CAST(:price_froms AS timestamptz[]),
                         CAST(:price_untils AS timestamptz[])) AS p(model, price_from, price_until)
), rows AS (
    SELECT h.org_id, h.hour AS t, h.model, h.project_id, h.api_key_id, h.requests, h.input_tokens,
           h.cached_input_tokens, h.output_tokens
    FROM usage_hourly h
    WHERE h.hour >= :rollup_from AND h.hour < :rollup_to {filters_h}
      AND NOT EXISTS (SELECT 1 FROM raw_hours r WHERE r.org_id = h.org_id AND r.hour = h.hour)
    UNION ALL
    SELECT e.org_id, e.event_time, e.model, e.project_id, e.api_key_id, 1, e.input_tokens,
           e.cached_input_tokens, e.output_tokens
    FROM usage_events e
    WHERE ((e.event_time >= :start AND e.event_time < :rollup_from)
           OR (e.event_time >= :rollup_to AND e.event_time < :end)) {filters_e}
    UNION ALL
    SELECT e.org_id, e.event_time, e.model, e.project_id, e.api_key_id, 1, e.input_tokens,
           e.cached_input_tokens, e.output_tokens
    FROM raw_hours r
    JOIN usage_events e ON e.org_id = r.org_id AND e.event_time >= r.hour AND e.event_time < r.hour + interval '1 hour'
    WHERE true {filters_e}
)
SELECT rows.org_id, {bucket} AS bucket, rows.model, {project} AS project_id, {api_key} AS api_key_id,
       p.price_from, sum(requests) AS requests, sum(input_tokens) AS input_tokens,
       sum(cached_input_tokens) AS cached_input_tokens, sum(output_tokens) AS output_tokens
FROM rows
LEFT JOIN prices p ON p.model = rows.model AND rows.t >= p.price_from
                  AND (p.price_until IS NULL OR rows.t < p.price_until)
GROUP BY 1, 2, 3, 4, 5, 6
"""


async def usage_rows(
    connection: AsyncConnection,
    query: UsageQuery,
    materialized_through: dt.datetime | None,
    prices: Sequence[PricePeriod],
) -> list[UsageRow]:
    """Token sums by org, bucket, model (and the grouped dimensions), and price period."""
    steps = plan(query, materialized_through)
    sql = _ROWS.format(
        org_filter_d="AND d.org_id = :org_id" if query.org_id is not None else "",
        filters_h=_filters("h", query),
        filters_e=_filters("e", query),
        bucket=BUCKET_SQL[query.granularity] if query.granularity else "CAST(NULL AS timestamptz)",
        project="rows.project_id" if "project_id" in query.group_by else "CAST(NULL AS text)",
        api_key="rows.api_key_id" if "api_key_id" in query.group_by else "CAST(NULL AS text)",
    )
    params = {
        "org_id": query.org_id,
        "start": query.start,
        "end": query.end,
        "rollup_from": steps.rollup_from,
        "rollup_to": steps.rollup_to,
        "split_hours": steps.split_hours if query.org_id is not None else [],
        "tz": query.time_zone,
        "models": list(query.models or []),
        "project_ids": list(query.project_ids or []),
        "api_key_ids": list(query.api_key_ids or []),
        "price_models": [p.price.model for p in prices],
        "price_froms": [p.price.effective_from for p in prices],
        "price_untils": [p.until for p in prices],
    }
    result = await connection.execute(text(sql), params)
    return [UsageRow(*row) for row in result]
