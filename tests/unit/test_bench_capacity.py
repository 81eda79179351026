"""The capacity model of docs/scaling.md (``bench/capacity.py``): bytes per event from table sizes, processes
from measured capacity with headroom, rollup disk bounded by events and by groups (minute rows by events and by
rows per org-minute, kept 7 days), and constants read from the other benchmarks' result files."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from bench.capacity import (
    Constants,
    Demand,
    TableSize,
    bytes_per_event,
    cited_constants,
    dataset_params,
    minute_bytes_per_row,
    plan,
    processes,
    rollup_bytes_per_group,
)

SIZES = {
    "usage_events": TableSize(rows=1000, bytes=300_000),
    "event_receipts": TableSize(rows=1000, bytes=150_000),
    "usage_hourly": TableSize(rows=100, bytes=40_000),
    "usage_hourly_model": TableSize(rows=50, bytes=10_000),
    "reliability_hourly_model": TableSize(rows=50, bytes=20_000),
    "errors_hourly": TableSize(rows=10, bytes=5_000),
    "reliability_minute_model": TableSize(rows=400, bytes=80_000),
}
CONSTANTS = Constants(
    ingest_events_per_s=40_000, ingest_single_events_per_s=5_000, api_queries_per_s=40,
    rollup_s_per_million=10, export_rows_per_s=25_000, raw_bytes_per_event=300, receipt_bytes_per_event=150,
    rollup_bytes_per_group=750, groups_per_org_hour=50, minute_bytes_per_row=200, minute_rows_per_org_minute=5,
    postgres_ingest_cpu_s_per_million=16,
    postgres_rollup_cpu_s_per_million=8, postgres_query_cpu_s=0.012,
)  # fmt: skip


def test_bytes_per_event_sums_the_hourly_tables_as_rollups() -> None:
    per = bytes_per_event(SIZES, 1000)
    assert per["usage_events"] == 300 and per["event_receipts"] == 150
    assert per["rollups"] == 75  # (40,000 + 10,000 + 20,000 + 5,000) / 1,000: the hourly tables, not the minutes
    assert per["reliability_minute_model"] == 80
    assert rollup_bytes_per_group(SIZES) == 750  # per usage_hourly row, without the minute table
    assert minute_bytes_per_row(SIZES) == 200  # 80,000 / 400
    with pytest.raises(ValueError):
        minute_bytes_per_row(SIZES | {"reliability_minute_model": TableSize(rows=0, bytes=0)})
    with pytest.raises(ValueError):
        bytes_per_event(SIZES, 0)
    with pytest.raises(ValueError):
        rollup_bytes_per_group(SIZES | {"usage_hourly": TableSize(rows=0, bytes=0)})


def test_processes_round_up_with_headroom_and_never_below_one() -> None:
    assert processes(40_000, 40_000, 0.5) == 2
    assert processes(20_000, 40_000, 0.5) == 1  # exactly at the headroom: one is enough
    assert processes(20_001, 40_000, 0.5) == 2
    assert processes(0, 40_000, 0.5) == 1
    with pytest.raises(ValueError):
        processes(1, 0, 0.5)
    with pytest.raises(ValueError):
        processes(1, 1, 0)


def test_the_worked_example_shape() -> None:
    """2,000 events/s, 5,000 orgs, a tenth single-event, one query per org a minute, a million export rows a
    day: every count follows from the constants by hand."""
    demand = Demand(events_per_s=2000, orgs=5000, single_event_share=0.1, export_rows_per_day=1_000_000)
    got = plan(demand, CONSTANTS)
    # ingest: 1,800 / 40,000 + 200 / 5,000 = 0.085 of an ingester, at half load: 1
    assert got.ingesters == 1
    # 5,000 / 60 = 83.3 queries/s over 20 a process (40 at half load): 5
    assert got.api_processes == 5
    assert got.rollup_leader_busy_share == 0.02  # 2,000 x 10 s per million
    assert got.postgres_cores == round(2000 * 24 / 1e6 + 5000 / 60 * 0.012, 2)  # writes + rollups, queries
    assert got.export_workers == 1
    assert got.raw_gb_per_day == round(2000 * 86400 * 300 / 1e9, 2)
    assert got.receipts_gb_per_day == round(2000 * 86400 * 150 / 1e9, 2)
    # 1,440 events per org-hour > 50 groups: 5,000 x 24 x 50 groups of 750 bytes
    assert got.rollups_gb_per_day == round(5000 * 24 * 50 * 750 / 1e9, 3)
    # 24 events per org-minute > 5 rows: 5,000 x 1,440 x 5 minute rows of 200 bytes = 7.2 GB, kept 7 days
    assert got.minute_rollups_gb_per_day == 7.2
    raw_and_receipts = 2000 * 86400 * 450 / 1e9
    assert got.steady_state_gb == round(raw_and_receipts * 91 + got.rollups_gb_per_day * 365 + 7.2 * 7, 1)


def test_sparse_orgs_have_at_most_one_group_per_event() -> None:
    sparse = plan(Demand(events_per_s=1, orgs=3600), CONSTANTS)  # one event per org-hour
    assert sparse.rollups_gb_per_day == round(86400 * 750 / 1e9, 3)
    # a sixtieth of an event per org-minute: one minute row per event, 86,400 a day of 200 bytes (not 5 per minute)
    assert sparse.minute_rollups_gb_per_day == round(86400 * 200 / 1e9, 3) == 0.017


def test_minute_rows_are_kept_seven_days_not_a_year() -> None:
    """The minute rows alone (no raw data, no hourly rows): the steady state holds 7 days of them."""
    only_minutes = replace(CONSTANTS, raw_bytes_per_event=0, receipt_bytes_per_event=0, rollup_bytes_per_group=0)
    got = plan(Demand(events_per_s=2000, orgs=5000), only_minutes)
    assert got.rollups_gb_per_day == 0 and got.minute_rollups_gb_per_day == 7.2
    assert got.steady_state_gb == 50.4  # 7.2 x 7


def test_more_load_needs_more_ingesters_and_the_rollup_leader_saturates() -> None:
    heavy = plan(Demand(events_per_s=200_000, orgs=10), CONSTANTS)
    assert heavy.ingesters == 10  # 200,000 / (40,000 x 0.5)
    assert heavy.rollup_leader_busy_share == 2.0  # above 1: one leader cannot keep up


def test_constants_are_read_from_the_result_files(tmp_path: Path) -> None:
    defaults = {"batch_events": 20000}
    (tmp_path / "ingest.json").write_text(json.dumps({
        "summary": {"batched": {"at_defaults_events_per_s": [41_829, 40_535]},
                    "single": {"at_defaults_events_per_s": [5_512, 5_268]}},
        "setting_defaults": defaults,
        "runs": [
            {"scenario": "batched_0", "settings": defaults, "ingest": {"events": 1_000_000},
             "cpu": {"cpu_s": {"postgres": 16.76}}},
            {"scenario": "batched_1", "settings": {"batch_events": 1000}, "ingest": {"events": 1_000_000},
             "cpu": {"cpu_s": {"postgres": 9.0}}},  # other settings: not the defaults' cost
            {"scenario": "single_0", "settings": defaults, "ingest": {"events": 200_000},
             "cpu": {"cpu_s": {"postgres": 1.0}}},  # single-event messages: not the batched cost
        ],
    }))  # fmt: skip
    (tmp_path / "graphql.json").write_text(json.dumps({"usage_concurrent": {"gateway": {
        "rps": 44.8, "cpu": {"cores_used": {"postgres": 0.567}}}}}))  # fmt: skip
    (tmp_path / "exports.json").write_text(json.dumps({"summary": {"targets": [
        {"kind": "COST", "what": "wall time", "value": 90.0},
        {"kind": "COST", "what": "rows exported", "value": 1_000_025},
        {"kind": "COST", "what": "wall time", "value": 37.0},
        {"kind": "INCIDENT", "what": "wall time", "value": 10.0},
    ]}}))  # fmt: skip
    measured = {"rollup_s_per_million": 9.5, "rollup_cpu_s_per_million": 7.4,
                "bytes_per_event": {"usage_events": 310.0, "event_receipts": 160.0},
                "rollup_bytes_per_group": 700.0, "groups_per_org_hour": 45.0,
                "minute_bytes_per_row": 201.5, "minute_rows_per_org_minute": 4.75}  # fmt: skip
    got = cited_constants(tmp_path, measured)
    assert (got.ingest_events_per_s, got.ingest_single_events_per_s) == (40_535, 5_268)  # the lower run
    assert got.api_queries_per_s == 44.8
    assert got.export_rows_per_s == round(1_000_025 / 37.0)  # the fastest COST run, not INCIDENT's
    assert got.raw_bytes_per_event == 310 and got.rollup_s_per_million == 9.5
    assert (got.minute_bytes_per_row, got.minute_rows_per_org_minute) == (201.5, 4.75)
    assert got.postgres_ingest_cpu_s_per_million == 16.76 and got.postgres_rollup_cpu_s_per_million == 7.4
    assert got.postgres_query_cpu_s == round(0.567 / 44.8, 4)


def test_dataset_params_take_hours_as_a_fraction_of_days() -> None:
    assert dataset_params(1_000_000, 115, 6)["days"] == 0.25
