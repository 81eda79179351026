"""From usage rows to the API's report: buckets, groups, totals and unpriced models.

The query returns rows ordered by bucket and group (db/usage.py), so buckets
are built in one pass: consecutive rows of the same bucket and group (several
models when not grouping by model) are added together.

The series is a list of :class:`SeriesItem` tuples, built from the driver's records with
one tuple per bucket: the API reads a bucket by attribute (``start``, ``requests``, ...), which
a named tuple answers as the ``UsageBucket`` type declares it (the fast execution path projects it
field by field, the ordinary executor reads the same attributes).
"""

from __future__ import annotations

import datetime as dt
import decimal
import zoneinfo
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Any, NamedTuple

import asyncpg

from db.prices import EXACT
from db.usage import UsageQuery, UsageRow, bucket_end
from schema.scalars import BigInt
from schema.usage import UsageGroup, UsageTotals

FIXED_WIDTH = {"MINUTE": dt.timedelta(minutes=1), "HOUR": dt.timedelta(hours=1)}
# A row of db.usage's statement: an asyncpg record or a UsageRow, read by position (UsageRow's columns).
Row = UsageRow | asyncpg.Record
_MODEL, _REQUESTS, _INPUT, _CACHED, _OUTPUT, _SPEND, _UNPRICED = (
    UsageRow._fields.index(name)
    for name in ("model", "requests", "input_tokens", "cached_input_tokens", "output_tokens", "spend", "unpriced")
)


class SeriesItem(NamedTuple):
    """One bucket of the series, with the attributes of ``schema.usage.UsageBucket``."""

    start: dt.datetime
    end: dt.datetime
    group: UsageGroup
    requests: int
    input_tokens: int
    cached_input_tokens: int
    output_tokens: int
    total_tokens: int
    spend: decimal.Decimal | None


@dataclass(frozen=True)
class Report:
    totals: UsageTotals
    series: list[SeriesItem]
    unpriced_models: list[str]


def build_report(query: UsageQuery, rows: Sequence[Row]) -> Report:
    assert query.granularity is not None
    granularity = query.granularity
    by_model = "model" in query.group_by
    width, zone = FIXED_WIDTH.get(granularity), zoneinfo.ZoneInfo(query.time_zone)
    series: list[SeriesItem] = []
    append, new = series.append, tuple.__new__
    groups: dict[tuple[str | None, str | None, str | None], UsageGroup] = {}  # one object per distinct group
    ends: dict[dt.datetime, dt.datetime] = {}
    with decimal.localcontext(EXACT):
        # Grouped by model, the SQL already gives one row per bucket; otherwise the models of a bucket and
        # group arrive as consecutive rows, added together first.
        for _, start, model, project_id, api_key_id, requests, inputs, cached, outputs, spend, _ in (
            rows if by_model else _merged(rows)
        ):
            if width:
                end = start + width
            else:  # DAY and MONTH: computed once per bucket start, not once per group
                end = ends.get(start) or ends.setdefault(start, bucket_end(start, granularity, zone))
            group = groups.get((model, project_id, api_key_id))
            if group is None:
                group = groups[model, project_id, api_key_id] = UsageGroup(
                    model=model, project_id=project_id, api_key_id=api_key_id
                )
            # tuple.__new__ rather than SeriesItem(...): a named tuple's __new__ is a Python function
            append(new(SeriesItem, (start, end, group, requests, inputs, cached, outputs, inputs + outputs, spend)))
        totals = _totals(rows, query.spend)
    return Report(totals, series, sorted({str(row[_MODEL]) for row in rows if row[_UNPRICED]}))


def _merged(rows: Iterable[Row]) -> Iterator[tuple[Any, ...]]:
    """Consecutive rows of one bucket, project and API key (several models) as one row with no model."""
    current: list[Any] | None = None
    for org_id, start, _, project_id, api_key_id, requests, inputs, cached, outputs, spend, unpriced in rows:
        if current is not None and current[1] == start and current[3] == project_id and current[4] == api_key_id:
            current[5] += requests
            current[6] += inputs
            current[7] += cached
            current[8] += outputs
            current[9] = None if spend is None else current[9] + spend
            continue
        if current is not None:
            yield tuple(current)
        current = [org_id, start, None, project_id, api_key_id, requests, inputs, cached, outputs, spend, unpriced]
    if current is not None:
        yield tuple(current)


def _totals(rows: Sequence[Row], priced: bool) -> UsageTotals:
    """Sums over the rows (the buckets' sums, without walking the buckets in Python: ``map`` runs in C)."""
    inputs = sum(map(_column[_INPUT], rows))
    outputs = sum(map(_column[_OUTPUT], rows))
    return UsageTotals(
        requests=BigInt(sum(map(_column[_REQUESTS], rows))),
        input_tokens=BigInt(inputs),
        cached_input_tokens=BigInt(sum(map(_column[_CACHED], rows))),
        output_tokens=BigInt(outputs),
        total_tokens=BigInt(inputs + outputs),
        spend=sum(map(_column[_SPEND], rows), decimal.Decimal(0)) if priced else None,
    )


_column = [itemgetter(index) for index in range(len(UsageRow._fields))]
