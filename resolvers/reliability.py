"""``Query.reliability``: error rates, latency percentiles, spikes and their causes for one org."""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence
from typing import Annotated, Any, NamedTuple, cast

import strawberry

from db.usage import UsageQuery
from kernel.errors import BadUserInput
from reliability.report import Cause, FoundSpike, Report, Series, build_report, error_rate
from resolvers.freshness import to_freshness
from resolvers.reliability_json import render_series
from resolvers.usage import usage_query
from resolvers.validation import org_argument
from schema.context import Context
from schema.enums import Granularity, Severity, SpikeMetric, UsageDimension
from schema.execution import RenderedList, list_plan
from schema.inputs import TimeRange, UsageFilter
from schema.reliability import (
    Attribution,
    LatencyPercentile,
    ReliabilityBucket,
    ReliabilityReport,
    ReliabilityTotals,
    Spike,
)
from schema.scalars import BigInt

MAX_PERCENTILES = 10
SERIES_AS_JSON = True  # the series as JSON text where it can be written exactly (tests turn it off to compare)


def check_percentiles(values: Sequence[float]) -> list[float]:
    """1 to MAX_PERCENTILES values, each strictly between 0 and 1."""
    if not 1 <= len(values) <= MAX_PERCENTILES:
        raise BadUserInput(f"percentiles has {len(values)} values; give 1 to {MAX_PERCENTILES}")
    for index, value in enumerate(values):
        if not (math.isfinite(value) and 0 < value < 1):
            raise BadUserInput(f"percentiles[{index}] is {value!r}; each percentile must lie in (0, 1), e.g. 0.95")
    return list(values)


def reliability_query(
    org_id: str, range: TimeRange, granularity: Granularity, filter: UsageFilter | None, group_by_model: bool,
    time_zone: str,
) -> UsageQuery:  # fmt: skip
    """The same rules as ``usage`` (range limits, zone, filters), grouped by model or not at all."""
    return usage_query(org_id, range, granularity, filter, [UsageDimension.MODEL] if group_by_model else [], time_zone)


async def resolve_reliability(
    info: strawberry.Info[Context, Any],
    org_id: strawberry.ID,
    range: TimeRange,
    granularity: Granularity = Granularity.HOUR,
    filter: UsageFilter | None = None,
    group_by_model: bool = False,
    percentiles: Annotated[list[float], strawberry.argument(description="Each in (0, 1).")] = (  # type: ignore[assignment]
        0.5,
        0.95,
        0.99,
    ),
    time_zone: Annotated[
        str, strawberry.argument(description="IANA zone for DAY and MONTH bucket boundaries, e.g. Europe/Berlin.")
    ] = "UTC",
) -> ReliabilityReport:
    context = info.context
    org_argument(context.require_caller(), org_id)
    wanted = check_percentiles(list(percentiles))
    query = reliability_query(org_id, range, granularity, filter, group_by_model, time_zone)
    freshness = await context.loaders.freshness.load(org_id)  # also says where the rollups end
    plan = list_plan(info._raw_info, "series") if SERIES_AS_JSON else None

    def as_json(series: Series) -> RenderedList | None:  # while the spikes' statements run
        return render_series(plan, series, wanted) if plan is not None else None

    resources = context.resources
    report, rendered = await build_report(resources.query_engine.connect, query, wanted, freshness.materialized_through,
                                          meanwhile=as_json, offload=resources.offload)  # fmt: skip
    return to_report(org_id, range, granularity, time_zone, wanted, report, to_freshness(
        freshness, resources.settings, dt.datetime.now(dt.UTC)
    ), rendered)  # fmt: skip


def to_report(
    org_id: str, range: TimeRange, granularity: Granularity, time_zone: str, percentiles: Sequence[float],
    report: Report, freshness: Any, rendered: RenderedList | None = None,
) -> ReliabilityReport:  # fmt: skip
    """The answer; its series as the JSON text ``rendered`` (resolvers/reliability_json.py) when given, else as
    BucketItems for the executor to project."""
    totals = report.totals
    shared = _Percentiles(percentiles)
    return ReliabilityReport(
        org_id=strawberry.ID(org_id),
        from_=range.from_,
        to=range.to,
        granularity=granularity,
        time_zone=time_zone,
        totals=ReliabilityTotals(
            requests=BigInt(totals.requests),
            errors=BigInt(totals.errors),
            client_errors=BigInt(totals.client_errors),
            error_rate=error_rate(totals.errors, totals.requests),
            latency=shared(totals.latency),
        ),
        # JSON text, or BucketItems: ReliabilityBucket's attributes as tuples (the fast path reads attributes;
        # no Strawberry object a bucket).
        series=cast(list[ReliabilityBucket], rendered or _buckets(report.series, shared)),
        spikes=[_spike(s) for s in report.spikes],
        breakdown=[_attribution(c) for c in report.breakdown],
        freshness=freshness,
    )


class _Percentiles:
    """The LatencyPercentile lists of one answer, one per distinct list of values: a sketch reports one of a few
    hundred bucket values, so buckets share their objects and often whole lists (read-only to the executor)
    instead of each making its own."""

    def __init__(self, percentiles: Sequence[float]) -> None:
        self.percentiles = percentiles
        self.made: dict[tuple[float, float], LatencyPercentile] = {}
        self.lists: dict[tuple[float, ...], list[LatencyPercentile]] = {}

    def __call__(self, values: Sequence[float]) -> list[LatencyPercentile]:
        key = tuple(values)
        shared = self.lists.get(key)
        if shared is None:
            shared = self.lists[key] = [self._one(pair) for pair in zip(self.percentiles, values, strict=False)]
        return shared

    def _one(self, key: tuple[float, float]) -> LatencyPercentile:
        item = self.made.get(key)
        if item is None:
            item = self.made[key] = LatencyPercentile(percentile=key[0], ms=key[1])
        return item


class BucketItem(NamedTuple):
    """One bucket of the series, with the attributes of ``schema.reliability.ReliabilityBucket``."""

    start: dt.datetime
    end: dt.datetime
    model: str | None
    requests: int
    errors: int
    client_errors: int
    error_rate: float
    latency: list[LatencyPercentile]


def _buckets(series: Series, latency: _Percentiles) -> list[BucketItem]:
    new = tuple.__new__  # rather than BucketItem(...): a named tuple's __new__ is a Python function
    rows = zip(series.starts, series.ends, series.models, series.requests, series.errors, series.client_errors,
               series.error_rates, map(latency, series.latency), strict=True)  # fmt: skip
    return [new(BucketItem, row) for row in rows]


def _spike(spike: FoundSpike) -> Spike:
    return Spike(
        start=spike.start, end=spike.end, metric=SpikeMetric[spike.metric.value], observed=spike.observed,
        baseline=spike.baseline, severity=Severity[spike.severity.value], model=spike.model,
        top_contributors=[_attribution(c) for c in spike.causes],
    )  # fmt: skip


def _attribution(cause: Cause) -> Attribution:
    return Attribution(
        model=cause.model, status_code=cause.status_code, error_type=cause.error_type,
        errors=BigInt(cause.count), share=cause.share,
    )  # fmt: skip
