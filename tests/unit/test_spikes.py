"""Spike detection (reliability/spikes.py) on synthetic HOUR series, and a short detection-quality run."""

from __future__ import annotations

import json
import math
import random
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.detection_quality import DOC, HEADING, RESULTS, Config, poisson, run, sample_p95_p99, section
from reliability.spikes import (
    ALPHA_CANDIDATE,
    LATENCY_SCREEN_RATIO,
    MAD_TO_SD,
    MAX_DISPERSION,
    MAX_PASSES,
    MIN_LATENCY_RATIO,
    MIN_RATIO,
    MIN_REFS,
    MIN_REQUESTS,
    MIN_WINDOW_BUCKETS,
    MIN_WINDOW_REQUESTS,
    PERIODS,
    SCALE_FLOOR,
    TRAILING,
    Z_SCREEN,
    Columns,
    Detection,
    Metric,
    Point,
    Severity,
    _candidates,
    _lagged,
    _latency_candidates,
    _matrix,
    _median_sorted,
    _screen,
    detect,
    detect_all,
    lookback,
    poisson_sf,
    poisson_sf_below,
    poisson_sf_below_each,
)

DAY = 24
HISTORY = 7 * DAY


def steady(seed: int, volume: float = 1000, rate: float = 0.01, days: int = 30, sigma: float = 0.6) -> list[Point]:
    """Hourly buckets with daily seasonality, Poisson counts and log-normal latency (p95/p99 as order statistics)."""
    rng = random.Random(seed)  # noqa: S311 - reproducible traffic, not secrets
    points = []
    for t in range(days * DAY):
        wave = math.sin(2 * math.pi * (t % DAY) / DAY)
        n = poisson(rng, volume * (1 + 0.5 * wave))
        if n == 0:
            points.append(Point(0, 0, None, None))
            continue
        p95, p99 = sample_p95_p99(rng, n, (math.log(800) + 0.05 * wave, sigma, 0.001, 0.0, 0.0))
        points.append(Point(n, poisson(rng, n * rate), p95, p99))
    return points


def with_errors(points: list[Point], buckets: range, factor: float) -> list[Point]:
    out = list(points)
    for t in buckets:
        p = out[t]
        out[t] = replace(p, errors=min(p.requests, round(p.errors + (factor - 1) * 0.01 * p.requests)))
    return out


def errors_only(found: list[Detection]) -> list[Detection]:
    return [d for d in found if d.metric == Metric.ERROR_RATE]


@pytest.mark.parametrize(("seed", "volume"), [(1, 150), (2, 1000), (3, 20_000), (4, 60)])
def test_steady_series_has_no_spike(seed: int, volume: float) -> None:
    assert detect(steady(seed, volume), HISTORY, DAY) == []


def test_an_injected_error_burst_is_found_in_its_buckets() -> None:
    points = with_errors(steady(15), range(500, 503), factor=8)
    [spike] = detect(points, HISTORY, DAY)
    assert (spike.metric, spike.first, spike.last) == (Metric.ERROR_RATE, 500, 502)
    assert spike.observed == pytest.approx(8 * 0.01, rel=0.2)
    assert spike.baseline == pytest.approx(0.01, rel=0.2)
    assert spike.severity == Severity.CRITICAL  # 8x and 7 points above the baseline
    assert spike.reference == range(500 - lookback(DAY), 500)


def test_a_smaller_burst_is_a_warning() -> None:
    [spike] = detect(with_errors(steady(6, volume=5000), range(400, 402), factor=2.5), HISTORY, DAY)
    assert (spike.first, spike.last, spike.severity) == (400, 401, Severity.WARNING)


def test_one_error_in_three_requests_is_not_a_spike() -> None:
    quiet = [Point(3, 0, 900.0, 950.0)] * (10 * DAY)
    assert detect([*quiet, Point(3, 1, 900.0, 950.0)], len(quiet), DAY) == []
    busy = steady(7)
    busy[400] = Point(3, 1, 900.0, 950.0)  # 33 % of 3 requests, in a series at 1 %
    assert detect(busy, HISTORY, DAY) == []


