"""Spike detection on one series of contiguous buckets (one org, or one model of it).

Error rate: each bucket's error count is tested against a trailing pooled rate (a one-sided Poisson tail, scaled
for over-dispersion); buckets that pass a lenient screen join adjacent ones into runs, and a run is a spike when its
pooled counts pass the strict test. Latency percentiles: on log scale, each bucket against the median of the same
bucket a day (or period) before, up to a week back, with a band from the MAD of those references and the series'
sampling noise (a Hampel filter per bucket, seasonal where history allows, a trailing window where it does not);
screened buckets form runs, and a run is a spike when its pooled robust z and its rise are large enough.

Both are computed for all the series of a report at once (:func:`detect_all`), in numpy: the error rate's screen as
the fixed point of passes over every bucket (:func:`_candidates`: a candidate changes the windows after it), the
latency screens as matrices of references. The decisions are those of bucket-by-bucket loops (kept in the tests).

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
FloatVector = npt.NDArray[np.float64]
IntMatrix = npt.NDArray[np.int64]
IntVector = npt.NDArray[np.int64]
Indexes = npt.NDArray[np.intp]
_N = TypeVar("_N", bound=np.generic)
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


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

    requests: Sequence[int] | IntVector
    errors: Sequence[int] | IntVector
    p95_ms: Sequence[float | None] | FloatVector  # (None or NaN: no value)
    p99_ms: Sequence[float | None] | FloatVector

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


def detect_all(
    series: Sequence[Sequence[Point] | Columns], evaluate_from: int, season: int | None
) -> list[list[Detection]]:
    """:func:`detect` of several series of one grid (a report's models), their error-rate and latency screens in numpy
    passes over all of them."""
    columns = [s if isinstance(s, Columns) else Columns.of(s) for s in series]
    if not columns:
        return []
    counts = _matrix([c.requests for c in columns])  # the series' requests as rows, for every screen
    # A series without a request from ``evaluate_from`` on has no bucket that could be a spike (an error needs a
    # request, a percentile its minimum count): the screens run over the others only (a quiet model, a range of
    # minutes with no traffic yet).
    active = np.flatnonzero(counts[:, max(evaluate_from, 0) :].any(axis=1)).tolist()
    if len(active) < len(columns):
        found: list[list[Detection]] = [[] for _ in columns]
        for index, detections in zip(active, detect_all([columns[i] for i in active], evaluate_from, season),
                                     strict=True):  # fmt: skip
            found[index] = detections
        return found
    found = _error_rate(columns, counts, evaluate_from, season)
    # Both percentiles' series as rows of one matrix (p95 rows, then p99 rows): the screens run once for all.
    values = np.concatenate([
        np.array([c.p95_ms if metric == Metric.LATENCY_P95 else c.p99_ms for c in columns],
                 dtype=np.float64).reshape(counts.shape)  # (None: NaN)
        for metric, _, _ in _LATENCY
    ])  # fmt: skip
    stacked = np.tile(counts, (len(_LATENCY), 1))
    minimum = np.repeat([min_requests for _, min_requests, _ in _LATENCY], len(columns))[:, None]
    logs = _logs(stacked, values, minimum)
    candidates = _latency_candidates(logs, stacked, evaluate_from, season)
    rows = logs.tolist()
    for j, (metric, _, k) in enumerate(_LATENCY):
        for index in range(len(columns)):
            at = j * len(columns) + index
            found[index] += _latency_spikes(rows[at], candidates[at], season, metric, k)
    return found


# The latency metrics: the requests a bucket needs for its value to count, and the robust z a spike must reach.
_LATENCY = ((Metric.LATENCY_P95, MIN_REQUESTS_P95, K_LATENCY), (Metric.LATENCY_P99, MIN_REQUESTS_P99, K_LATENCY_P99))


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


TAIL_TERMS = 8  # poisson_sf_below_each: terms of the series summed before its remainder is bounded
_TAIL_STEPS = np.arange(1.0, TAIL_TERMS + 1)[:, None]


def poisson_sf_below_each(k: FloatVector, mean: FloatVector, alpha: float) -> npt.NDArray[np.bool_]:
    """:func:`poisson_sf_below` of each pair (k > 0, mean > 0), the same answers, most of them in numpy.

    P(k, mean) = mean^k e^-mean / Gamma(k + 1) x (1 + mean / (k + 1) + mean^2 / ((k + 1)(k + 2)) + ...), the series
    of :func:`poisson_sf`. Its log is bounded: log Gamma(k + 1) by Stirling's series to the 1/(12 x) term, which it
    exceeds by less than 1/(360 x^3); the series by its first TAIL_TERMS terms plus the next (below) or plus a
    geometric series of the rest (above: the ratio of its terms falls). Where both bounds are farther from log alpha
    than that error, rounding (1e-12 of the terms' size, far above numpy's and the scalar function's) and 1e-8, they
    answer; the scalar function answers the others (a few in thousands).
    """
    x = k + 1.0
    log_x, inverse = np.log(x), 1.0 / x
    k_log_mean = k * np.log(mean)
    log_first = k_log_mean - mean - ((x - 0.5) * log_x - x + _HALF_LOG_2PI + inverse / 12)
    margin = 1e-12 * (np.abs(k_log_mean) + mean + x * (log_x + 1.0)) + 1e-8 + inverse**3 / 360
    terms = mean / (k + _TAIL_STEPS)  # row j: the ratio of term j + 1 to term j; then the terms themselves
    for j in range(1, TAIL_TERMS):
        terms[j] *= terms[j - 1]
    total, term = 1.0 + terms[:-1].sum(axis=0), terms[-1]
    left = 1.0 - mean / (k + TAIL_TERMS + 1)  # 1 - the largest ratio of the rest's terms
    rest = np.divide(term, left, out=np.full_like(term, np.inf), where=left > 0)
    limit = math.log(alpha)
    below: npt.NDArray[np.bool_] = log_first + np.log(total + rest) < limit - margin
    unsure = ~below & (log_first + np.log(total + term) < limit + margin)
    for i in np.flatnonzero(unsure).tolist():
        below[i] = poisson_sf_below(float(k[i]), float(mean[i]), alpha)
    return below


MAX_PASSES = 3  # _candidates: numpy passes before a series whose candidates still change is finished in order


def _error_rate(
    series: Sequence[Columns], requests: IntMatrix, evaluate_from: int, season: int | None
) -> list[list[Detection]]:
    """Each series' error-rate spikes: runs of candidates from ``evaluate_from`` on that pass the strict test
    (``requests``: the series' requests as the rows of a matrix)."""
    size = lookback(season)
    errors = _matrix([c.errors for c in series])
    found: list[list[Detection]] = []
    for columns, candidates in zip(series, _candidates(requests, errors, size), strict=True):
        runs = _runs(t for t in candidates if t >= evaluate_from)
        spikes = (_error_run(columns.requests, columns.errors, candidates, first, last, size) for first, last in runs)
        found.append([d for d in spikes if d is not None])
    return found


def _matrix(rows: Sequence[Sequence[int] | IntVector]) -> IntMatrix:
    """Counts of several series as the rows of one matrix; a shorter series is padded with buckets without traffic
    (after its end, where they change none of its decisions)."""
    matrix = np.zeros((len(rows), max(map(len, rows), default=0)), dtype=np.int64)
    for index, row in enumerate(rows):
        matrix[index, : len(row)] = row if isinstance(row, np.ndarray) else np.fromiter(row, np.int64, len(row))
    return matrix


def _candidates(
    requests: IntMatrix, errors: IntMatrix, size: int, passes: int = MAX_PASSES
) -> list[dict[int, tuple[float, float]]]:
    """For each series (a row), the buckets that pass the lenient test -> (expected errors, dispersion).

    The baseline of bucket t is the pooled rate of its window, the ``size - 1`` buckets before it (the running sums
    of the bucket loop this replaced dropped bucket t - size before testing t), (errors + 1) / requests: the +1 keeps
    a window with no errors from expecting none. Its dispersion is the mean Pearson chi-square of the window's tested
    buckets (quasi-Poisson, at least 1). A candidate enters the windows after it winsorized at MIN_RATIO x its
    expected count (residual 1): an incident barely raises the baseline after it, and a lasting level shift is still
    learnt.

    A fixed point, all the series at once. A pass (:func:`_error_screen`) decides every bucket in numpy from window
    sums, given the candidates of the pass before (at first none; :func:`_winsorized`). A bucket's decision depends
    only on the candidates before it, so a series that finds the candidates it was given has the sequential answer
    (by induction on t), and a pass settles every bucket up to the first whose decision it changes. Candidates are
    sparse: most series settle in two or three passes, and only those that changed take part in the next. After
    ``passes``, a series still changing (a long cascade, as after a lasting level shift: each pass settles a few
    more buckets) is finished bucket by bucket from the first unsettled one (:func:`_resumed`).
    """
    found: list[dict[int, tuple[float, float]]] = [{} for _ in range(len(requests))]
    windows = _Windows.of(requests, errors, size)
    rows = np.arange(len(requests))  # each of windows' rows: its series (those not settled)
    guess = _Guess(np.zeros(0, dtype=np.intp), [], None)
    width = requests.shape[1]
    for number in range(1, passes + 1):
        screened = _error_screen(windows, guess)
        row_of, t_of = np.divmod(screened.at, width)
        changed = np.zeros(len(rows), dtype=np.bool_)
        changed[np.setxor1d(screened.at, guess.kept, assume_unique=True) // width] = True
        settled = ~changed[row_of]
        values = zip(screened.expected[settled].tolist(), screened.phi[settled].tolist(), strict=True)
        for row, t, value in zip(rows[row_of[settled]].tolist(), t_of[settled].tolist(), values, strict=True):
            found[row][t] = value
        still = np.flatnonzero(changed)
        if not len(still):
            break
        if number == passes:
            for index in still.tolist():
                row = int(rows[index])
                found[row] = _resumed(requests[row], errors[row], size, windows, guess, screened, index)
            break
        renumbered = np.zeros(len(rows), dtype=np.intp)
        renumbered[still] = np.arange(len(still))
        kept = renumbered[row_of[~settled]] * width + t_of[~settled]
        if len(still) < len(rows):
            windows, rows = windows.rows(still), rows[still]
        guess = _winsorized(windows, kept)
    return found


@dataclass(frozen=True, slots=True)
class _Windows:
    """What the screen needs that does not depend on which buckets are candidates, per bucket of each series (row):
    its counts and its window's, exact integer sums (as float where the screen's arithmetic wants them)."""

    span: int  # buckets in a full window
    errors: FloatMatrix
    requests: FloatMatrix  # 1 where not tested (any positive number: its expected count is not used)
    window_requests: FloatMatrix  # likewise 1 where not tested
    window_errors: FloatMatrix  # plus the baseline's 1, before the candidates' corrections
    window_tested: IntMatrix
    tested: npt.NDArray[np.bool_]  # the bucket has requests, and its window enough
    screened: npt.NDArray[np.bool_]  # tested, and with at least MIN_REQUESTS

    @classmethod
    def of(cls, requests: IntMatrix, errors: IntMatrix, size: int) -> _Windows:
        span = size - 1
        window_requests = _before(requests, span)
        tested = (requests != 0) & (window_requests >= MIN_WINDOW_REQUESTS)
        tested[:, :MIN_WINDOW_BUCKETS] = False
        return cls(
            span=span,
            errors=errors.astype(np.float64),
            requests=np.where(tested, requests, 1.0),
            window_requests=np.where(tested, window_requests, 1.0),
            window_errors=np.add(_before(errors, span), 1.0, dtype=np.float64),
            window_tested=_before(tested.astype(np.int64), span),
            tested=tested,
            screened=tested & (requests >= MIN_REQUESTS),
        )

    def rows(self, keep: Indexes) -> _Windows:
        return _Windows(
            self.span, self.errors[keep], self.requests[keep], self.window_requests[keep], self.window_errors[keep],
            self.window_tested[keep], self.tested[keep], self.screened[keep],
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class _Guess:
    """The candidates a pass assumes: flat indexes into the windows' rows, the errors each enters the windows after
    it with (winsorized), and each bucket's sum of their corrections in its window (None: no candidates)."""

    kept: Indexes
    winsorized: list[float]
    corrections: FloatMatrix | None


@dataclass(frozen=True, slots=True)
class _Screened:
    """What a pass found: the candidates (flat indexes), their expected counts and dispersions, and every bucket's
    residual (what it adds to the chi-square of the windows after it)."""

    at: Indexes
    expected: FloatVector
    phi: FloatVector
    residual: FloatMatrix


def _error_screen(windows: _Windows, guess: _Guess) -> _Screened:
    """The buckets that pass the lenient test when the guess's are the candidates: every bucket in numpy (a window
    without candidates sums the exact count of errors), then the Poisson test (:func:`poisson_sf_below_each`) of the
    buckets that pass the cheap conditions."""
    e_sum = windows.window_errors if guess.corrections is None else windows.window_errors + guess.corrections
    expected = windows.requests * e_sum / windows.window_requests
    residual = windows.errors - expected
    np.square(residual, out=residual)
    residual /= expected
    residual *= windows.tested
    residual.flat[guess.kept] = 1.0
    # e >= MIN_RATIO * expected also means e > expected (expected > 0)
    at = np.flatnonzero(windows.screened & (windows.errors >= MIN_RATIO * expected))
    phi = _dispersions(residual, windows.window_tested.flat[at], at, windows.span)
    x = expected.flat[at]
    below = poisson_sf_below_each(windows.errors.flat[at] / phi, x / phi, ALPHA_CANDIDATE)
    return _Screened(at[below], x[below], phi[below], residual)


def _dispersions(residual: FloatMatrix, tested: IntVector, at: Indexes, span: int) -> FloatVector:
    """The dispersion of each bucket ``at`` (flat indexes, t >= 1): its window's mean residual over the ``tested``
    buckets in it, from prefix sums of the residuals, at least 1 and at most MAX_DISPERSION; 1 with fewer than
    MIN_REFS."""
    prefix = np.cumsum(residual, axis=1)
    full = at % residual.shape[1] > span
    chi = prefix.flat[at - 1] - np.where(full, prefix.flat[np.maximum(at - 1 - span, 0)], 0.0)
    return np.where(tested >= MIN_REFS, np.clip(chi / np.maximum(tested, 1), 1.0, MAX_DISPERSION), 1.0)


def _winsorized(windows: _Windows, kept: Indexes) -> _Guess:
    """``kept`` (flat indexes) as the candidates of the next pass. Each enters the windows after it with min(e,
    MIN_RATIO x expected), its expected count from a window with the corrections (winsorized - e) of the candidates
    before it: they depend on each other in sequence, so a loop over the (few) candidates computes them. Then each
    bucket's sum of the corrections in its window, as a difference of their prefix sums (a step function per row,
    made with np.repeat): exactly 0 in a window without candidates."""
    rows, width = windows.errors.shape
    row_of, t_of = np.divmod(kept, width)
    n, e = windows.requests.flat[kept].tolist(), windows.errors.flat[kept].tolist()
    e_sum, n_sum = windows.window_errors.flat[kept].tolist(), windows.window_requests.flat[kept].tolist()
    rows_l, t_l = row_of.tolist(), t_of.tolist()
    winsorized, corrections, totals = [0.0] * len(kept), [0.0] * len(kept), [0.0] * len(kept)
    first = 0  # the earliest candidate in the current one's window
    window = total = 0.0
    for i, t in enumerate(t_l):
        if i and rows_l[i] != rows_l[i - 1]:
            first, window, total = i, 0.0, 0.0
        while t_l[first] < t - windows.span:
            window -= corrections[first]
            first += 1
        limit = MIN_RATIO * (n[i] * (e_sum[i] + window) / n_sum[i])
        winsorized[i] = limit if limit < e[i] else e[i]
        corrections[i] = winsorized[i] - e[i]
        window += corrections[i]
        total += corrections[i]
        totals[i] = total
    # prefix[r, t]: the corrections of row r before t; its steps are at each row's start and after each candidate
    starts = np.concatenate((np.arange(rows) * (width + 1), kept + row_of + 1))
    order = np.argsort(starts, kind="stable")
    lengths = np.diff(starts[order], append=rows * (width + 1))
    prefix = np.repeat(np.concatenate((np.zeros(rows), totals))[order], lengths).reshape(rows, width + 1)
    sums = prefix[:, :width].copy()
    if windows.span < width:
        sums[:, windows.span :] -= prefix[:, : width - windows.span]
    return _Guess(kept, winsorized, sums)


def _resumed(
    requests: IntVector, errors: IntVector, size: int, windows: _Windows, guess: _Guess, screened: _Screened, row: int
) -> dict[int, tuple[float, float]]:
    """The candidates of one series (``row`` of the windows') after a pass that changed them: before the first bucket
    it changed, what it found (its guess was right there); from that bucket on, :func:`_in_order`, after the windows
    the guess made before it."""
    width = windows.errors.shape[1]
    guessed = slice(*np.searchsorted(guess.kept, [row * width, (row + 1) * width]).tolist())
    assumed = dict(zip((guess.kept[guessed] - row * width).tolist(), guess.winsorized[guessed], strict=True))
    ours = slice(*np.searchsorted(screened.at, [row * width, (row + 1) * width]).tolist())
    values = zip(screened.expected[ours].tolist(), screened.phi[ours].tolist(), strict=True)
    found = dict(zip((screened.at[ours] - row * width).tolist(), values, strict=True))
    start = min(assumed.keys() ^ found.keys())
    cleaned = [assumed.get(t, float(e)) for t, e in enumerate(errors[:start].tolist())] + [0.0] * (width - start)
    chi2, tested = screened.residual[row].tolist(), windows.tested[row].astype(np.int64).tolist()
    settled = {t: value for t, value in found.items() if t < start}
    return settled | _in_order(requests.tolist(), errors.tolist(), size, start, cleaned, chi2, tested)


def _in_order(
    requests: list[int],
    errors: list[int],
    size: int,
    start: int,
    cleaned: list[float],
    chi2: list[float],
    tested: list[int],
) -> dict[int, tuple[float, float]]:
    """The candidates from ``start`` on, bucket by bucket over running sums (as before the numpy passes), the buckets
    before it settled: what each adds to the windows after it, its errors (``cleaned``, winsorized), its residual
    (``chi2``) and whether it was tested. The lists are overwritten from ``start`` on."""
    old = max(0, start - size)  # at bucket t, the sums start with buckets t - size .. t - 1 and drop the first
    e_sum, chi_sum = sum(cleaned[old:start], 0.0), sum(chi2[old:start], 0.0)
    n_sum, k_sum = sum(requests[old:start]), sum(tested[old:start])
    found: dict[int, tuple[float, float]] = {}
    for t in range(start, len(requests)):
        if t >= size:
            old = t - size
            e_sum -= cleaned[old]
            n_sum -= requests[old]
            chi_sum -= chi2[old]
            k_sum -= tested[old]
        n, e = requests[t], errors[t]
        kept = float(e)
        chi2[t], tested[t] = 0.0, 0
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


def _before(values: IntMatrix, span: int) -> IntMatrix:
    """Each bucket's sum of the ``span`` values before it in its row (of all before it, near the row's start)."""
    width = values.shape[1]
    prefix = np.cumsum(values, axis=1)
    sums = np.zeros_like(prefix)
    sums[:, 1:] = prefix[:, :-1]
    if span + 1 < width:
        sums[:, span + 1 :] -= prefix[:, : width - span - 1]
    return sums


def _error_run(
    requests_of: Sequence[int] | IntVector,
    errors_of: Sequence[int] | IntVector,
    candidates: dict[int, tuple[float, float]],
    first: int,
    last: int,
    size: int,
) -> Detection | None:
    errors = int(sum(errors_of[first : last + 1]))  # (Python ints: the series may be arrays)
    requests = int(sum(requests_of[first : last + 1]))
    expected = sum(candidates[t][0] for t in range(first, last + 1))
    phi = max(candidates[t][1] for t in range(first, last + 1))
    if errors < MIN_ERRORS or errors < MIN_RATIO * expected:
        return None
    if not poisson_sf_below(errors / phi, expected / phi, ALPHA):  # poisson_sf(...) >= ALPHA, often at once
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


def _logs(counts: IntMatrix, values: FloatMatrix, min_requests: int | IntMatrix) -> FloatMatrix:
    """Each bucket's log latency (a row a series), NaN where it has fewer than ``min_requests`` requests (one number,
    or a column: one a row) or no value.
    In Python's own arithmetic (numpy's SIMD log may differ in the last bit); every later step is exact IEEE
    arithmetic (subtract, divide, sqrt, compare, sort), the same in numpy as in Python. (The buckets are chosen in
    numpy, and the logs of the distinct values taken in a C loop.)"""
    with np.errstate(invalid="ignore"):
        kept = (counts >= min_requests) & (values != 0) & ~np.isnan(values)
    logs = np.full(values.shape, math.nan)
    # Sketch percentiles are bucket values, a few hundred distinct ones among thousands: each log taken once.
    distinct, inverse = np.unique(values[kept], return_inverse=True)
    logs[kept] = np.array(list(map(math.log, distinct.tolist())), dtype=np.float64)[inverse]
    return logs


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
    logs: Sequence[list[float]] | FloatMatrix,
    counts: Sequence[Sequence[int]] | IntMatrix,
    evaluate_from: int,
    season: int | None,
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
    if not len(logs):
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
