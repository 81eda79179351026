"""The benchmarks' shared harness: statistics, distributions, profiles, logs and CPU windows (bench/harness)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from bench.harness.cpu import CpuSample, CpuSampler, MachineCpu, ProcessGroups
from bench.harness.servers import log_problems, log_summary
from bench.harness.stats import distribution, fine_seconds_summary, latency_summary_ms, pct, seconds_summary
from bench.harness.wrk import HttpTarget, graphql_target
from bench.profiles import profile_text


def test_pct_is_nearest_rank() -> None:
    values = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert [pct(values, q) for q in (0.0, 0.2, 0.5, 0.9, 1.0)] == [1.0, 1.0, 3.0, 5.0, 5.0]
    assert math.isnan(pct([], 0.5))


def test_summaries_keep_the_results_files_shapes() -> None:
    seconds = [0.001 * n for n in range(1, 101)]
    assert latency_summary_ms(seconds) == {"count": 100, "p50": 50.0, "p90": 90.0, "p99": 99.0, "max": 100.0,
                                           "mean": 50.5}  # fmt: skip
    assert list(seconds_summary(seconds)) == ["count", "p50", "p90", "p99", "max", "mean"]
    assert list(fine_seconds_summary(seconds)) == ["count", "p50", "p90", "p99", "p999", "max", "mean"]
    assert latency_summary_ms([]) == seconds_summary([]) == {"count": 0}
    assert fine_seconds_summary([]) == {}
    assert distribution([0.12345], digits=3) == {"count": 1, "p50": 0.123, "p90": 0.123, "p99": 0.123,
                                                  "max": 0.123, "mean": 0.123}  # fmt: skip


def test_log_summary_counts_problems_of_json_and_plain_lines(tmp_path: Path) -> None:
    log = tmp_path / "gateway.log"
    lines = [
        {"level": "info", "event": "started"},
        {"level": "warning", "event": "slow flush"},
        {"level": "warning", "event": "slow flush"},
        {"level": "error", "event": "flush failed"},
    ]
    log.write_text("\n".join(json.dumps(x) for x in lines) + "\nTraceback (most recent call last):\n\nplain\n")
    summary = log_summary(log)
    assert summary["levels"] == {"info": 1, "warning": 2, "error": 1}
    assert summary["warnings_and_errors"] == {
        "warning: slow flush": 2, "error: flush failed": 1, "Traceback (most recent call last):": 1,
    }  # fmt: skip
    assert summary["non_json_lines"] == 2
    assert log_problems(log) == summary["warnings_and_errors"]


def test_profile_text_lists_each_section() -> None:
    summary = {"samples": 200, "busy_share_of_one_core": 0.5,
               "top_self": [{"function": "f (a.py)", "samples": 50, "share": 0.25}]}  # fmt: skip
    text = profile_text(summary, [("self time", "top_self")], title="title")
    assert text.split("\n") == ["title", "py-spy samples: 200 (busy share of one core: 0.5)", "",
                                 "== self time", " 25.0%      50  f (a.py)", ""]  # fmt: skip
    assert not profile_text(summary, []).startswith("title")


def test_wrk_script_carries_the_body_and_token() -> None:
    lua = graphql_target("{ viewer { subject } }", None, "tok").lua()
    assert 'wrk.method = "POST"' in lua
    assert 'wrk.body = [==[{"query":"{ viewer { subject } }","variables":{}}]==]' in lua
    assert 'wrk.headers["Authorization"] = "Bearer tok"' in lua
    assert "Authorization" not in HttpTarget("/bench/plain").lua()


def test_this_process_is_the_bench_group() -> None:
    groups = ProcessGroups({}, ("bench_db",))
    assert groups.classify(os.getpid()) == "bench"
    assert ProcessGroups({os.getpid(): "api_gateway"}, ()).classify(os.getpid()) == "api_gateway"


def test_sampler_window_cuts_between_the_nearest_samples() -> None:
    sampler = CpuSampler(None, "bench_db")
    sampler.samples = [
        CpuSample(100.0, {"gateway": 0.0}, MachineCpu(0.0, 0.0, 0.0)),
        CpuSample(101.0, {"gateway": 0.5, "postgres": 0.2}, MachineCpu(1.0, 2.0, 0.1)),
        CpuSample(103.0, {"gateway": 2.5, "postgres": 1.2}, MachineCpu(5.0, 6.0, 0.3)),
    ]
    window = sampler.window(101.0, 102.5)
    assert window["wall_s"] == 2.0
    assert window["cpu_s"]["gateway"] == 2.0
    assert window["cpu_s"]["interrupts"] == 0.2
    assert window["cpu_s"]["other"] == 0.8  # busy 4.0 - gateway 2.0 - postgres 1.0 - interrupts 0.2
    assert window["cores_used"]["other"] == 0.4
    assert window["machine_busy_cores"] == 2.0
    assert window["machine_cores"] == 2.0
