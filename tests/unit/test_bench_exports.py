"""The exports benchmark's pure parts: its arguments, the data plan (month to date or a closed month), the jobs
and statements it measures, the COPY tag, the rates and the summary against the issue's targets."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest

from bench.export_bench import (
    INCIDENT_ORG,
    RssSampler,
    copy_rows,
    figures,
    jobs_for,
    main_thread_stacks,
    parse_args,
    plan_data,
    prices_for,
    statement_for,
    summarize,
    summarize_profile,
)
from db.exports import INCIDENT_ROWS
from exports.jobs import COST, INCIDENT

NOW = dt.datetime(2026, 11, 30, 11, 10, 13, tzinfo=dt.UTC)


def test_arguments_default_to_the_issue_and_quick_is_small() -> None:
    full = parse_args([])
    assert (full.rows, full.runs, full.storage, full.profile, full.keep_db) == (1_000_000, 2, "s3", True, False)
    quick = parse_args(["--quick", "--storage", "local", "--keep-db"])
    assert (quick.rows, quick.runs, quick.storage, quick.profile, quick.keep_db) == (100_000, 1, "local", False, True)
    assert quick.quiet_wait == 10 and full.quiet_wait == 30
    with pytest.raises(SystemExit):
        parse_args(["--storage", "gcs"])
    with pytest.raises(SystemExit):
        parse_args(["--kinds", "cost,usage"])


def test_plan_uses_the_month_to_date_once_it_has_twenty_days() -> None:
    plan = plan_data(1_000_000, NOW)
    assert (plan.month, plan.month_to_date, plan.orgs) == ("2026-11", True, 2000)
    assert plan.cost_rows == 2000 * 5 * 5 * 20 + 25 >= 1_000_000
    assert plan.incident_start == dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
    assert plan.incident_end - plan.incident_start == dt.timedelta(hours=6)
    # Exactly 20 whole days before now: still to date; one second less: the closed month before.
    assert plan_data(10, dt.datetime(2026, 11, 21, tzinfo=dt.UTC)).month_to_date is True
    young = plan_data(10, dt.datetime(2026, 11, 20, 23, 59, 59, tzinfo=dt.UTC))
    assert (young.month, young.month_to_date) == ("2026-10", False)
    january = plan_data(10, dt.datetime(2027, 1, 5, tzinfo=dt.UTC))
    assert (january.month, january.month_to_date, january.orgs) == ("2026-12", False, 1)
    assert plan_data(1_000_001, NOW).orgs == 2001  # rounded up: never fewer rows than asked
    with pytest.raises(ValueError, match="positive"):
        plan_data(0, NOW)


def test_params_identify_the_data_set() -> None:
    assert plan_data(1000, NOW).params() == plan_data(1000, NOW + dt.timedelta(hours=1)).params()
    assert plan_data(1000, NOW).params() != plan_data(2000, NOW).params()
    assert plan_data(1000, NOW).params() != plan_data(1000, dt.datetime(2026, 12, 25, tzinfo=dt.UTC)).params()


def test_prices_cover_every_model_before_the_month_and_change_once_inside_it() -> None:
    plan = plan_data(1000, NOW)
    prices = prices_for(plan)
    assert len({p.model for p in prices}) == 5 and len(prices) == 6
    inside = [p for p in prices if p.effective_from >= plan.month_start]
    assert [p.effective_from.day for p in inside] == [10]


def test_jobs_are_the_all_org_cost_export_and_the_incident_window() -> None:
    plan = plan_data(1000, NOW)
    jobs = jobs_for(plan, NOW)
    cost, incident = jobs[COST], jobs[INCIDENT]
    assert cost.org_id is None and cost.params == {"month": "2026-11", "month_to_date": True}
    assert (cost.range_from, cost.range_to) == (plan.month_start, NOW)
    assert (incident.org_id, incident.range_from, incident.range_to) == (INCIDENT_ORG, plan.incident_start,
                                                                        plan.incident_end)  # fmt: skip
    closed = jobs_for(plan_data(1000, dt.datetime(2026, 12, 3, tzinfo=dt.UTC)), dt.datetime(2026, 12, 3, tzinfo=dt.UTC))
    assert closed[COST].params == {"month": "2026-11", "month_to_date": False}
    assert closed[COST].range_to == dt.datetime(2026, 12, 1, tzinfo=dt.UTC)


def test_statements_are_the_workers() -> None:
    jobs = jobs_for(plan_data(1000, NOW), NOW)
    through = dt.datetime(2026, 11, 30, 11, tzinfo=dt.UTC)
    sql, args = statement_for(jobs[COST], through)
    assert "ORDER BY org_id" in sql and args[:3] == (None, jobs[COST].range_from, NOW) and args[4] == through
    sql, args = statement_for(jobs[INCIDENT], through)
    assert sql == INCIDENT_ROWS and args[0] == INCIDENT_ORG


def test_copy_rows_reads_the_command_tag() -> None:
    assert copy_rows("COPY 1000025") == 1_000_025
    for bad in ("SELECT 3", "COPY", "COPY x"):
        with pytest.raises(ValueError, match="COPY"):
            copy_rows(bad)


def _worker(rows: int, wall: float, rss: float, status: str = "SUCCEEDED") -> dict[str, Any]:
    return {"rows": rows, "wall_s": wall, "rss_growth_mib": rss, "status": status, "bytes": 200 * rows}


def test_figures_are_rates_and_their_ratio() -> None:
    out = figures(_worker(1_000_000, 20.0, 30.0), {"rows": 1_000_000, "wall_s": 5.0}, {"rows": 1_000_000,
                                                                                       "wall_s": 10.0})  # fmt: skip
    assert out == {"worker_rows_per_s": 50_000.0, "floor_rows_per_s": 200_000.0, "worker_to_floor_rows_per_s": 0.25,
                   "worker_bytes_per_s": 10_000_000, "cursor_rows_per_s": 100_000.0,
                   "cursor_to_floor_rows_per_s": 0.5}  # fmt: skip
    assert "cursor_rows_per_s" not in figures(_worker(10, 1.0, 1.0), {"rows": 10, "wall_s": 1.0}, None)


def test_summary_checks_every_run_of_every_kind() -> None:
    expected = {COST: 1_000_025, INCIDENT: 1_000_000}
    failed = _worker(1_000_000, 9.0, 9.0, "FAILED")
    results = {"runs": [
        {COST: {"worker": _worker(1_000_025, 29.9, 64.0)}, INCIDENT: {"worker": _worker(1_000_000, 30.1, 10.0)}},
        {COST: {"worker": _worker(1_000_024, 10.0, 64.1)}, INCIDENT: {"worker": failed}},
    ]}  # fmt: skip
    summary = summarize(results, expected)
    met = {(r["run"], r["kind"], r["what"]): r["met"] for r in summary["targets"]}
    assert met == {
        (1, COST, "wall time"): True, (1, COST, "worker RSS growth"): True, (1, COST, "rows exported"): True,
        (1, INCIDENT, "wall time"): False, (1, INCIDENT, "worker RSS growth"): True,
        (1, INCIDENT, "rows exported"): True,
        (2, COST, "wall time"): True, (2, COST, "worker RSS growth"): False, (2, COST, "rows exported"): False,
        (2, INCIDENT, "wall time"): True, (2, INCIDENT, "worker RSS growth"): True,
        (2, INCIDENT, "rows exported"): False,
    }  # fmt: skip
    assert summary["all_met"] is False
    assert summarize({"runs": [{COST: {"worker": _worker(1_000_025, 1.0, 1.0)}}]}, expected)["all_met"] is True
    assert summarize({"runs": []}, expected) == {"targets": [], "all_met": None}


def test_rss_sampler_sees_memory_taken_inside_it() -> None:
    with RssSampler(every_s=0.005) as rss:
        block = bytearray(64 * 1024 * 1024)
        block[::4096] = b"x" * len(block[::4096])  # touch every page so it is resident
    assert rss.peak - rss.baseline >= 60 * 1024 * 1024
    assert rss.samples >= 1
    del block


def test_profile_keeps_the_main_threads_stacks(tmp_path: Path) -> None:
    raw = tmp_path / "cost.txt"
    raw.write_text(
        "<module> (<string>);run_once (exports/worker.py:1);add (exports/csv_format.py:9) 30\n"
        "_bootstrap (threading.py:995);_bootstrap_inner (threading.py:1038);wait (threading.py:320) 12\n"
        "Thread._bootstrap (threading.py:995);_worker (concurrent/futures/thread.py:81) 3\n"
        "<module> (<string>);run_once (exports/worker.py:1);data_received (asyncpg/protocol.py:5) 10\n"
    )
    main, dropped = main_thread_stacks(raw)
    assert dropped == 15 and len(main.read_text().splitlines()) == 2
    summary = summarize_profile(raw, duration_s=1.0)
    assert summary["samples"] == 40 and summary["other_threads_samples"] == 15
    areas = {row["function"]: row["samples"] for row in summary["by_area_self"]}
    assert areas == {"exports.csv_format (cells, csv writer, encode)": 30, "asyncpg (protocol, record decoding)": 10}
