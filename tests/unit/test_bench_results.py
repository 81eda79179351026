"""The refactored benchmarks still read their recorded results as before: the summaries recomputed from
``bench/results/*.json`` equal the recorded ones, and ``bench.report`` leaves docs/benchmarks.md as it is."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench import report
from bench.api.summary import summarize as summarize_api
from bench.ingestion.plan import DEFAULT_LATENCY_RUNS, default_sweep, parse_configs, parse_latency_runs
from bench.ingestion.summary import summarize as summarize_ingest

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results"


def results(name: str) -> dict[str, Any]:
    return dict(json.loads((RESULTS / name).read_text()))


# graphql_quick.json and ingest_0c43c25.json were summarized by older code (other targets): not compared
@pytest.mark.parametrize("name", ["graphql.json", "graphql_tcp_bbr.json", "graphql_tcp_cubic.json"])
def test_api_summary_is_recomputed_as_recorded(name: str) -> None:
    recorded = results(name)
    assert summarize_api(recorded) == recorded["summary"]


@pytest.mark.parametrize("name", ["ingest.json", "ingest_batch20000_partial.json"])
def test_ingest_summary_is_recomputed_as_recorded(name: str) -> None:
    recorded = results(name)
    assert summarize_ingest(recorded["runs"], recorded["setting_defaults"]) == recorded["summary"]


def test_report_leaves_the_page_as_it_is() -> None:
    """docs/benchmarks.md is what ``python -m bench.report`` writes from the recorded results (a hand edit of a
    generated section would be lost on the next run)."""
    page = (ROOT / "docs" / "benchmarks.md").read_text()
    others = {p.name: results(p.name) for p in sorted(RESULTS.glob("graphql_tcp*.json"))}
    generated = report.generate(results("graphql.json"), results("ingest.json"), others)
    assert report.assemble(page, generated) == page


def test_latency_runs_and_configs_parse() -> None:
    defaults = {"batch_events": 5000, "prefetch": 2000, "max_age_ms": 100}
    runs = parse_latency_runs(DEFAULT_LATENCY_RUNS)
    assert runs[0] == (5000, 1, None)
    assert runs[-1] == (5000, 10, {"batch_events": None, "prefetch": 8000, "max_age_ms": None})
    assert parse_configs("1000//50,/4000/", defaults) == [
        {"batch_events": 1000, "prefetch": 2000, "max_age_ms": 50},
        {"batch_events": 5000, "prefetch": 4000, "max_age_ms": 100},
    ]
    sweep = default_sweep(defaults, single=False)
    assert sweep[0] == sweep[-1] == defaults
    assert {"batch_events": 20000, "prefetch": 2000, "max_age_ms": 100} in sweep
    assert defaults not in sweep[1:-1]  # each setting varied on its own, the defaults only at both ends
