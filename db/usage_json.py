"""A usage series rendered as JSON by PostgreSQL: the answer's list of buckets as one text, plus the totals.

For the dashboard's main question (30 days of hourly usage by model: thousands of buckets) most of the
gateway's time went to rows: decoding them, a Python object per bucket, a dict per bucket, then JSON. Here
the statement of :mod:`db.usage` is wrapped so that PostgreSQL writes each bucket's JSON object itself, in
the API's order, with the response keys the caller asked for (aliases included); the gateway splices the
text into its response unread. Totals and unpriced models come from the same statement (one snapshot).

What to write is a :class:`SeriesSpec`: a JSON object template of response keys whose values are bucket
columns (:data:`COLUMNS`), constants (``__typename``, a null for a field the caller may not see) or nested
objects (``group``). The template goes in as a parameter of ``format()``, so the statement's text depends
only on which columns are used, never on aliases.

A range of whole rolled-up hours with no cut hour is read from the rollups alone; the same statement says
whether any of its hours is dirty (late events not yet re-rolled), and then the caller asks again with raw
events (:func:`usage_json`), so late events stay exact at once.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import functools
from dataclasses import dataclass

import asyncpg
from sqlalchemy.ext.asyncio import AsyncConnection

from db.usage import Shape, UsageQuery, driver_connection, order_columns, statement_parts, statement_shape

# {v}: a timestamp in UTC, whole seconds (bucket starts and ends), as text in DateStyle ISO (db/engine.py pins
# it): "2026-11-30 15:00:00" becomes "2026-11-30T15:00:00Z", as the API writes DateTime. (Half the cost of
# to_char.)
_ISO = """'"' || replace(({v})::text, ' ', 'T') || 'Z"'"""
# Identifiers go into JSON strings unescaped: ingest admits only [A-Za-z0-9._:/@+-] in them (ingest/events.py
# ID_PATTERN and MODEL_PATTERN), none of which JSON escapes; a test holds the patterns to that.
_IDENTIFIER = """coalesce('"' || {c} || '"', 'null')"""
_END_WIDTH = {"MINUTE": "1 minute", "HOUR": "1 hour", "DAY": "1 day", "MONTH": "1 month"}
# A bucket column's JSON text. DAY and MONTH ends are computed in UTC: specs for other zones are not rendered
# (see :func:`renders`).
COLUMNS = {
    "start": _ISO.format(v="bucket AT TIME ZONE 'UTC'"),
    "end": _ISO.format(v="(bucket AT TIME ZONE 'UTC') + interval '{width}'"),
    "requests": "requests",
    "input_tokens": "input_tokens",
    "cached_input_tokens": "cached_input_tokens",
    "output_tokens": "output_tokens",
    "total_tokens": "(input_tokens::numeric + output_tokens)",  # numeric: the sum may pass a bigint
    "spend": """coalesce('"' || spend || '"', 'null')""",  # exact, already trimmed (no exponent in NUMERIC's text)
    "model": _IDENTIFIER.format(c="model"),
    "project_id": _IDENTIFIER.format(c="project_id"),
    "api_key_id": _IDENTIFIER.format(c="api_key_id"),
}


@dataclass(frozen=True)
class Column:
    name: str  # a key of COLUMNS


@dataclass(frozen=True)
class Constant:
    json: str  # JSON text, e.g. '"UsageBucket"' or 'null'


@dataclass(frozen=True)
class SeriesSpec:
    """One JSON object: ``(response key, value)`` in response order."""

    entries: tuple[tuple[str, Column | Constant | SeriesSpec], ...]

    def columns(self) -> set[str]:
        found: set[str] = set()
        for _, value in self.entries:
            if isinstance(value, Column):
                found.add(value.name)
            elif isinstance(value, SeriesSpec):
                found |= value.columns()
        return found

    def template(self, position: dict[str, int]) -> str:
        """The ``format()`` template: ``{"key":%1$s,...}`` (literal text with ``%`` doubled)."""
        parts = []
        for key, value in self.entries:
            if isinstance(value, Column):
                text = f"%{position[value.name]}$s"
            elif isinstance(value, Constant):
                text = value.json.replace("%", "%%")
            else:
                text = value.template(position)
            parts.append(f'"{key}":'.replace("%", "%%") + text)
        return "{" + ",".join(parts) + "}"


@dataclass(frozen=True)
class UsageJson:
    series: str  # the buckets' objects, comma-separated, without brackets ('' for none)
    requests: int
    input_tokens: int
    cached_input_tokens: int
    output_tokens: int
    spend: decimal.Decimal | None  # None: the question has no spend
    unpriced_models: list[str]


def renders(query: UsageQuery) -> bool:
    """Whether the series of ``query`` can be rendered here: one org, and bucket ends that are a fixed step in
    UTC (DAY and MONTH ends in another zone, with their DST days, are left to Python)."""
    return (
        query.org_id is not None
        and query.granularity is not None
        and (query.granularity in ("MINUTE", "HOUR") or query.time_zone == "UTC")
    )


async def usage_json(
    connection: AsyncConnection, query: UsageQuery, materialized_through: dt.datetime | None, spec: SeriesSpec
) -> UsageJson:
    """The series of ``query`` as JSON in the API's order, with its totals and unpriced models."""
    assert renders(query), "usage_json renders one org's series with fixed-step bucket ends"
    raw = await driver_connection(connection)
    sql, args = usage_json_statement(query, materialized_through, spec)
    record = await raw.fetchrow(sql, *args)
    assert record is not None
    if record["dirty"]:  # an hour of the range has late events not yet re-rolled: ask again with raw events
        sql, args = usage_json_statement(query, materialized_through, spec, rollups_alone=False)
        record = await raw.fetchrow(sql, *args)
        assert record is not None and not record["dirty"]
    return _result(record, query.spend)


