"""Usage aggregates: rollups where they are complete, raw events everywhere else.

For a range [start, end) the whole UTC hours in [rollup_from, rollup_to) come
from ``usage_hourly`` (rollup_to never passes the materialized watermark M);
the edges, everything from M on, dirty hours (late events not yet re-rolled)
and hours that a bucket boundary cuts (zones with :30 or :45 offsets) come
from ``usage_events``. When spend is asked for, every row is joined to the price
version in effect at its time and spend is summed in exact NUMERIC. One SQL
statement sees one snapshot, so rollups and raw events never double count.
The statement's text leaves out what a question does not need (see ``Shape``).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import functools
import zoneinfo
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import asyncpg
from sqlalchemy.ext.asyncio import AsyncConnection

from kernel.hours import HOUR, floor_hour


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
    # False when the answer shows neither spend nor unpriced models: no price is read, every row's spend is
    # None and ``unpriced`` False.
    spend: bool = True


class UsageRow(NamedTuple):
    """One result row (a tuple: built straight from the driver's record)."""

    org_id: str
    bucket: dt.datetime | None
    model: str
    project_id: str | None
    api_key_id: str | None
    requests: int
    input_tokens: int
    cached_input_tokens: int
    output_tokens: int
    spend: decimal.Decimal  # (None in a record of a query without spend: see usage_records)
    unpriced: bool


@dataclass(frozen=True)
class Plan:
    """Which hours come from rollups; computed from the range and M."""

    rollup_from: dt.datetime
    rollup_to: dt.datetime
    split_hours: list[dt.datetime] = field(default_factory=list)


def plan(query: UsageQuery, materialized_through: dt.datetime | None) -> Plan:
    rollup_from = min(_ceil_hour(query.start), query.end)
    limit = floor_hour(query.end)
    if materialized_through is not None:
        limit = min(limit, materialized_through)
    if query.granularity == "MINUTE" or materialized_through is None:
        limit = rollup_from
    rollup_to = max(rollup_from, limit)
    return Plan(rollup_from, rollup_to, _split_hours(query, rollup_from, rollup_to))


def _split_hours(query: UsageQuery, start: dt.datetime, end: dt.datetime) -> list[dt.datetime]:
    """Hours in [start, end) that a DAY or MONTH boundary in the zone cuts."""
    if query.granularity not in ("DAY", "MONTH") or start >= end or query.time_zone == "UTC":
        return []  # (UTC days and months start on whole hours)
    zone = zoneinfo.ZoneInfo(query.time_zone)
    split: list[dt.datetime] = []
    boundary = bucket_start(start, query.granularity, zone)
    while boundary < end:
        boundary = bucket_end(boundary, query.granularity, zone)
        if start < boundary < end and boundary != floor_hour(boundary):
            split.append(floor_hour(boundary))
    return split


def bucket_start(moment: dt.datetime, granularity: str, zone: zoneinfo.ZoneInfo) -> dt.datetime:
    local = moment.astimezone(zone)
    if granularity == "MONTH":
        local = local.replace(day=1)
    if granularity in ("DAY", "MONTH"):
        local = dt.datetime(local.year, local.month, local.day, tzinfo=zone)
    elif granularity == "HOUR":
        local = floor_hour(local)
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


def _ceil_hour(moment: dt.datetime) -> dt.datetime:
    floor = floor_hour(moment)
    return floor if floor == moment else floor + HOUR


@dataclass(frozen=True)
class Shape:
    """What the SQL text depends on (the values go in as parameters): one text per shape, built once.

    Besides the question's shape, three flags leave out what the answer does not need: ``priced`` (spend or
    unpriced models selected: the price versions are read and joined), ``edges`` (the range has parts outside
    the rollups' whole hours: raw events of [start, rollup_from) and [rollup_to, end)) and ``splits`` (hours
    that a bucket boundary cuts, read raw). Dirty hours are always honoured: their rollup rows are replaced by
    their raw events (an index lookup in ``rollup_dirty``, nothing when no hour is dirty).
    """

    by_org: bool
    granularity: str | None
    group_by: frozenset[str]
    by_models: bool
    by_projects: bool
    by_api_keys: bool
    priced: bool = True
    edges: bool = True
    splits: bool = True
    direct: bool = False  # HOUR from the per-model rollup: each rollup row is already one result row
    # False: rollup rows alone, no raw events (for a range of whole rolled-up hours, no cut hour; the caller
    # learns in the same snapshot whether an hour is dirty, and then asks again with raw events)
    raw: bool = True

    @classmethod
    def of(cls, query: UsageQuery, steps: Plan, everything: bool = False) -> Shape:
        shape = cls(
            query.org_id is not None, query.granularity, query.group_by, query.models is not None,
            query.project_ids is not None, query.api_key_ids is not None,
        )  # fmt: skip
        if everything:
            return shape
        return dataclasses.replace(
            shape, priced=query.spend, edges=steps.rollup_from != query.start or steps.rollup_to != query.end,
            splits=bool(steps.split_hours) and query.org_id is not None,
            direct=query.granularity == "HOUR" and shape.by_model_only,
        )  # fmt: skip

    @property
    def by_model_only(self) -> bool:
        """Grouping and filtering by model at most: the per-model rollup, with far fewer rows, answers."""
        return self.group_by <= {"model"} and not self.by_projects and not self.by_api_keys

    def filters(self, alias: str) -> str:
        clauses = [f"AND {alias}.{column} = ANY(${param}::text[])"
                   for column, present, param in (("model", self.by_models, 8), ("project_id", self.by_projects, 9),
                                                  ("api_key_id", self.by_api_keys, 10)) if present]  # fmt: skip
        if self.by_org:
            clauses.append(f"AND {alias}.org_id = $1")
        return " ".join(clauses)


# Parameters: $1 org_id (null: every org), $2 start, $3 end, $4 rollup_from, $5 rollup_to,
# $6 split hours, $7 time zone, $8-$10 filters. Every shape takes all ten (params declares their types).
_HEAD = """
WITH params AS (  -- declares the types of parameters that a given query shape may not use
    SELECT $1::text AS org_id, $2::timestamptz AS range_start, $3::timestamptz AS range_end,
           $6::timestamptz[] AS split_hours, $7::text AS time_zone, $8::text[] AS models,
           $9::text[] AS project_ids, $10::text[] AS api_key_ids
){raw_ctes}{prices}
"""
_RAW_CTES = """, raw_hours AS (  -- rolled-up hours read from raw events instead: dirty ones (late events not re-rolled)
    SELECT org_id, hour FROM rollup_dirty d
    WHERE d.hour >= $4 AND d.hour < $5 {org_filter_d}{split_union}
), raw AS (
    {edges}SELECT e.org_id, e.event_time AS t, e.model, e.project_id, e.api_key_id, 1 AS requests, e.input_tokens,
           e.cached_input_tokens, e.output_tokens
    FROM raw_hours r
    JOIN usage_events e ON e.org_id = r.org_id AND e.event_time >= r.hour AND e.event_time < r.hour + interval '1 hour'
    -- (raw hours lie in [$4, $5): saying so lets the planner leave out the other days' partitions)
    WHERE e.event_time >= $4 AND e.event_time < $5 {filters_e}
)"""
_SPLITS = """
    UNION  -- and the hours that a bucket boundary cuts
    SELECT $1::text, unnest($6::timestamptz[])"""
_PRICES = """, prices AS (  -- each price version until its model's next one, from the statement's snapshot
    SELECT model, effective_from AS price_from,
           lead(effective_from) OVER (PARTITION BY model ORDER BY effective_from) AS price_until,
           input_per_million AS input, cached_input_per_million AS cached, output_per_million AS output
    FROM model_prices
)"""
_EDGES = """SELECT e.org_id, e.event_time AS t, e.model, e.project_id, e.api_key_id, 1 AS requests, e.input_tokens,
           e.cached_input_tokens, e.output_tokens
    FROM usage_events e  -- the range's edges: before rollup_from, from rollup_to on
    WHERE ((e.event_time >= $2 AND e.event_time < $4) OR (e.event_time >= $5 AND e.event_time < $3)) {filters_e}
    UNION ALL
    """
_ROLLUP_WHERE = """WHERE h.hour >= $4 AND h.hour < $5 {filters_h}{not_raw}"""
_NOT_RAW = """
  AND NOT EXISTS (SELECT 1 FROM raw_hours r WHERE r.org_id = h.org_id AND r.hour = h.hour)"""
# Rollup rows and raw events together, summed by bucket and group.
_GROUPED = """SELECT * FROM (
SELECT rows.org_id, {bucket} AS bucket, rows.model, {project} AS project_id, {api_key} AS api_key_id,
       sum(rows.requests)::bigint AS requests, sum(rows.input_tokens)::bigint AS input_tokens,
       sum(rows.cached_input_tokens)::bigint AS cached_input_tokens, sum(rows.output_tokens)::bigint AS output_tokens,
       {spend} AS spend, {unpriced} AS unpriced
FROM (
    SELECT h.org_id, h.hour AS t, h.model, {rollup_dims}, h.requests, h.input_tokens, h.cached_input_tokens,
           h.output_tokens
    FROM {rollup} h
    {rollup_where}{raw_union}
) AS rows{join}
GROUP BY 1, 2, 3, 4, 5
) AS grouped
"""
# HOUR by model (or nothing) from usage_hourly_model: a rollup row is a result row as it is; only raw events
# (other hours than the rollup rows', so never the same bucket) are summed.
_DIRECT = """SELECT * FROM (
SELECT h.org_id, h.hour AS bucket, h.model, NULL::text AS project_id, NULL::text AS api_key_id, h.requests,
       h.input_tokens, h.cached_input_tokens, h.output_tokens, {row_spend} AS spend, {row_unpriced} AS unpriced
FROM usage_hourly_model h{row_join}
{rollup_where}{raw_union}
) AS grouped
"""
_GROUPED_RAW = """
    UNION ALL
    SELECT * FROM raw"""
_DIRECT_RAW = """
UNION ALL
SELECT rows.org_id, date_trunc('hour', rows.t, 'UTC'), rows.model, NULL::text, NULL::text, sum(rows.requests)::bigint,
       sum(rows.input_tokens)::bigint, sum(rows.cached_input_tokens)::bigint, sum(rows.output_tokens)::bigint,
       {spend}, {unpriced}
FROM raw AS rows{join}
GROUP BY 1, 2, 3, 4, 5"""
# Contract spend formula, exact NUMERIC (times 0.000001 rather than / 1e6, which would round).
_COST = (
    "(({a}.input_tokens - {a}.cached_input_tokens) * p.input + {a}.cached_input_tokens * p.cached"
    " + {a}.output_tokens * p.output)"
)
_JOIN = """
LEFT JOIN prices p ON p.model = {a}.model AND {a}.{t} >= p.price_from
                  AND (p.price_until IS NULL OR {a}.{t} < p.price_until)"""
BUCKET_SQL = {
    "MINUTE": "date_trunc('minute', t, 'UTC')",
    "HOUR": "date_trunc('hour', t, 'UTC')",
    "DAY": "date_trunc('day', t, $7::text)",
    "MONTH": "date_trunc('month', t, $7::text)",
}


async def usage_rows(
    connection: AsyncConnection,
    query: UsageQuery,
    materialized_through: dt.datetime | None,
) -> list[UsageRow]:
    """Token sums and exact spend by org, bucket, model and the grouped dimensions."""
    assert query.spend, "usage_rows always has spend; usage_records answers a question without it"
    make = UsageRow._make
    return [make(record) for record in await usage_records(connection, query, materialized_through)]


async def usage_records(
    connection: AsyncConnection,
    query: UsageQuery,
    materialized_through: dt.datetime | None,
) -> list[asyncpg.Record]:
    """:func:`usage_rows` as the driver's records (UsageRow's columns, read by position): no object per row."""
    sql, args = usage_statement(query, materialized_through)
    raw = await driver_connection(connection)
    return await raw.fetch(sql, *args)


def usage_statement(
    query: UsageQuery, materialized_through: dt.datetime | None, *, ordered: bool = True, everything: bool = False
) -> tuple[str, tuple[object, ...]]:
    """The SQL and arguments of :func:`usage_rows` (benchmarks run it bare, as the floor). ``ordered=False``:
    without the API's ORDER BY, for a caller that wraps the statement and sorts it its own way.
    ``everything=True``: with every part whatever the question needs (prices, the range's edges, split hours,
    re-aggregation of rollup rows), the reference that the tests prove the leaner statements equal to."""
    shape, args = statement_shape(query, materialized_through, everything=everything)
    return _sql(shape, ordered), args


def statement_shape(
    query: UsageQuery, materialized_through: dt.datetime | None, *, everything: bool = False
) -> tuple[Shape, tuple[object, ...]]:
    """The shape of the statement for ``query`` (what its text depends on) and its ten arguments."""
    steps = plan(query, materialized_through)
    args = (
        query.org_id, query.start, query.end, steps.rollup_from, steps.rollup_to,
        steps.split_hours if query.org_id is not None else [], query.time_zone,
        list(query.models or []), list(query.project_ids or []), list(query.api_key_ids or []),
    )  # fmt: skip
    return Shape.of(query, steps, everything), args


@functools.lru_cache(maxsize=256)
def _sql(shape: Shape, ordered: bool = True) -> str:
    head, body = statement_parts(shape)
    return head + body + (_order_by(shape) if ordered else "")


def statement_parts(shape: Shape) -> tuple[str, str]:
    """The statement's WITH clause and its body (``SELECT * FROM (...) AS grouped``), without an order."""
    by_model_only, priced = shape.by_model_only, shape.priced
    raw_ctes = _RAW_CTES.format(
        org_filter_d="AND d.org_id = $1" if shape.by_org else "",
        split_union=_SPLITS if shape.splits else "",
        edges=_EDGES.format(filters_e=shape.filters("e")) if shape.edges else "",
        filters_e=shape.filters("e"),
    )
    head = _HEAD.format(raw_ctes=raw_ctes if shape.raw else "", prices=_PRICES if shape.priced else "")
    aggregates = {
        "spend": f"trim_scale(coalesce(sum({_COST.format(a='rows')}), 0) * 0.000001)" if priced else "NULL::numeric",
        "unpriced": "bool_or(p.model IS NULL)" if priced else "false",
        "join": _JOIN.format(a="rows", t="t") if priced else "",
    }
    raw_union = (_DIRECT_RAW.format(**aggregates) if shape.direct else _GROUPED_RAW) if shape.raw else ""
    body = (_DIRECT if shape.direct else _GROUPED).format(
        rollup_where=_ROLLUP_WHERE.format(filters_h=shape.filters("h"), not_raw=_NOT_RAW if shape.raw else ""),
        raw_union=raw_union,
        rollup="usage_hourly_model" if by_model_only else "usage_hourly",
        rollup_dims="NULL::text, NULL::text" if by_model_only else "h.project_id, h.api_key_id",
        bucket=BUCKET_SQL[shape.granularity] if shape.granularity else "NULL::timestamptz",
        project="rows.project_id" if "project_id" in shape.group_by else "NULL::text",
        api_key="rows.api_key_id" if "api_key_id" in shape.group_by else "NULL::text",
        row_spend=f"trim_scale(coalesce({_COST.format(a='h')}, 0) * 0.000001)" if priced else "NULL::numeric",
        row_unpriced="p.model IS NULL" if priced else "false",
        row_join=_JOIN.format(a="h", t="hour") if priced else "",
        **aggregates,
    )
    return head, body


def order_columns(shape: Shape) -> list[str]:
    """The API's order (bucket, then the grouped dimensions, null first, by code point): rows of one bucket and
    group are consecutive, so the report is built in one pass. Constant columns (the org of a one-org
    question, dimensions not grouped: NULL) are left out: they would only cost the sort."""
    order_by = [] if shape.by_org else ['org_id COLLATE "C"']
    order_by.append("bucket")
    order_by += [
        f'{c} COLLATE "C" NULLS FIRST' for c in _group_order(shape.group_by) if c in shape.group_by or c == "model"
    ]
    return order_by


def _order_by(shape: Shape) -> str:
    return "ORDER BY " + ", ".join(order_columns(shape)) + "\n"


def _group_order(group_by: frozenset[str]) -> tuple[str, ...]:
    """Output columns to order by: the grouped dimensions, then the model when it is not one."""
    model, project, api_key = "model", "project_id", "api_key_id"
    return (model, project, api_key) if "model" in group_by else (project, api_key, model)


async def driver_connection(connection: AsyncConnection) -> asyncpg.Connection:
    """The asyncpg connection under a SQLAlchemy one, for hot queries without row processing."""
    raw = (await connection.get_raw_connection()).driver_connection
    assert isinstance(raw, asyncpg.Connection)
    return raw
