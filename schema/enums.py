"""The contract's enums as Strawberry types."""

from __future__ import annotations

from enum import Enum

import strawberry

from kernel.scopes import Scope as _Scope

Scope = strawberry.enum(_Scope, name="Scope")


@strawberry.enum
class Granularity(Enum):
    MINUTE = "MINUTE"
    HOUR = "HOUR"
    DAY = "DAY"
    MONTH = "MONTH"


@strawberry.enum
class UsageDimension(Enum):
    MODEL = "MODEL"
    PROJECT = "PROJECT"
    API_KEY = "API_KEY"


@strawberry.enum
class FreshnessStatus(Enum):
    FRESH = strawberry.enum_value(
        "FRESH",
        description=(
            "Everything ingested is queryable and the pipeline lag is under the fresh threshold (default 60 s)."
        ),
    )
    DELAYED = strawberry.enum_value(
        "DELAYED",
        description=(
            "Lag is above the fresh threshold but under the stale threshold (default 300 s, the 5-minute promise)."
        ),
    )
    STALE = strawberry.enum_value(
        "STALE",
        description="Lag is above the stale threshold, or the pipeline has stopped reporting.",
    )


@strawberry.enum
class ExportKind(Enum):
    COST = strawberry.enum_value("COST", description="Month-to-date (or a closed month's) cost breakdown for finance.")
    INCIDENT = strawberry.enum_value("INCIDENT", description="Raw usage events of one org inside an incident window.")


@strawberry.enum
class ExportStatus(Enum):
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    EXPIRED = "EXPIRED"


@strawberry.enum
class SpikeMetric(Enum):
    ERROR_RATE = "ERROR_RATE"
    LATENCY_P95 = "LATENCY_P95"
    LATENCY_P99 = "LATENCY_P99"


@strawberry.enum
class Severity(Enum):
    WARNING = "WARNING"
    CRITICAL = "CRITICAL"


ALL_ENUMS = (Scope, Granularity, UsageDimension, FreshnessStatus, ExportKind, ExportStatus, SpikeMetric, Severity)
