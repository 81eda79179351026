"""Types of the reliability report: error rates, latency percentiles, spikes and what explains them."""

from __future__ import annotations

import datetime as dt

import strawberry

from schema.enums import Granularity, Severity, SpikeMetric
from schema.scalars import BigInt
from schema.usage import Freshness

PERCENTILE_RULE = (
    "Within 1 % of the exact percentile: the latency of nearest rank ceil(p * n) among the n requests "
    "(p as written), from mergeable log-bucket sketches (docs/reliability.md)."
)


@strawberry.type
class LatencyPercentile:
    percentile: float
    ms: float


@strawberry.type
class ReliabilityTotals:
    requests: BigInt
    errors: BigInt = strawberry.field(description="status_code >= 500")
    client_errors: BigInt = strawberry.field(description="400 <= status_code < 500")
    error_rate: float = strawberry.field(description="errors / requests (0 when no requests).")
    latency: list[LatencyPercentile] = strawberry.field(description=PERCENTILE_RULE + " Empty with no requests.")


@strawberry.type
class ReliabilityBucket:
    start: dt.datetime
    end: dt.datetime
    model: str | None
    requests: BigInt
    errors: BigInt
    client_errors: BigInt
    error_rate: float
    latency: list[LatencyPercentile] = strawberry.field(description=PERCENTILE_RULE)


@strawberry.type
class Attribution:
    model: str | None
    status_code: int | None
    error_type: str | None
    errors: BigInt = strawberry.field(
        description="Errors (for a latency spike: slow requests) of this row in the spike's window or the range."
    )
    share: float = strawberry.field(
        description="Share of the spike's errors (or slow requests) explained by this row, 0..1."
    )


@strawberry.type
class Spike:
    start: dt.datetime
    end: dt.datetime
    metric: SpikeMetric
    observed: float
    baseline: float
    severity: Severity
    model: str | None = strawberry.field(
        default=None, description="The series the spike was found in: its model with groupByModel, else null."
    )
    top_contributors: list[Attribution] = strawberry.field(
        default_factory=list,
        description=(
            "What explains the spike, ranked by excess over what the baseline predicts (docs/spike-detection.md)."
        ),
    )


@strawberry.type
class ReliabilityReport:
    org_id: strawberry.ID
    from_: dt.datetime = strawberry.field(name="from")
    to: dt.datetime
    granularity: Granularity
    time_zone: str
    totals: ReliabilityTotals
    series: list[ReliabilityBucket] = strawberry.field(
        description=(
            "One series per model when groupByModel is true, else one overall series. Buckets with no "
            "traffic are omitted; ordered by start, then model."
        )
    )
    spikes: list[Spike]
    breakdown: list[Attribution] = strawberry.field(
        description="Errors in the range by model, status code and error type, largest first."
    )
    freshness: Freshness
