"""The platform SLO counter: which events count (new ones only) and a bounded model label."""

from __future__ import annotations

import datetime as dt
from collections import Counter

from prometheus_client.parser import text_string_to_metric_families

from db.events import OrgIngested, Record
from gateway.metrics import Metrics
from ingest.metrics import OTHER_MODEL, PlatformRequests
from ingest.writer import new_requests

NOW = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)


def _record(org: str, event_id: str, model: str, status: int) -> Record:
    return (0, org, NOW, "//src", event_id, None, None, model, 1, 0, 1, 1.0, None, status, None, None)


def _orgs(**events: int) -> list[OrgIngested]:
    return [OrgIngested(org, n, NOW, NOW) for org, n in events.items()]


def test_a_batch_of_new_events_counts_by_model_and_class() -> None:
    records = [_record("o", "1", "m", 200), _record("o", "2", "m", 201), _record("o", "3", "n", 503)]
    assert new_requests(records, _orgs(o=3)) == Counter({("m", 2): 2, ("n", 5): 1})


def test_repeats_inside_the_batch_count_once_as_the_first_copy() -> None:
    records = [_record("o", "1", "m", 500), _record("o", "1", "m", 200), _record("o", "2", "n", 200)]
    assert new_requests(records, _orgs(o=2)) == Counter({("m", 5): 1, ("n", 2): 1})


def test_an_all_duplicate_batch_counts_nothing() -> None:
    assert new_requests([_record("o", "1", "m", 200)], []) == Counter()


def test_orgs_whose_events_were_all_stored_before_count_nothing() -> None:
    records = [_record("old", "1", "m", 500), _record("new", "2", "m", 200), _record("new", "3", "n", 404)]
    assert new_requests(records, _orgs(new=2)) == Counter({("m", 2): 1, ("n", 4): 1})


def test_an_org_with_new_and_stored_events_is_apportioned_to_its_exact_total() -> None:
    records = [_record("o", str(i), "m", 200) for i in range(7)] + [_record("o", "x", "n", 500)]
    counted = new_requests([*records, _record("p", "y", "m", 200)], _orgs(o=3, p=1))
    assert counted.total() == 4
    assert counted == Counter({("m", 2): 4})  # 7/8 of 3 is 2.6 -> 3, 1/8 of 3 is 0.4 -> 0; org p's one event


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
