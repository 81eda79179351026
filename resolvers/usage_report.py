"""From usage rows to the API's report: buckets, groups, totals and exact spend."""

from __future__ import annotations

import decimal
import zoneinfo
from collections.abc import Sequence
from dataclasses import dataclass, field

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
    series: dict[tuple[object, GroupKey], Sums] = field(default_factory=dict)
    totals: Sums = field(default_factory=Sums)
    unpriced: set[str] = field(default_factory=set)


def summarize(query: UsageQuery, rows: Sequence[UsageRow]) -> Report:
    report = Report()
    with decimal.localcontext(EXACT):
        for row in rows:
            if row.unpriced:
                report.unpriced.add(row.model)
            group = (row.model if "model" in query.group_by else None, row.project_id, row.api_key_id)
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


def series_types(query: UsageQuery, report: Report) -> list[UsageBucket]:
    assert query.granularity is not None
    zone = zoneinfo.ZoneInfo(query.time_zone)
    ordered = sorted(
        report.series.items(), key=lambda item: (item[0][0], [(v is not None, v or "") for v in item[0][1]])
    )
    buckets = []
    for (start, (model, project_id, api_key_id)), sums in ordered:
        totals = totals_type(sums)
        buckets.append(
            UsageBucket(
                start=start,  # type: ignore[arg-type]
                end=bucket_end(start, query.granularity, zone),  # type: ignore[arg-type]
                group=UsageGroup(model=model, project_id=project_id, api_key_id=api_key_id),
                requests=totals.requests,
                input_tokens=totals.input_tokens,
                cached_input_tokens=totals.cached_input_tokens,
                output_tokens=totals.output_tokens,
                total_tokens=totals.total_tokens,
                spend=totals.spend,
            )
        )
    return buckets
