"""The reliability benchmark's pure parts: its floor's statements, the split of build_report's time, the targets."""

from __future__ import annotations

import datetime as dt

from bench.api.incident import reusable
from bench.api.profile import area_of
from bench.api.reliability import AREAS, COMPOSITIONS_START, last_hour, make_floor, phases, shapes
from bench.reliability_bench import summarize
from db.reliability import compositions_statement
from db.usage import UsageQuery
from reliability.report import BREAKDOWN_ROWS

NOW = dt.datetime(2026, 11, 30, 8, 21, 23, tzinfo=dt.UTC)


def test_shapes_are_whole_hours_and_minutes() -> None:
    hour, minute = shapes(NOW)
    assert (hour.start, hour.end, hour.by_model) == (
        dt.datetime(2026, 10, 31, 9, tzinfo=dt.UTC), dt.datetime(2026, 11, 30, 9, tzinfo=dt.UTC), True
    )  # fmt: skip
    assert (minute.end - minute.start, minute.end, minute.by_model) == (
        dt.timedelta(hours=24), dt.datetime(2026, 11, 30, 8, 22, tzinfo=dt.UTC), False
    )  # fmt: skip
    assert hour.variables("org_0000")["groupByModel"] is True


def test_the_last_hour_is_the_hour_shape_cut_to_its_last_hour() -> None:
    hour, _ = shapes(NOW)
    short = last_hour(hour)
    assert (short.key, short.start, short.end, short.by_model) == ("hour_1h", hour.end - dt.timedelta(hours=1),
                                                                    hour.end, True)  # fmt: skip
    floor = make_floor("org_0000", short, dt.datetime(2026, 11, 30, 8, tzinfo=dt.UTC))
    assert [s.label for s in floor.statements] == ["series", "history series", "breakdown"]  # one bucket: no parts


def test_floor_runs_the_range_its_history_and_the_breakdown() -> None:
    hour, minute = shapes(NOW)
    watermark = dt.datetime(2026, 11, 30, 8, tzinfo=dt.UTC)
    floor = make_floor("org_0000", hour, watermark)
    # 720 buckets: the range in two parts read at once, as build_report reads it (reliability.report._parts)
    assert [s.label for s in floor.statements] == ["series 1/2", "series 2/2", "history series", "breakdown"]
    assert floor.range_series == floor.statements[:2]
    first, second, history, breakdown = floor.statements
    middle = hour.start + dt.timedelta(hours=360)
    assert (first.args[:3], second.args[:3]) == (("org_0000", hour.start, middle), ("org_0000", middle, hour.end))
    assert history.args[:3] == ("org_0000", hour.start - dt.timedelta(days=7), hour.start)  # 7 seasons of 24 h
    assert breakdown.args[:3] == ("org_0000", hour.start, hour.end) and breakdown.args[-1] == BREAKDOWN_ROWS
    assert breakdown.args[6] == "UTC"  # not bucketed: whole hours from errors_hourly whatever the granularity
    minute_floor = make_floor("org_0000", minute, watermark)  # 1,440 buckets: in parts too
    assert [s.label for s in minute_floor.statements] == ["series 1/2", "series 2/2", "history series", "breakdown"]
    assert minute_floor.statements[2].args[1:3] == (minute.start - dt.timedelta(minutes=24), minute.start)


def test_phases_split_wall_time_into_floor_attribution_and_python() -> None:
    # (statement, start, end) in s since the run's start. The series statements run at once and in any order
    # (the last to end closes them); the attribution statements run at once after the detection; the breakdown
    # runs beside everything.
    runs = [
        [("h", 0.000, 0.005), ("s", 0.001, 0.010), ("b", 0.000, 0.020), ("a1", 0.016, 0.030), ("a2", 0.018, 0.040)],
        [("b", 0.000, 0.004), ("s", 0.000, 0.012), ("h", 0.001, 0.003)],
    ]
    out = phases([0.050, 0.030], runs, {"s", "h"}, {"b"}, spikes=1)
    assert out["statements_per_run"] == 5 and out["attribution_statements_per_run"] == 2
    assert out["series_statements_end_ms"]["max"] == 12.0 and out["series_statements_end_ms"]["p50"] == 10.0
    assert out["breakdown_end_ms"]["max"] == 20.0  # it ends after detection began: beside it, not before
    assert out["python_until_attribution_ms"]["max"] == 18.0  # no spike: everything after the floor
    assert out["python_until_attribution_ms"]["p50"] == 6.0 and out["python_until_attribution_ms"]["count"] == 2
    assert out["attribution_span_ms"]["max"] == 24.0 and out["after_attribution_ms"]["max"] == 10.0


def test_summary_holds_the_issue_targets() -> None:
    def single(p50: float, p99: float, ratio: float) -> dict[str, object]:
        return {"gateway": {"latency_ms": {"p50": p50, "p99": p99}}, "ratio_gateway_to_floor": {"p50": ratio}}

    summary = summarize({"single": {"hour_30d": single(39.0, 81.0, 1.5), "minute_24h": single(61.0, 90.0, 9.0)}})
    met = {row["what"]: row["met"] for row in summary["targets"]}
    assert met == {
        "reliability HOUR 30 d, 1 client, p50": True,
        "reliability HOUR 30 d, 1 client, p99": False,
        "gateway / floor latency, HOUR 30 d, p50": True,
        "reliability MINUTE 24 h, 1 client, p50": False,
    }
    assert summary["all_met"] is False
    # With spikes, the ratio is taken against the floor of all the same SQL (their attribution statements too).
    hour = single(39.0, 41.0, 2.5) | {"ratio_gateway_to_floor_with_attribution": {"p50": 1.7, "p99": 2.1}}
    rows = {row["what"]: row["met"] for row in summarize({"single": {"hour_30d": hour}})["targets"]}
    assert rows == {
        "reliability HOUR 30 d, 1 client, p50": True,
        "reliability HOUR 30 d, 1 client, p99": True,
        "gateway / floor latency (with attribution), HOUR 30 d, p50": True,
        "gateway / floor latency (with attribution), HOUR 30 d, p99": False,
    }


def test_profile_areas_name_the_json_writer_apart_from_the_resolver() -> None:
    """Areas go by the first matching prefix: the series' JSON writer is not filed under the resolver's."""
    assert area_of("resolvers/reliability_json.py", "render_series", AREAS).startswith("resolvers.reliability_json")
    assert area_of("resolvers/reliability.py", "resolve_reliability", AREAS).startswith("resolvers.reliability (")
    assert area_of("reliability/sketch.py", "Batch.quantile_table", AREAS).startswith("reliability.sketch")


def test_an_incident_copy_is_reused_only_at_the_code_s_migration_head() -> None:
    wanted = {"source_loaded_at": "2026-11-30T22:31:45", "latency_factor": 3.0}
    info = {"injection": wanted, "migration": "0012", "incidents": {}}
    assert reusable(info, wanted, "0012")
    assert not reusable(info, wanted, "0013")  # the source was upgraded in place: copy again
    assert not reusable(info, wanted | {"latency_factor": 2.0}, "0012")
    assert not reusable(None, wanted, "0012")


def test_the_floor_knows_the_attribution_statements_by_their_start() -> None:
    start = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
    scope = UsageQuery(org_id="org_1", start=start, end=start + dt.timedelta(hours=2), granularity=None)
    for slower_than_ms in (None, 250.0):
        sql, _, _ = compositions_statement([(scope, slower_than_ms), (scope, None)], start)
        assert sql.startswith(COMPOSITIONS_START)
