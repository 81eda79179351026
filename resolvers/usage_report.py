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
    unpriced: set[str] = set()
    current_key: tuple[object, ...] | None = None
    bucket: UsageBucket | None = None
    with decimal.localcontext(EXACT):
        for row in rows:
            if row.unpriced:
                unpriced.add(row.model)
            model = row.model if by_model else None
            key = (row.bucket, model, row.project_id, row.api_key_id)
            if key == current_key and bucket is not None:
                _add(bucket, row)
                continue
            current_key, start = key, row.bucket
            assert start is not None
            end = start + width if width else bucket_end(start, query.granularity, zone)
            bucket = _bucket(
                start, end, UsageGroup(model=model, project_id=row.project_id, api_key_id=row.api_key_id), row
            )
            series.append(bucket)
        totals = _totals(series)
    return Report(totals, series, sorted(unpriced))


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


def _totals(series: Sequence[UsageBucket]) -> UsageTotals:
    inputs = sum(b.input_tokens for b in series)
    outputs = sum(b.output_tokens for b in series)
    return UsageTotals(
        requests=BigInt(sum(b.requests for b in series)),
        input_tokens=BigInt(inputs),
        cached_input_tokens=BigInt(sum(b.cached_input_tokens for b in series)),
        output_tokens=BigInt(outputs),
        total_tokens=BigInt(inputs + outputs),
        spend=sum((b.spend or decimal.Decimal(0) for b in series), decimal.Decimal(0)),
    )
