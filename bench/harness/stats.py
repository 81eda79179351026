"""Percentiles and the distribution summaries the results files hold."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

QUANTILES = {"p50": 0.5, "p90": 0.9, "p99": 0.99, "p999": 0.999}


def pct(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0-1), nearest rank."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def distribution(
    values: Sequence[float], *, digits: int, scale: float = 1.0, quantiles: Sequence[str] = ("p50", "p90", "p99")
) -> dict[str, Any]:
    """count, the ``quantiles``, max and mean of ``values`` times ``scale``, rounded to ``digits``."""
    if not values:
        return {"count": 0}
    out: dict[str, Any] = {"count": len(values)}
    out |= {name: round(pct(values, QUANTILES[name]) * scale, digits) for name in quantiles}
    out["max"] = round(max(values) * scale, digits)
    out["mean"] = round(sum(values) / len(values) * scale, digits)
    return out


def latency_summary_ms(seconds: Sequence[float]) -> dict[str, Any]:
    """Latencies given in seconds, summarised in milliseconds (2 decimals)."""
    return distribution(seconds, digits=2, scale=1000)


def seconds_summary(values: Sequence[float]) -> dict[str, Any]:
    """Lags in seconds (3 decimals)."""
    return distribution(values, digits=3)


def fine_seconds_summary(values: Sequence[float]) -> dict[str, Any]:
    """Latencies in seconds with p99.9 (4 decimals); an empty dict when there are none."""
    return distribution(values, digits=4, quantiles=("p50", "p90", "p99", "p999")) if values else {}