def test_few_requests_or_few_errors_are_not_a_spike_however_unlikely() -> None:
    """A series at 0.1 %: 3 of 3 failing, 6 of 20, or 4 of 50 would pass the count test, but are too small to
    judge (fewer than MIN_REQUESTS requests, fewer than MIN_ERRORS errors)."""
    quiet = steady(14, rate=0.001)
    for requests, errors, spike in ((3, 3, False), (20, 6, False), (50, 4, False), (50, 8, True)):
        points = list(quiet)
        points[400] = Point(requests, errors, 900.0, 950.0)
        assert bool(errors_only(detect(points, HISTORY, DAY))) is spike, (requests, errors)


def test_adjacent_anomalous_buckets_merge_and_a_gap_splits() -> None:
    points = with_errors(steady(8), range(300, 304), factor=8)
    points = with_errors(points, range(310, 312), factor=8)
    spans = [(d.first, d.last) for d in errors_only(detect(points, HISTORY, DAY))]
    assert spans == [(300, 303), (310, 311)]


def test_history_shorter_than_lookback_falls_back() -> None:
    points = steady(9, days=3)
    points = with_errors(points, range(30, 32), factor=8)
    slow = [replace(p, p95_ms=(p.p95_ms or 0) * 3) for p in points[50:52]]
    points[50:52] = slow
    found = detect(points, 12, DAY)  # 12 buckets of history, no day before for the first day
    assert [(d.metric, d.first, d.last) for d in found if d.metric != Metric.LATENCY_P99] == [
        (Metric.ERROR_RATE, 30, 31),
        (Metric.LATENCY_P95, 50, 51),
    ]


def test_no_history_at_all_and_no_season() -> None:
    points = with_errors(steady(10, days=2), range(40, 41), factor=10)
    assert [(d.first, d.last) for d in errors_only(detect(points, 0, None))] == [(40, 40)]
    assert detect(points[:3], 0, None) == []  # too little to build any baseline: no verdict


def test_only_buckets_from_evaluate_from_are_reported() -> None:
    points = with_errors(steady(11), range(200, 202), factor=8)
    assert errors_only(detect(points, 202, DAY)) == []
    assert [(d.first, d.last) for d in detect(points, 200, DAY)] == [(200, 201)]


def test_a_latency_regression_is_found_on_p95_and_p99() -> None:
    points = steady(12, volume=3000)
    for t in range(600, 603):
        p = points[t]
        points[t] = replace(p, p95_ms=(p.p95_ms or 0) * 1.6, p99_ms=(p.p99_ms or 0) * 1.6)
    found = detect(points, HISTORY, DAY)
    assert {(d.metric, d.first, d.last) for d in found} == {
        (Metric.LATENCY_P95, 600, 602),
        (Metric.LATENCY_P99, 600, 602),
    }
    p95 = next(d for d in found if d.metric == Metric.LATENCY_P95)
    assert p95.observed / p95.baseline == pytest.approx(1.6, rel=0.15)
    assert p95.severity == Severity.WARNING


@pytest.mark.parametrize("seed", [20, 21])
def test_a_run_of_weaker_latency_buckets_pools(seed: int) -> None:
    """p95 x1.5 for 4 hours at about 130 requests an hour: no single hour passes z 5, the run does."""
    points = steady(seed, volume=250)
    for t in range(400, 404):
        points[t] = replace(points[t], p95_ms=(points[t].p95_ms or 0) * 1.5)
    assert [(d.metric, d.first, d.last) for d in detect(points, HISTORY, DAY)] == [(Metric.LATENCY_P95, 400, 403)]


@pytest.mark.parametrize(("factor", "days"), [(2, 3), (3, 8)])
def test_a_lasting_level_shift_stops_being_a_spike(factor: float, days: int) -> None:
    """After a deploy that raises the error rate for good, the baseline learns the new level (anomalous buckets
    enter it winsorized, not replaced, or it would never learn)."""
    points = with_errors(steady(13, volume=2000), range(300, 720), factor=factor)
    spikes = errors_only(detect(points, HISTORY, DAY))
    assert spikes[0].first == 300
    assert all(s.last < 300 + days * DAY for s in spikes)  # flagged while new, then the new normal


def test_lookback() -> None:
    assert lookback(24) == PERIODS * 24 == 168
    assert lookback(7) == 49
    assert lookback(None) == TRAILING


