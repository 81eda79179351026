"""The three-way benchmark's pure parts: reading each system's answer, the row-by-row check, CPU per request,
the medians, the floor's request path, the server's process tree and the docs section."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import urllib.parse
from typing import Any

import pytest

from bench import report
from bench.api.floor import FLOOR_PATH, floor_path
from bench.three_way import (
    AnswerMismatch,
    Question,
    check_same,
    cpu_per_request,
    floor_rows,
    gateway_rows,
    medians,
    peer_rows,
    process_tree,
    ratios,
)

H0 = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
H1 = H0 + dt.timedelta(hours=1)


def gateway_payload(*buckets: tuple[str, str, int]) -> dict[str, Any]:
    series = [{"start": s, "group": {"model": m}, "requests": n, "inputTokens": 10 * n, "cachedInputTokens": n,
               "outputTokens": 2 * n} for s, m, n in buckets]  # fmt: skip
    return {"data": {"usage": {"series": series}}}


def peer_payload(*nodes: tuple[str, str, int]) -> dict[str, Any]:
    return {"data": {"usageSince": {"nodes": [
        {"hour": h, "model": m, "requests": str(n), "inputTokens": str(10 * n), "cachedInputTokens": str(n),
         "outputTokens": str(2 * n)} for h, m, n in nodes]}}}  # fmt: skip


def floor_payload(*rows: tuple[str, str, int]) -> list[dict[str, Any]]:
    return [{"hour": h, "model": m, "requests": n, "input_tokens": 10 * n, "cached_input_tokens": n,
             "output_tokens": 2 * n} for h, m, n in rows]  # fmt: skip


def test_the_three_answers_read_as_the_same_rows() -> None:
    gateway = gateway_rows(gateway_payload(("2026-11-01T00:00:00Z", "a", 3), ("2026-11-01T01:00:00Z", "b", 4)))
    peer = peer_rows(peer_payload(("2026-11-01T00:00:00+00:00", "a", 3), ("2026-11-01T01:00:00+00:00", "b", 4)))
    floor = floor_rows(floor_payload(("2026-11-01T00:00:00+00:00", "a", 3), ("2026-11-01T02:00:00+01:00", "b", 4)))
    assert gateway == [(H0, "a", 3, 30, 3, 6), (H1, "b", 4, 40, 4, 8)]
    assert check_same({"floor": floor, "gateway": gateway, "postgraphile": peer}) == 2


def test_a_different_count_names_the_system_and_the_row() -> None:
    floor = floor_rows(floor_payload(("2026-11-01T00:00:00+00:00", "a", 3), ("2026-11-01T01:00:00+00:00", "b", 4)))
    peer = peer_rows(peer_payload(("2026-11-01T00:00:00+00:00", "a", 3), ("2026-11-01T01:00:00+00:00", "b", 5)))
    with pytest.raises(AnswerMismatch, match="postgraphile differs from floor at row 1"):
        check_same({"floor": floor, "postgraphile": peer})


def test_a_missing_row_or_an_empty_answer_is_a_mismatch() -> None:
    two = floor_rows(floor_payload(("2026-11-01T00:00:00+00:00", "a", 3), ("2026-11-01T01:00:00+00:00", "b", 4)))
    with pytest.raises(AnswerMismatch, match="gateway answered 1 rows, floor 2"):
        check_same({"floor": two, "gateway": two[:1]})
    with pytest.raises(AnswerMismatch, match="floor answered no rows"):
        check_same({"floor": [], "gateway": []})


def test_an_error_answer_or_a_local_time_is_refused() -> None:
    with pytest.raises(AnswerMismatch, match="not an answer"):
        gateway_rows({"data": None, "errors": [{"message": "masked"}]})
    with pytest.raises(ValueError, match="without a time zone"):
        floor_rows(floor_payload(("2026-11-01T00:00:00", "a", 1)))


def test_cpu_per_request_is_cores_times_wall_time_over_requests() -> None:
    cpu = {"wall_s": 10.0, "cores_used": {"server": 0.5, "postgres": 0.25, "wrk": 0.3}}
    assert cpu_per_request(cpu, 1000) == {"server_ms": 5.0, "postgres_ms": 2.5, "total_ms": 7.5}
    assert cpu_per_request({"wall_s": 2.0, "cores_used": {}}, 0) == {"server_ms": 0.0, "postgres_ms": 0.0,
                                                                      "total_ms": 0.0}  # fmt: skip


def _entry(rps: float, cpu_ms: float, single_p50: float) -> dict[str, Any]:
    return {
        "concurrent": {"rps": rps, "latency_ms": {"p50": 100.0, "p99": 200.0},
                       "cpu_ms_per_request": {"server_ms": cpu_ms - 1, "postgres_ms": 1.0, "total_ms": cpu_ms},
                       "cpu": {"cores_used": {"server": 0.7}, "foreign_cores": 0.1}},
        "single": {"latency_ms": {"p50": single_p50, "p99": 2 * single_p50}},
    }  # fmt: skip


def test_medians_over_rounds_and_the_ratios() -> None:
    rounds = [
        {"gateway": _entry(90, 14, 12), "postgraphile": _entry(100, 12, 9)},
        {"gateway": _entry(300, 5, 5), "postgraphile": _entry(110, 13, 10)},
        {"gateway": _entry(200, 6, 6), "postgraphile": _entry(105, 11, 11)},
    ]
    meds = medians(rounds)
    assert meds["gateway"]["rps"] == 200
    assert meds["gateway"]["cpu_ms"] == 6
    assert meds["gateway"]["single_p99_ms"] == 12
    assert meds["postgraphile"]["server_cpu_ms"] == 11
    assert "postgres_cores" not in meds["gateway"]  # not measured: left out, not zero
    assert "floor" not in meds
    assert ratios(meds) == {"gateway_rps_over_postgraphile": 1.9, "gateway_cpu_over_postgraphile": 0.5}


def test_the_floor_path_carries_the_instants_exactly() -> None:
    question = Question.ending_at("org_0001", H0)
    path = floor_path(question.org_id, question.start, question.end)
    assert path.startswith(FLOOR_PATH + "?")
    params = urllib.parse.parse_qs(urllib.parse.urlsplit(path).query)
    assert params["org"] == ["org_0001"]
    assert dt.datetime.fromisoformat(params["from"][0]) == H0 - dt.timedelta(days=30)
    assert dt.datetime.fromisoformat(params["to"][0]) == H0
    assert question.peer_variables() == {"org": "org_0001", "since": "2026-10-02T00:00:00Z"}


def test_the_process_tree_holds_the_children() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        tree = process_tree(os.getpid())
        assert tree[0] == os.getpid()
        assert child.pid in tree
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait()


def _results() -> dict[str, Any]:
    figures = {
        "gateway": {"rps": 91.3, "p50_ms": 172.0, "p99_ms": 269.0, "server_cpu_ms": 8.4, "postgres_cpu_ms": 5.9,
                    "cpu_ms": 14.3, "server_cores": 0.76, "postgres_cores": 0.54, "single_p50_ms": 12.7,
                    "single_p99_ms": 17.3, "foreign_cores": 0.2},
        "postgraphile": {"rps": 102.8, "p50_ms": 151.0, "p99_ms": 327.0, "server_cpu_ms": 10.4,
                         "postgres_cpu_ms": 2.2, "cpu_ms": 12.6, "single_p50_ms": 9.6, "single_p99_ms": 23.9},
    }  # fmt: skip
    return {
        "date": "2026-11-30T14:00:00+00:00",
        "git": {"commit": "0123456789abcdef", "dirty_files": []},
        "environment": {"cpus": 2, "postgraphile": "5.1.5", "node": "v20.20.2"},
        "postgres_connection": {"transport": "unix socket"},
        "question": {"org": "org_0000", "from": "2026-10-31T13:00:00Z", "to": "2026-11-30T13:00:00Z"},
        "answers": {"rows": 2160, "hours": 720, "models": ["a", "b", "c"]},
        "dataset": {"database": "bench_graphql_3000000", "params": {"events": 3_000_000}},
        "settings": {"connections": 16, "window_s": 15, "single_window_s": 15},
        "rounds": [{}, {}, {}],
        "medians": figures,
        "ratios": ratios(figures),
    }


def test_the_docs_section_renders_the_table() -> None:
    section = report.generate(None, None, None, _results())[report.THREE_WAY]
    assert section.startswith("## Three-way: gateway, PostGraphile, floor\n")
    assert "| 91.3 | 172 | 269 | 8.4 + 5.9 = 14.3 | 0.76 + 0.54 | 12.7 / 17.3 |" in section
    assert "| PostGraphile 5.1.5 over a SETOF SQL function on `usage_hourly_model` | 102.8 | 151 | 327 |" in section
    assert "2,160 rows (720 hours × 3 models)" in section
    assert "0.89× PostGraphile's requests/s at 1.13× its CPU per request" in section
    assert "Medians of 3 interleaved rounds" in section


def test_the_docs_page_places_the_section_after_the_usage_queries() -> None:
    existing = "# Benchmarks\n\nintro\n\n## Usage queries\n\nold\n\n## GraphQL\n\nold\n"
    page = report.assemble(existing, report.generate(None, None, None, _results()))
    headings = [line for line in page.splitlines() if line.startswith("## ")]
    assert headings == ["## Usage queries", "## Three-way: gateway, PostGraphile, floor", "## GraphQL"]
    assert report.THREE_WAY not in report.generate(None, None, None, None)
