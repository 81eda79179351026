"""The platform SLO counter's bounded model label (which events count: the integration test of the counter)."""

from __future__ import annotations

import datetime as dt

from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics import Metrics
from ingest.metrics import OTHER_MODEL, PlatformRequests

NOW = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)


def _samples(metrics: Metrics) -> dict[tuple[str, str], float]:
    return {
        (s.labels["model"], s.labels["status_class"]): s.value
        for family in text_string_to_metric_families(metrics.exposition().decode())
        for s in family.samples
        if s.name == "analytics_platform_requests_total"
    }


def test_models_beyond_the_bound_are_counted_as_other() -> None:
    metrics = Metrics.create()
    platform = PlatformRequests(metrics.meter("test"), max_models=2)
    platform.add({("a", 2): 3, ("b", 5): 1})
    platform.add({(f"hostile-{i}", 2): 1 for i in range(1000)} | {("a", 5): 2})
    samples = _samples(metrics)
    assert {model for model, _ in samples} == {"a", "b", OTHER_MODEL}
    assert samples[OTHER_MODEL, "2xx"] == 1000
    assert samples["a", "2xx"] == 3 and samples["a", "5xx"] == 2
    assert samples["b", "2xx"] == 0 and samples["b", "5xx"] == 1  # created at 0 so that rate() sees the first one
