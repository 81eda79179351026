"""From usage rows to the API's report: buckets, groups, totals and exact spend."""

from __future__ import annotations

import datetime as dt
import decimal
import zoneinfo
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from db.prices import EXACT
from db.usage import UsageQuery, UsageRow, bucket_end
from schema.scalars import BigInt
from schema.usage import UsageBucket, UsageGroup, UsageTotals

GroupKey = tuple[str | None, str | None, str | None]

ZERO = decimal.Decimal(0)


@dataclass
class Sums:
    requests: int = 0
    input_tokens: int = 0
    cached_input_tokens: int = 0
    output_tokens: int = 0
    spend: decimal.Decimal = ZERO

    def add(self, row: UsageRow) -> None:
        self.requests += row.requests
        self.input_tokens += row.input_tokens
        self.cached_input_tokens += row.cached_input_tokens
        self.output_tokens += row.output_tokens
        self.spend += row.spend


@dataclass
class Report:
    series: dict[tuple[dt.datetime, GroupKey], Sums] = field(default_factory=dict)
    totals: Sums = field(default_factory=Sums)
    unpriced: set[str] = field(default_factory=set)


def summarize(query: UsageQuery, rows: Sequence[UsageRow]) -> Report:
    report = Report()
    with decimal.localcontext(EXACT):
        for row in rows:
            if row.unpriced:
                report.unpriced.add(row.model)
            group = (row.model if "model" in query.group_by else None, row.project_id, row.api_key_id)
            if row.bucket is not None:  # None only for range-wide rows (no granularity)
                report.series.setdefault((row.bucket, group), Sums()).add(row)
            report.totals.add(row)
    return report


def totals_type(sums: Sums) -> UsageTotals:
    return UsageTotals(
        requests=BigInt(sums.requests),
        input_tokens=BigInt(sums.input_tokens),
        cached_input_tokens=BigInt(sums.cached_input_tokens),
        output_tokens=BigInt(sums.output_tokens),
        total_tokens=BigInt(sums.input_tokens + sums.output_tokens),
        spend=sums.spend,
    )


def _order(item: tuple[tuple[dt.datetime, GroupKey], Sums]) -> tuple[Any, ...]:
    """By start, then group; within a dimension null first, then by value."""
    start, (model, project_id, api_key_id) = item[0]
    return (start, model is not None, model or "", project_id is not None, project_id or "",
            api_key_id is not None, api_key_id or "")  # fmt: skip


def series_types(query: UsageQuery, report: Report) -> list[UsageBucket]:
    assert query.granularity is not None
    granularity, zone = query.granularity, zoneinfo.ZoneInfo(query.time_zone)
    fixed = {"MINUTE": dt.timedelta(minutes=1), "HOUR": dt.timedelta(hours=1)}.get(granularity)
    buckets = []
    for (start, (model, project_id, api_key_id)), sums in sorted(report.series.items(), key=_order):
        buckets.append(
            UsageBucket(
                start=start,
                end=start + fixed if fixed else bucket_end(start, granularity, zone),
                group=UsageGroup(model=model, project_id=project_id, api_key_id=api_key_id),
                requests=BigInt(sums.requests),
                input_tokens=BigInt(sums.input_tokens),
                cached_input_tokens=BigInt(sums.cached_input_tokens),
                output_tokens=BigInt(sums.output_tokens),
                total_tokens=BigInt(sums.input_tokens + sums.output_tokens),
                spend=sums.spend,
            )
        )
    return buckets
