"""From usage rows to the API's report: buckets, groups, totals and unpriced models.

The query returns rows ordered by bucket and group (db/usage.py), so buckets
are built in one pass: consecutive rows of the same bucket and group (several
models when not grouping by model) are added together.
"""

from __future__ import annotations

import datetime as dt
import decimal
import zoneinfo
from collections.abc import Sequence
from dataclasses import dataclass
from operator import attrgetter

from db.prices import EXACT
from db.usage import UsageQuery, UsageRow, bucket_end
from schema.scalars import BigInt
from schema.usage import UsageBucket, UsageGroup, UsageTotals

FIXED_WIDTH = {"MINUTE": dt.timedelta(minutes=1), "HOUR": dt.timedelta(hours=1)}


@dataclass(frozen=True)
class Report:
    totals: UsageTotals
    series: list[UsageBucket]
    unpriced_models: list[str]


def build_report(query: UsageQuery, rows: Sequence[UsageRow]) -> Report:
    assert query.granularity is not None
    by_model = "model" in query.group_by
    width, zone = FIXED_WIDTH.get(query.granularity), zoneinfo.ZoneInfo(query.time_zone)
    series: list[UsageBucket] = []
    groups: dict[tuple[str | None, str | None, str | None], UsageGroup] = {}  # one object per distinct group
    ends: dict[dt.datetime, dt.datetime] = {}
    current_key: tuple[object, ...] | None = None
    bucket: UsageBucket | None = None
    with decimal.localcontext(EXACT):
        for row in rows:
            model = row.model if by_model else None
            # Grouped by model, the SQL already gives one row per bucket; otherwise the models of a
            # bucket and group arrive as consecutive rows, added together here.
            if not by_model:
                key = (row.bucket, row.project_id, row.api_key_id)
                if key == current_key and bucket is not None:
                    _add(bucket, row)
                    continue
                current_key = key
            start = row.bucket
            assert start is not None
            if width:
                end = start + width
            else:  # DAY and MONTH: computed once per bucket start, not once per group
                end = ends.get(start) or ends.setdefault(start, bucket_end(start, query.granularity, zone))
            group_key = (model, row.project_id, row.api_key_id)
            group = groups.get(group_key)
            if group is None:
                group = groups[group_key] = UsageGroup(
                    model=model, project_id=row.project_id, api_key_id=row.api_key_id
                )
            bucket = _bucket(start, end, group, row)
            series.append(bucket)
        totals = _totals(rows)
    return Report(totals, series, sorted({row.model for row in rows if row.unpriced}))


def _bucket(start: dt.datetime, end: dt.datetime, group: UsageGroup, row: UsageRow) -> UsageBucket:
    return UsageBucket(
        start=start, end=end, group=group, requests=BigInt(row.requests), input_tokens=BigInt(row.input_tokens),
        cached_input_tokens=BigInt(row.cached_input_tokens), output_tokens=BigInt(row.output_tokens),
        total_tokens=BigInt(row.input_tokens + row.output_tokens), spend=row.spend,
    )  # fmt: skip


def _add(bucket: UsageBucket, row: UsageRow) -> None:
    bucket.requests = BigInt(bucket.requests + row.requests)
    bucket.input_tokens = BigInt(bucket.input_tokens + row.input_tokens)
    bucket.cached_input_tokens = BigInt(bucket.cached_input_tokens + row.cached_input_tokens)
    bucket.output_tokens = BigInt(bucket.output_tokens + row.output_tokens)
    bucket.total_tokens = BigInt(bucket.input_tokens + bucket.output_tokens)
    bucket.spend = (bucket.spend or decimal.Decimal(0)) + row.spend


def _totals(rows: Sequence[UsageRow]) -> UsageTotals:
    """Sums over the rows (the buckets' sums, without walking the buckets in Python: ``map`` runs in C)."""
    inputs = sum(map(_INPUT, rows))
    outputs = sum(map(_OUTPUT, rows))
    return UsageTotals(
        requests=BigInt(sum(map(_REQUESTS, rows))),
        input_tokens=BigInt(inputs),
        cached_input_tokens=BigInt(sum(map(_CACHED, rows))),
        output_tokens=BigInt(outputs),
        total_tokens=BigInt(inputs + outputs),
        spend=sum(map(_SPEND, rows), decimal.Decimal(0)),
    )


_REQUESTS, _INPUT, _CACHED, _OUTPUT, _SPEND = (
    attrgetter(name) for name in ("requests", "input_tokens", "cached_input_tokens", "output_tokens", "spend")
)