def usage_json_statement(
    query: UsageQuery, materialized_through: dt.datetime | None, spec: SeriesSpec, *, rollups_alone: bool = True
) -> tuple[str, tuple[object, ...]]:
    """The statement and its arguments: :func:`db.usage.usage_statement`'s, then the ``format()`` template."""
    shape, args = statement_shape(query, materialized_through)
    if rollups_alone and not shape.edges and not shape.splits:
        shape = dataclasses.replace(shape, raw=False)
    columns = tuple(sorted(spec.columns()))
    position = {name: index for index, name in enumerate(columns, start=1)}
    return _json_sql(shape, columns), (*args, spec.template(position))


_DIRTY = "EXISTS (SELECT 1 FROM rollup_dirty d WHERE d.hour >= $4 AND d.hour < $5 AND d.org_id = $1)"


@functools.lru_cache(maxsize=256)
def _json_sql(shape: Shape, columns: tuple[str, ...]) -> str:
    """The statement: the series from an ordered subquery (PostgreSQL aggregates the rows in the order it reads
    them, and ``string_agg`` is not run in parallel parts here; the tests check the order), the totals and the
    unpriced models of the same rows."""
    head, body = statement_parts(shape)
    values = "".join(", " + COLUMNS[name].format(width=_END_WIDTH[str(shape.granularity)]) for name in columns)
    order = ", ".join(order_columns(shape))
    dirty = "false" if shape.raw else _DIRTY
    spend = "trim_scale(coalesce(sum(spend), 0))" if shape.priced else "NULL::numeric"
    totals = f"""coalesce(sum(requests), 0)::bigint AS requests, coalesce(sum(input_tokens), 0)::bigint AS input_tokens,
       coalesce(sum(cached_input_tokens), 0)::bigint AS cached_input_tokens,
       coalesce(sum(output_tokens), 0)::bigint AS output_tokens, {spend} AS spend,
       array_agg(DISTINCT model COLLATE "C" ORDER BY model COLLATE "C") FILTER (WHERE unpriced) AS unpriced"""
    if "model" in shape.group_by:  # one row per bucket and group already: one pass
        return f"""{head}SELECT {dirty} AS dirty, string_agg(format($11{values}), ',') AS series, {totals}
FROM ({body}ORDER BY {order}) AS b
"""
    # Several rows per bucket and group (one per model): summed into the series, all of them in the totals.
    order = ", ".join(column for column in order_columns(shape) if not column.startswith("model "))
    return f"""{head}, result AS MATERIALIZED (
{body})
SELECT {dirty} AS dirty, (
    SELECT string_agg(format($11{values}), ',') FROM (
        SELECT bucket, NULL::text AS model, project_id, api_key_id, sum(requests)::bigint AS requests,
               sum(input_tokens)::bigint AS input_tokens, sum(cached_input_tokens)::bigint AS cached_input_tokens,
               sum(output_tokens)::bigint AS output_tokens, trim_scale(sum(spend)) AS spend
        FROM result GROUP BY bucket, project_id, api_key_id ORDER BY {order}) AS b
  ) AS series, {totals}
FROM result
"""


def _result(record: asyncpg.Record, priced: bool) -> UsageJson:
    return UsageJson(
        series=record["series"] if record["series"] is not None else "",
        requests=record["requests"] or 0,
        input_tokens=record["input_tokens"] or 0,
        cached_input_tokens=record["cached_input_tokens"] or 0,
        output_tokens=record["output_tokens"] or 0,
        spend=(record["spend"] if record["spend"] is not None else decimal.Decimal(0)) if priced else None,
        unpriced_models=list(record["unpriced"] or []),
    )