@pytest.mark.parametrize(("k", "mean"), [(1, 0.5), (5, 1.0), (27, 10.0), (150, 100.0), (60, 80.0), (3, 5.0)])
def test_poisson_tail_matches_the_exact_sum(k: int, mean: float) -> None:
    exact = 1 - sum(math.exp(-mean) * mean**i / math.factorial(i) for i in range(k))
    assert poisson_sf(k, mean) == pytest.approx(exact, rel=1e-9, abs=1e-15)


@settings(max_examples=2000, deadline=None)
@given(
    k=st.one_of(st.floats(0.01, 500), st.integers(1, 400).map(float)),
    mean=st.floats(0.001, 400),
    alpha=st.sampled_from([1e-2, 1e-6, 0.5]),
)
def test_the_quick_tail_test_decides_as_the_tail_does(k: float, mean: float, alpha: float) -> None:
    """The first-term lower bound only ever answers "not below alpha" where the full tail agrees."""
    assert poisson_sf_below(k, mean, alpha) == (poisson_sf(k, mean) < alpha)


def test_short_quality_run_meets_the_targets() -> None:
    """A small version of ``python -m bench.detection_quality``: the issue's targets on 400 series."""
    summary = run(Config(series=400, steady=0.4, seed=3), progress=False)["summary"]
    assert summary["false_per_1000_steady_series_days"] <= 1.0
    assert summary["error_target_reachable"]["recall"] >= 0.95
    assert summary["latency_target"]["recall"] >= 0.95
    assert summary["attribution_first"] >= 0.95
    assert summary["precision"] >= 0.95


def test_the_benchmark_section_is_rendered_from_the_recorded_results() -> None:
    """docs/benchmarks.md's section is what ``python -m bench.detection_quality --render`` makes of the JSON."""
    recorded = json.loads(RESULTS.read_text())
    page = DOC.read_text()
    start = page.index(HEADING + "\n")
    end = page.find("\n## ", start)
    assert page[start : end + 1 if end >= 0 else len(page)] == section(recorded) + ("\n" if end >= 0 else "")


class _References:
    """The same bucket 1..PERIODS seasons back; else (fewer than MIN_REFS) the last TRAILING buckets. NaNs left out
    (the latency detector's references, as it once chose them bucket by bucket)."""

    def __init__(self, logs: list[float], season: int | None) -> None:
        self.logs, self.season = logs, season

    def __call__(self, t: int) -> list[float]:
        if self.season:
            refs = [self.logs[t - self.season * k] for k in range(1, PERIODS + 1) if t - self.season * k >= 0]
            refs = [v for v in refs if v == v]
            if len(refs) >= MIN_REFS:
                return refs
        return [v for v in self.logs[max(0, t - TRAILING) : t] if v == v]


def _sampling_noise_one_by_one(logs: list[float], counts: list[int], lag: int) -> float:
    diffs = sorted(
        abs(logs[t] - logs[t - lag]) / math.sqrt(1 / counts[t] + 1 / counts[t - lag])
        for t in range(lag, len(logs))
        if logs[t] == logs[t] and logs[t - lag] == logs[t - lag]
    )
    return MAD_TO_SD * _median_sorted(diffs) if len(diffs) >= 10 else 0.0


def _latency_candidates_one_by_one(
    logs: list[float], counts: list[int], start: int, season: int | None
) -> dict[int, tuple[float, float]]:
    """The latency detector's candidates as it once found them, bucket by bucket (before the matrices)."""
    screen = math.log(LATENCY_SCREEN_RATIO)
    references = _References(logs, season)
    noise = -1.0
    candidates = {}
    for t in range(max(start, 1), len(logs)):
        x = logs[t]
        if x != x:
            continue
        refs = references(t)
        if len(refs) < MIN_REFS:
            continue
        refs.sort()
        median = _median_sorted(refs)
        if x - median < screen:
            continue
        spread = MAD_TO_SD * _median_sorted(sorted(abs(r - median) for r in refs))
        noise = _sampling_noise_one_by_one(logs, counts, season or 1) if noise < 0 else noise
        z = (x - median) / max(spread, noise / math.sqrt(counts[t]), SCALE_FLOOR)
        if z >= Z_SCREEN:
            candidates[t] = (median, z)
    return candidates


