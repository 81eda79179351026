"""Spike detection on one series of contiguous buckets (one org, or one model of it).

Error rate: each bucket's error count is tested against a trailing pooled rate (a one-sided Poisson tail, scaled
for over-dispersion); buckets that pass a lenient screen join adjacent ones into runs, and a run is a spike when its
pooled counts pass the strict test. Latency percentiles: on log scale, each bucket against the median of the same
bucket a day (or period) before, up to a week back, with a band from the MAD of those references and the series'
sampling noise (a Hampel filter per bucket, seasonal where history allows, a trailing window where it does not);
screened buckets form runs, and a run is a spike when its pooled robust z and its rise are large enough.

The method, every parameter and why: docs/spike-detection.md.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import numpy.typing as npt

FloatMatrix = npt.NDArray[np.float64]
FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
_N = TypeVar("_N", bound=np.generic)


class Metric(enum.StrEnum):
    ERROR_RATE = "ERROR_RATE"
    LATENCY_P95 = "LATENCY_P95"
    LATENCY_P99 = "LATENCY_P99"


class Severity(enum.StrEnum):
    WARNING = "WARNING"
    CRITICAL = "CRITICAL"


@dataclass(frozen=True, slots=True)
class Point:
    """One bucket of one series; buckets are contiguous (a bucket with no traffic has ``requests == 0``)."""

    requests: int
    errors: int  # status >= 500
    p95_ms: float | None  # None when requests == 0
    p99_ms: float | None


@dataclass(frozen=True)
class Detection:
    metric: Metric
    first: int  # index (into points) of the first anomalous bucket
    last: int  # index of the last one, inclusive
    observed: float  # ERROR_RATE: errors/requests over first..last; LATENCY_*: the worst bucket's value (ms)
    baseline: float  # what the baseline expected for the same buckets (a rate, or ms)
    severity: Severity
    reference: range  # the buckets the baseline was built from (attribution compares with their composition)


# --- parameters (docs/spike-detection.md says why) -----------------------------------------------------------------

PERIODS = 7  # seasonal references: the same bucket 1..7 periods back (a day..a week for HOUR)
TRAILING = 24  # without a season (or too little history for one): this many buckets back
MIN_REFS = 3  # fewer usable references than this: no baseline, no verdict

MIN_REQUESTS = 30  # error rate: a bucket with fewer requests is never anomalous on its own
MIN_ERRORS = 5  # ... nor a spike with fewer errors in all
MIN_WINDOW_REQUESTS = 200  # requests in the trailing window needed for a baseline rate ...
MIN_WINDOW_BUCKETS = 6  # ... over at least this many buckets
ALPHA_CANDIDATE = 1e-2  # lenient per-bucket screen: joins a run
ALPHA = 1e-6  # strict test of a run's pooled counts
MIN_RATIO = 1.5  # the observed rate must be at least this multiple of the baseline
MAX_DISPERSION = 50.0

MIN_REQUESTS_P95 = 100  # latency: requests a bucket needs (5 beyond its p95) ...
MIN_REQUESTS_P99 = 1000  # ... (10 beyond its p99: timeouts and the heavy tail make p99 noisier)
K_LATENCY = 5.0  # robust z (scaled MAD units) a bucket's p95 must exceed ...
K_LATENCY_P99 = 6.0  # ... and its p99 (a sample p99 is skewed to the right: few requests beyond it)
MIN_LATENCY_RATIO = 1.3  # ... and at least this multiple of the baseline
Z_SCREEN = 2.0  # a bucket above this robust z ...
LATENCY_SCREEN_RATIO = 1.1  # ... and this multiple joins a run, which must pass the two above pooled
SCALE_FLOOR = 0.02  # log units: smallest band scale (2 %), so a flat history does not flag jitter
MAD_TO_SD = 1.4826  # MAD of a normal sample times this estimates its standard deviation

CRITICAL_RATE_RATIO = 3.0  # ERROR_RATE is CRITICAL at >= 3x the baseline and ...
CRITICAL_RATE_EXCESS = 0.05  # ... >= 5 percentage points above it
CRITICAL_LATENCY_RATIO = 2.0  # LATENCY_* is CRITICAL at >= 2x the baseline


def lookback(season: int | None) -> int:
    """How many buckets of history before the range :func:`detect` wants (it works with fewer)."""
    return PERIODS * season if season else TRAILING


@dataclass(frozen=True, slots=True)
class Columns:
    """One series as columns (what detection reads), bucket by bucket: the same as a list of Points, without an
    object per bucket (the report builds these directly from its buckets)."""

    requests: Sequence[int] | IntArray
    errors: Sequence[int] | IntArray
    p95_ms: Sequence[float | None] | FloatArray  # (None or NaN: no value)
    p99_ms: Sequence[float | None] | FloatArray

    @classmethod
    def of(cls, points: Sequence[Point]) -> Columns:
        return cls([p.requests for p in points], [p.errors for p in points], [p.p95_ms for p in points],
                   [p.p99_ms for p in points])  # fmt: skip


def detect(points: Sequence[Point] | Columns, evaluate_from: int, season: int | None) -> list[Detection]:
    """Spikes of error rate, p95 and p99 in ``points[evaluate_from:]``; ``points[:evaluate_from]`` is history.

    ``season`` is the number of buckets in one seasonal period (24 for HOUR, 7 for DAY) or None (no seasonal term).
    Detections are ordered by metric, then by their first bucket.
    """
    return detect_all([points], evaluate_from, season)[0]


ALL_METRICS = frozenset(Metric)
LATENCY_METRICS = frozenset({Metric.LATENCY_P95, Metric.LATENCY_P99})


def detect_all(
    series: Sequence[Sequence[Point] | Columns],
    evaluate_from: int,
    season: int | None,
    metrics: frozenset[Metric] = ALL_METRICS,
) -> list[list[Detection]]:
    """:func:`detect` of several series of one grid (a report's models), their latency screens in one numpy pass;
    only ``metrics`` (the metrics are independent: a caller may ask for them in turns)."""
    columns = [s if isinstance(s, Columns) else Columns.of(s) for s in series]
    found = [_error_rate(c, evaluate_from, season) if Metric.ERROR_RATE in metrics else [] for c in columns]
    for metric, min_requests, k in ((Metric.LATENCY_P95, MIN_REQUESTS_P95, K_LATENCY),
                                    (Metric.LATENCY_P99, MIN_REQUESTS_P99, K_LATENCY_P99)):  # fmt: skip
        if metric not in metrics:
            continue
        logs = [
            _logs(c.requests, c.p95_ms if metric == Metric.LATENCY_P95 else c.p99_ms, min_requests) for c in columns
        ]
        candidates = _latency_candidates(logs, [c.requests for c in columns], evaluate_from, season)
        for index, (row, kept) in enumerate(zip(logs, candidates, strict=True)):
            found[index] += _latency_spikes(row, kept, season, metric, k)
    return found


# --- error rate ----------------------------------------------------------------------------------------------------


def poisson_sf(k: float, mean: float) -> float:
    """P(X >= k) for X ~ Poisson(mean), for real k > 0 (the regularized lower incomplete gamma P(k, mean))."""
    if k <= 0:
        return 1.0
    if mean <= 0:
        return 0.0
    log_front = k * math.log(mean) - mean - math.lgamma(k)
    if mean < k + 1:  # series
        term = total = 1.0 / k
        a = k
        for _ in range(500):
            a += 1
            term *= mean / a
            total += term
            if term < total * 1e-12:
                break
        return min(1.0, math.exp(log_front) * total)
    # continued fraction for the upper tail Q(k, mean); P = 1 - Q  (Numerical Recipes, gcf)
    b = mean + 1 - k
    c = 1e300
    d = 1 / b
    h = d
    for i in range(1, 500):
        an = -i * (i - k)
        b += 2
        d = an * d + b
        d = 1e-300 if abs(d) < 1e-300 else d
        c = b + an / c
        c = 1e-300 if abs(c) < 1e-300 else c
        d = 1 / d
        delta = d * c
        h *= delta
        if abs(delta - 1) < 1e-12:
            break
    return max(0.0, 1.0 - math.exp(log_front) * h)


def poisson_sf_below(k: float, mean: float, alpha: float) -> bool:
    """``poisson_sf(k, mean) < alpha``, answered False at once when the first term of the series of P(k, mean),
    ``mean**k * exp(-mean) / Gamma(k + 1)``, a lower bound of it, already reaches alpha (with a margin far above
    rounding): most buckets that a noisy window flags are there."""
    if k > 0 < mean and k * math.log(mean) - mean - math.lgamma(k + 1) >= math.log(alpha) + 1e-9:
        return False
    return poisson_sf(k, mean) < alpha


def _error_rate(series: Columns, evaluate_from: int, season: int | None) -> list[Detection]:
    size = lookback(season)
    requests, errors = _listed(series.requests), _listed(series.errors)
    candidates = _candidates(requests, errors, size)
    found = []
    for first, last in _runs(t for t in candidates if t >= evaluate_from):
        detection = _error_run(requests, errors, candidates, first, last, size)
        if detection is not None:
            found.append(detection)
    return found


def _listed(values: Sequence[int] | IntArray) -> list[int]:
    """Python ints (the loop's arithmetic; an array's items would be numpy scalars)."""
    return values.tolist() if isinstance(values, np.ndarray) else list(values)


def _candidates(requests: list[int], errors: list[int], size: int) -> dict[int, tuple[float, float]]:
    """Buckets that pass the lenient test -> (expected errors, dispersion), in one pass over running sums.

    The baseline of bucket t is the pooled rate of the ``size`` buckets before it, (errors + 1) / requests (the +1
    keeps a window with no errors from expecting none). Its dispersion is the mean Pearson chi-square of those
    buckets (quasi-Poisson, at least 1). A candidate enters the window winsorized at MIN_RATIO x its expected count:
    an incident barely raises the baseline after it, and a lasting level shift is still learnt.
    """
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


def _error_run(
    requests_of: list[int],
    errors_of: list[int],
    candidates: dict[int, tuple[float, float]],
    first: int,
    last: int,
    size: int,
) -> Detection | None:
    errors = sum(errors_of[first : last + 1])
    requests = sum(requests_of[first : last + 1])
    expected = sum(candidates[t][0] for t in range(first, last + 1))
    phi = max(candidates[t][1] for t in range(first, last + 1))
    if errors < MIN_ERRORS or errors < MIN_RATIO * expected or poisson_sf(errors / phi, expected / phi) >= ALPHA:
        return None
    observed, baseline = errors / requests, expected / requests
    critical = observed >= CRITICAL_RATE_RATIO * baseline and observed - baseline >= CRITICAL_RATE_EXCESS
    return Detection(
        metric=Metric.ERROR_RATE,
        first=first,
        last=last,
        observed=observed,
        baseline=baseline,
        severity=Severity.CRITICAL if critical else Severity.WARNING,
        reference=range(max(0, first - size), first),
    )


def _runs(indexes: Iterator[int]) -> list[tuple[int, int]]:
    """Maximal runs of consecutive indexes (ascending input) as (first, last)."""
    runs: list[tuple[int, int]] = []
    for t in indexes:
        if runs and runs[-1][1] == t - 1:
            runs[-1] = (runs[-1][0], t)
        else:
            runs.append((t, t))
    return runs


# --- latency percentiles -------------------------------------------------------------------------------------------


def _logs(
    counts: Sequence[int] | IntArray, values: Sequence[float | None] | FloatArray, min_requests: int
) -> list[float]:
    """Each bucket's log latency, NaN where it has fewer than ``min_requests`` requests or no value. In Python's own
    arithmetic (numpy's SIMD log may differ in the last bit); every later step is exact IEEE arithmetic (subtract,
    divide, sqrt, compare, sort), the same in numpy as in Python. (The buckets are chosen in numpy, and the logs
    taken in a C loop: ``values`` may be an array, as the report's are.)"""
    value = np.asarray(values, dtype=np.float64)  # (None: NaN)
    with np.errstate(invalid="ignore"):
        kept = (np.asarray(counts) >= min_requests) & (value != 0) & ~np.isnan(value)
    logs = np.full(len(value), math.nan)
    logs[kept] = list(map(math.log, value[kept].tolist()))
    return logs.tolist()


def _latency_spikes(
    logs: list[float], candidates: dict[int, tuple[float, float]], season: int | None, metric: Metric, k: float
) -> list[Detection]:
    """Runs of adjacent candidates whose pooled robust z reaches ``k`` and whose mean rise reaches the floor."""
    floor = math.log(MIN_LATENCY_RATIO)
    found = []
    for first, last in _runs(iter(candidates)):
        run = range(first, last + 1)
        pooled_z = sum(candidates[i][1] for i in run) / math.sqrt(len(run))
        if pooled_z < k or sum(logs[i] - candidates[i][0] for i in run) / len(run) < floor:
            continue
        worst = max(run, key=lambda i: logs[i] - candidates[i][0])
        observed, baseline = math.exp(logs[worst]), math.exp(candidates[worst][0])
        found.append(
            Detection(
                metric=metric,
                first=first,
                last=last,
                observed=observed,
                baseline=baseline,
                severity=Severity.CRITICAL if observed >= CRITICAL_LATENCY_RATIO * baseline else Severity.WARNING,
                reference=range(max(0, first - lookback(season)), first),
            )
        )
    return found


def _latency_candidates(
    logs: Sequence[list[float]], counts: Sequence[Sequence[int] | IntArray], evaluate_from: int, season: int | None
) -> list[dict[int, tuple[float, float]]]:
    """For each series (its log latencies and request counts), the buckets from ``evaluate_from`` on whose robust z
    reaches Z_SCREEN -> (baseline (log), robust z), ascending.

    Per bucket t: its references (the same bucket 1..PERIODS seasons back when at least MIN_REFS of them have a
    value, else the last TRAILING buckets; NaNs left out), their median, and a scale: the larger of the references'
    scaled MAD, the sampling noise of t's request count, and SCALE_FLOOR. A bucket is kept when it is at least the
    screen above the median and its z = (x - median) / scale reaches Z_SCREEN. The buckets that pass the screen
    (:func:`_screen`), of every series at once, as rows of a matrix of their references (NaN-padded, so that a sort
    puts the missing last)."""
    found: list[dict[int, tuple[float, float]]] = [{} for _ in logs]
    if not logs:
        return found
    values = np.asarray(logs, dtype=np.float64).reshape(len(logs), -1)
    series, at = np.nonzero(_screen(values, max(evaluate_from, 1), season, math.log(LATENCY_SCREEN_RATIO)))
    if not len(at):
        return found
    if season:  # the seasonal references; the trailing ones only for the buckets with too few of those
        references = _lagged_rows(values, series, at, season, PERIODS)
        trailing = np.count_nonzero(~np.isnan(references), axis=1) < MIN_REFS
        if trailing.any():
            padding = np.full((len(at), max(TRAILING - PERIODS, 0)), np.nan)
            references = np.concatenate((references, padding), axis=1)
            references[trailing] = np.nan
            references[trailing, :TRAILING] = _lagged_rows(values, series[trailing], at[trailing], 1, TRAILING)
    else:
        references = _lagged_rows(values, series, at, 1, TRAILING)
    x = values[series, at]
    references.sort(axis=1)  # NaN last
    present = np.count_nonzero(~np.isnan(references), axis=1)
    median = _row_medians(references, present)
    above = x - median >= math.log(LATENCY_SCREEN_RATIO)
    if not above.any():
        return found
    deviations = np.abs(references - median[:, None])
    deviations.sort(axis=1)
    spread = MAD_TO_SD * _row_medians(deviations, present)
    n = np.asarray(counts, dtype=np.float64).reshape(values.shape)
    noise = np.zeros(len(logs))
    for row in np.unique(series[above]).tolist():
        noise[row] = _sampling_noise(values[row], n[row], season or 1)
    z = (x - median) / np.maximum(np.maximum(spread, noise[series] / np.sqrt(n[series, at])), SCALE_FLOOR)
    kept = above & (z >= Z_SCREEN)
    for row, t, m, score in zip(series[kept].tolist(), at[kept].tolist(), median[kept].tolist(), z[kept].tolist(),
                                strict=True):  # fmt: skip
        found[row][t] = (m, score)
    return found


def _lagged_rows(
    values: FloatMatrix, series: npt.NDArray[np.int64], at: npt.NDArray[np.int64], step: int, lags: int
) -> FloatMatrix:
    """Row i: ``values[series[i], at[i] - step * k]`` for k = 1..lags, NaN where that is before the series."""
    positions = at[:, None] - step * np.arange(1, lags + 1)
    rows: FloatMatrix = values[series[:, None], np.maximum(positions, 0)]
    rows[positions < 0] = np.nan
    return rows


def _row_medians(rows: FloatMatrix, present: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
    """The median of the first ``present[i]`` values of each sorted row (``_median_sorted``'s rule)."""
    mid = present // 2
    index = np.arange(len(rows))
    upper = rows[index, mid]
    lower = rows[index, np.maximum(mid - 1, 0)]
    return np.where(present % 2 == 1, upper, (lower + upper) / 2)


def _screen(values: FloatMatrix, start: int, season: int | None, screen: float) -> npt.NDArray[np.bool_]:
    """Of each series (a row of log latencies), the buckets from ``start`` on that may be candidates: a value (not
    NaN), at least MIN_REFS references (:func:`_latency_candidates`'s choice), and the value at least ``screen``
    above the smallest of them (the median is at least the smallest reference). In a few numpy passes over all the
    series: the reference matrices of :func:`_latency_candidates` are then built for these buckets only (this is a
    necessary condition of its first test)."""
    trailing_count, trailing_min = _lagged(values, 1, TRAILING)
    if season:
        seasonal_count, seasonal_min = _lagged(values, season, PERIODS)
        seasonal = seasonal_count >= MIN_REFS
        count = np.where(seasonal, seasonal_count, trailing_count)
        smallest = np.where(seasonal, seasonal_min, trailing_min)
    else:
        count, smallest = trailing_count, trailing_min
    with np.errstate(invalid="ignore"):  # NaN values compare False: not kept
        kept: npt.NDArray[np.bool_] = (count >= MIN_REFS) & (values - screen >= smallest)
    kept[:, :start] = False
    return kept


def _lagged(values: FloatMatrix, step: int, lags: int) -> tuple[npt.NDArray[np.int64], FloatMatrix]:
    """For every bucket t of every series (row), over ``values[:, t - step * k]`` for k = 1..lags that exist and
    are not NaN: how many there are and the smallest (+inf if none).

    By doubling: the count and minimum over lags 1..2m are those over 1..m and over m+1..2m (the same shifted by
    m steps), so ``lags`` lags take about 2 log2(lags) array passes, not ``lags`` (counts and minima are exact
    in any order)."""
    present = (~np.isnan(values)).astype(np.int64)
    finite = np.where(np.isnan(values), np.inf, values)
    count, smallest = _shifted(present, step, 0), _shifted(finite, step, np.inf)  # lag 1
    covered = 1
    total_count, total_min, done = np.zeros_like(count), np.full(values.shape, np.inf), 0
    remaining = lags
    while remaining:
        if remaining & 1:  # lags done+1 .. done+covered: this block, shifted past those done
            total_count += _shifted(count, step * done, 0)
            np.minimum(total_min, _shifted(smallest, step * done, np.inf), out=total_min)
            done += covered
        remaining >>= 1
        if remaining:
            count = count + _shifted(count, step * covered, 0)
            smallest = np.minimum(smallest, _shifted(smallest, step * covered, np.inf))
            covered *= 2
    return total_count, total_min


def _shifted(values: npt.NDArray[_N], by: int, fill: float) -> npt.NDArray[_N]:
    """``values`` moved ``by`` buckets later along each row, ``fill`` before."""
    if by == 0:
        return values
    out = np.full_like(values, fill)
    if by < values.shape[-1]:
        out[:, by:] = values[:, :-by]
    return out


def _sampling_noise(logs: npt.NDArray[np.float64], counts: npt.NDArray[np.float64], lag: int) -> float:
    """sigma such that one bucket's log quantile varies by about sigma / sqrt(requests).

    Robustly estimated from differences one season apart, each normalized by sqrt(1/n1 + 1/n2): the median absolute
    normalized difference, times 1.4826 (incidents are a minority, so the median ignores them).
    """
    if lag >= len(logs):
        return 0.0
    later, earlier = logs[lag:], logs[:-lag]
    both = ~np.isnan(later) & ~np.isnan(earlier)
    diffs = np.abs(later[both] - earlier[both]) / np.sqrt(1 / counts[lag:][both] + 1 / counts[:-lag][both])
    diffs.sort()
    return MAD_TO_SD * _median_sorted(diffs.tolist()) if len(diffs) >= 10 else 0.0


def _median_sorted(values: Sequence[float]) -> float:
    n = len(values)
    mid = n // 2
    return values[mid] if n % 2 else (values[mid - 1] + values[mid]) / 2
