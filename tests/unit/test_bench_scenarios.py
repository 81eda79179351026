"""Pure parts of the benchmark scenarios: probe visibility, batch statistics, the API's GC deltas."""

from __future__ import annotations

from typing import Any

from bench.api.probes import Poll, probe_event, probe_lags
from bench.api.server import gc_delta
from bench.ingestion.commits import batch_stats
from ingest.synthetic import sent_at_from_id


def test_a_probe_is_visible_at_the_first_poll_that_counts_it() -> None:
    probes = [10.0, 10.2, 10.4]
    polls = [Poll(10.05, 10.1, 0), Poll(10.25, 10.3, 1), Poll(10.45, 10.5, 3)]
    lags = probe_lags(probes, polls)
    assert [round(x["visible_by"], 3) for x in lags] == [0.3, 0.3, 0.1]
    assert [round(x["visible_after"], 3) for x in lags] == [0.05, 0.05, 0.0]  # previous poll sent before it
    assert probe_lags(probes, polls[:2]) == lags[:1]  # probes no poll counted yet have no lag


def test_a_probe_carries_its_publish_time() -> None:
    event = probe_event("probe_x", 3, 1_700_000_000.25)
    assert sent_at_from_id(str(event["id"])) == 1_700_000_000.25


def row(started: float, duration_ms: float, accepted: int) -> dict[str, Any]:
    committed = started + duration_ms / 1000
    return {"accepted": accepted, "duplicates": 0, "rejected": 0, "duration_ms": duration_ms, "started": started,
            "committed": committed, "committed_at_column": started}  # fmt: skip


def test_batch_stats_measure_from_the_first_start_to_the_last_commit() -> None:
    stats = batch_stats([row(100.0, 500, 1000), row(100.5, 500, 3000), row(102.0, 1000, 2000)])
    assert stats["events"] == 6000
    assert stats["window_s"] == 3.0
    assert stats["events_per_s"] == 2000
    assert stats["per_second"] == [1000, 3000, 0, 2000]
    assert stats["longest_gap_between_commits_s"] == 2.0
    assert stats["writer_busy_share"] == round(2.0 / 3.0, 3)
    assert stats["batch_events"] == {"mean": 2000.0, "p50": 2000, "p90": 3000, "max": 3000}
    assert stats["window"] == (100.0, 103.0)


def test_gc_delta_per_window() -> None:
    before = {"count": [10, 2, 0], "total_ms": [5.0, 2.0, 0.0], "longest_ms": [1.0, 1.0, 0.0], "tracked_objects": 9}
    after = {"count": [30, 3, 1], "total_ms": [15.0, 4.5, 10.0], "longest_ms": [0.5, 2.5, 10.0],
             "tracked_objects": 12}  # fmt: skip
    assert gc_delta(before, after, 100) == {
        "collections": [20, 1, 1], "total_ms": [10.0, 2.5, 10.0], "longest_ms": [0.5, 2.5, 10.0],
        "ms_per_request": 0.225, "tracked_objects": 12,
    }  # fmt: skip
    assert gc_delta(None, after, 100) == {}