@settings(max_examples=300, deadline=None)
@given(
    # Latencies on a coarse grid (ties), some buckets with too few requests or none (None), a few outliers.
    series=st.lists(
        st.tuples(
            st.sampled_from([0, 50, 150, 400, 5000]), st.one_of(st.none(), st.integers(1, 60).map(lambda i: i * 25.0))
        ),
        min_size=10,
        max_size=200,
    ),
    start=st.integers(0, 60),
    season=st.sampled_from([None, 1, 3, 7, 24]),
)
def test_the_latency_matrices_find_exactly_the_candidates_and_spikes_of_the_bucket_loop(
    series: list[tuple[int, float | None]], start: int, season: int | None
) -> None:
    counts = [n for n, _ in series]
    values = [v if n else None for n, v in series]
    logs = [math.log(v) if n >= 100 and v else math.nan for n, v in zip(counts, values, strict=True)]
    expected = _latency_candidates_one_by_one(logs, counts, start, season)
    assert _latency_candidates([logs], [counts], start, season) == [expected]
    # Several series at once (as a report's models): each finds its own.
    other = logs[::-1]
    assert _latency_candidates([logs, other, logs], [counts, counts[::-1], counts], start, season) == [
        expected,
        _latency_candidates_one_by_one(other, counts[::-1], start, season),
        expected,
    ]
    nothing = [0] * len(counts)
    found = detect(Columns(counts, nothing, values, [None] * len(counts)), start, season)
    assert all(d.metric == Metric.LATENCY_P95 and d.first in expected and d.last in expected for d in found)
    assert all(math.log(d.observed / d.baseline) >= math.log(MIN_LATENCY_RATIO) - 1e-12 for d in found)


def _screened(logs: list[float], start: int, season: int | None, screen: float) -> list[int]:
    """``_screen`` of one series, as indexes."""
    return np.flatnonzero(_screen(np.asarray(logs, dtype=np.float64)[None, :], start, season, screen)[0]).tolist()


def _screened_one_by_one(logs: list[float], start: int, season: int | None, screen: float) -> list[int]:
    """The latency loop's first test as it was written bucket by bucket (before ``_screened``)."""
    references = _References(logs, season)
    kept = []
    for t in range(start, len(logs)):
        x = logs[t]
        if x != x:
            continue
        refs = references(t)
        if len(refs) < MIN_REFS or x - screen < min(refs):
            continue
        kept.append(t)
    return kept


@settings(max_examples=300, deadline=None)
@given(
    # Log latencies in 0..12 on a 0.01 grid (ties included), about one in twelve NaN (too few requests).
    logs=st.lists(st.integers(-100, 1200).map(lambda i: math.nan if i < 0 else i / 100), min_size=20, max_size=120),
    start=st.integers(0, 40),
    season=st.sampled_from([None, 1, 3, 7, 24]),
    screen=st.sampled_from([math.log(LATENCY_SCREEN_RATIO), 0.0, 0.5]),
)
def test_the_vectorised_screen_keeps_exactly_the_buckets_the_loop_would_test(
    logs: list[float], start: int, season: int | None, screen: float
) -> None:
    assert _screened(logs, start, season, screen) == _screened_one_by_one(logs, start, season, screen)


@settings(max_examples=300, deadline=None)
@given(
    rows=st.integers(1, 60).flatmap(lambda width: st.lists(  # series of one width
        st.lists(st.one_of(st.just(math.nan), st.integers(0, 50).map(float)), min_size=width, max_size=width),
        min_size=1, max_size=3,
    )),
    step=st.integers(1, 30),
    lags=st.integers(1, 40),
)  # fmt: skip
def test_lagged_counts_and_minima_are_those_of_each_buckets_lags(rows: list[list[float]], step: int, lags: int) -> None:
    count, smallest = _lagged(np.asarray(rows), step, lags)
    for r, row in enumerate(rows):
        for t in range(len(row)):
            lagged = [row[t - step * k] for k in range(1, lags + 1) if t - step * k >= 0]
            present = [v for v in lagged if not math.isnan(v)]
            assert count[r, t] == len(present)
            assert smallest[r, t] == min(present, default=math.inf)


