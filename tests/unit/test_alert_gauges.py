"""The gauges alerts read: absent until fed, then what the worker or consumer reported."""

from __future__ import annotations

import datetime as dt
import time

from prometheus_client.parser import text_string_to_metric_families

from db.rollup import CycleResult
from gateway.metrics import Metrics
from ingest.metrics import IngestMetrics


def _samples(metrics: Metrics) -> dict[str, float]:
    return {
        s.name: s.value
        for family in text_string_to_metric_families(metrics.exposition().decode())
        for s in family.samples
        if s.name.startswith(("analytics_rollup_", "analytics_ingest_lag"))
    }


def test_rollup_watermark_is_the_last_cycle_that_ran() -> None:
    metrics = Metrics.create()
    assert "analytics_rollup_watermark_timestamp_seconds" not in _samples(metrics)
    through = dt.datetime(2026, 11, 30, 8, tzinfo=dt.UTC)
    assert metrics.rollup.observe(CycleResult(ran=True, rolled_until=through)).ran
    metrics.rollup.observe(CycleResult(ran=False))  # another process holds the lock: nothing learned
    assert _samples(metrics)["analytics_rollup_watermark_timestamp_seconds"] == through.timestamp()


def test_ingest_lag_is_now_minus_caught_up_through() -> None:
    metrics = Metrics.create()
    ingest = IngestMetrics(metrics.meter("test"))
    assert "analytics_ingest_lag_seconds" not in _samples(metrics)
    ingest.caught_up_through = time.time() - 400
    assert 399 <= _samples(metrics)["analytics_ingest_lag_seconds"] <= 460