def _candidates_one_by_one(requests: list[int], errors: list[int], size: int) -> dict[int, tuple[float, float]]:
    """The error-rate detector's candidates as it once found them, in one pass over running sums (before the numpy
    passes). Bucket t is tested against buckets t - size + 1 .. t - 1: the sums drop bucket t - size first."""
    n_points = len(requests)
    cleaned, chi2, tested = [0.0] * n_points, [0.0] * n_points, [0] * n_points
    e_sum = chi_sum = 0.0
    n_sum = k_sum = 0
    found: dict[int, tuple[float, float]] = {}
    # Buckets before the first with traffic leave every sum and entry at zero: start there (a report's history
    # often reaches before the org's first request).
    first = next((t for t, (n, e) in enumerate(zip(requests, errors, strict=True)) if n or e), n_points)
    for t in range(first, n_points):
        if t >= size:
            old = t - size
            e_sum -= cleaned[old]
            n_sum -= requests[old]
            chi_sum -= chi2[old]
            k_sum -= tested[old]
        n, e = requests[t], errors[t]
        kept = float(e)
        if n and n_sum >= MIN_WINDOW_REQUESTS and t >= MIN_WINDOW_BUCKETS:
            expected = n * (e_sum + 1.0) / n_sum
            residual = (e - expected) ** 2 / expected
            if n >= MIN_REQUESTS and e >= MIN_RATIO * expected and e > expected:
                phi = min(MAX_DISPERSION, max(1.0, chi_sum / k_sum)) if k_sum >= MIN_REFS else 1.0
                if poisson_sf_below(e / phi, expected / phi, ALPHA_CANDIDATE):
                    found[t] = (expected, phi)
                    kept, residual = min(e, MIN_RATIO * expected), 1.0
            chi2[t], tested[t] = residual, 1
            chi_sum += residual
            k_sum += 1
        cleaned[t] = kept
        e_sum += kept
        n_sum += n
    return found


def _assert_same_candidates(got: dict[int, tuple[float, float]], expected: dict[int, tuple[float, float]]) -> None:
    """The same buckets, ascending; expected counts and dispersions equal but for rounding (window sums are added
    in another order)."""
    assert list(got) == list(expected)
    for t, (count, phi) in expected.items():
        assert got[t] == pytest.approx((count, phi), rel=1e-9, abs=0), t


@st.composite
def _error_counts(draw: st.DrawFn, length: int) -> tuple[list[int], list[int]]:
    """One series' requests and errors, Poisson counts in runs: steady traffic (volumes that never, rarely or
    always fill a window, a few error rates), none, bursts of 1-6 buckets at 3-20x the rate (adjacent candidates)
    and lasting shifts of the rate."""
    rng = random.Random(draw(st.integers(0, 2**32 - 1)))  # noqa: S311 - reproducible traffic, not secrets
    requests: list[int] = []
    errors: list[int] = []
    volume, rate = 300.0, 0.01
    while len(requests) < length:
        kind = draw(st.sampled_from(["steady", "steady", "none", "burst", "shift"]))
        now, run = rate, draw(st.integers(1, 120))
        if kind == "steady":
            volume, rate = draw(st.sampled_from([3.0, 40.0, 300.0, 5000.0])), draw(st.sampled_from([0, 1e-3, 0.01]))
            now = rate
        elif kind == "burst":
            now, run = max(rate, 0.005) * draw(st.sampled_from([3, 8, 20])), draw(st.integers(1, 6))
        elif kind == "shift":
            now = max(rate, 0.005) * draw(st.sampled_from([1.5, 2, 5]))
        for _ in range(min(run, length - len(requests))):
            n = 0 if kind == "none" else poisson(rng, volume)
            requests.append(n)
            errors.append(min(n, poisson(rng, n * min(1.0, now))))
    return requests, errors


@settings(max_examples=200, deadline=None)
@given(
    data=st.data(),
    lengths=st.lists(st.integers(0, 400), min_size=1, max_size=6),
    size=st.sampled_from([1, 2, 3, 7, lookback(None), lookback(7), lookback(24)]),
    passes=st.sampled_from([1, 2, MAX_PASSES]),
)
def test_the_candidate_passes_find_exactly_the_candidates_of_the_bucket_loop(
    data: st.DataObject, lengths: list[int], size: int, passes: int
) -> None:
    """Several series at once (of different lengths: the shorter padded), each's candidates those of the loop;
    after 1 or 2 passes, unsettled series are finished bucket by bucket from where they changed."""
    series = [data.draw(_error_counts(length)) for length in lengths]
    found = _candidates(_matrix([r for r, _ in series]), _matrix([e for _, e in series]), size, passes)
    for (requests, errors), got in zip(series, found, strict=True):
        _assert_same_candidates(got, _candidates_one_by_one(requests, errors, size))


@pytest.mark.parametrize("size", [lookback(24), lookback(None)])
def test_a_report_of_series_finds_the_candidates_of_the_bucket_loop(size: int) -> None:
    """20 models' series of 888 HOUR buckets (a week of history and 30 days), steady at 50-5000 requests an hour,
    with bursts and a lasting shift: the same candidates, and the same error-rate spikes."""
    series = [steady(seed, volume=50 + 250 * seed, days=37) for seed in range(20)]
    series[3] = with_errors(series[3], range(400, 404), factor=8)
    series[11] = with_errors(series[11], range(600, 603), factor=3)
    series[17] = with_errors(series[17], range(300, 888), factor=2)
    columns = [Columns.of(s) for s in series]
    found = _candidates(_matrix([c.requests for c in columns]), _matrix([c.errors for c in columns]), size)
    for c, got in zip(columns, found, strict=True):
        _assert_same_candidates(got, _candidates_one_by_one(list(c.requests), list(c.errors), size))
    season = 24 if size == lookback(24) else None
    together = [errors_only(found) for found in detect_all(columns, HISTORY, season)]
    assert together == [errors_only(detect(s, HISTORY, season)) for s in series]
    assert [(d.first, d.last) for d in together[3]] == [(400, 403)]


def _mean_at(k: float, alpha: float) -> float:
    """The mean at which P(X >= k) = alpha (bisection: the tail grows with the mean)."""
    low, high = 1e-9, k + 50 * math.sqrt(k) + 100
    for _ in range(100):
        middle = (low + high) / 2
        low, high = (middle, high) if poisson_sf(k, middle) < alpha else (low, middle)
    return low


@settings(max_examples=200, deadline=None)
@given(
    pairs=st.lists(st.tuples(st.floats(0.01, 3000), st.floats(0.001, 3000)), min_size=1, max_size=40),
    near=st.lists(
        st.tuples(st.floats(0.01, 2000), st.sampled_from([0.0, 1e-12, -1e-12, 1e-9, -1e-9, 1e-6, -1e-6, 1e-3, -1e-3])),
        max_size=6,
    ),
    alpha=st.sampled_from([1e-2, 1e-6, 0.5]),
)
def test_the_vectorised_tail_test_answers_as_the_scalar_one(
    pairs: list[tuple[float, float]], near: list[tuple[float, float]], alpha: float
) -> None:
    """On any pairs, and on pairs whose tail is within a hair of alpha."""
    pairs = pairs + [(k, _mean_at(k, alpha) * (1 + shift)) for k, shift in near]
    k, mean = np.array(pairs).T
    assert poisson_sf_below_each(k, mean, alpha).tolist() == [poisson_sf_below(a, b, alpha) for a, b in pairs]


def test_no_series_finds_nothing() -> None:
    assert detect_all([], HISTORY, DAY) == []
    assert detect([], 0, None) == []


def test_series_quiet_in_the_range_are_left_out_and_the_others_find_what_they_would_alone() -> None:
    """A model with traffic in the history but none from ``evaluate_from`` on has no bucket that could be a spike:
    it finds nothing, without its screens; beside it, the other series find what they find on their own."""
    busy = with_errors(steady(5, volume=2000, days=9), range(HISTORY + 20, HISTORY + 23), factor=10)
    quiet = steady(6, volume=2000, days=9)[:HISTORY] + [Point(0, 0, None, None)] * (2 * DAY)
    alone = detect_all([busy], HISTORY, DAY)
    assert [(d.first, d.last) for d in errors_only(alone[0])] == [(HISTORY + 20, HISTORY + 22)]
    assert detect_all([quiet, busy, quiet], HISTORY, DAY) == [[], alone[0], []]
    assert detect_all([quiet, quiet], HISTORY, DAY) == [[], []]
    assert detect(quiet, HISTORY, DAY) == []  # the one-series path agrees
