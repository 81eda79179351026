"""Spike detection quality on a labelled synthetic corpus (reliability/spikes.py, reliability/attribution.py).

    python -m bench.detection_quality [--series 3000] [--steady 0.4] [--seed 12] [--no-write]

Each series is one org's HOUR buckets over 30 days (the first 7 are history, the rest is evaluated) with 1-4
models, daily and weekly seasonality, day-to-day wobble, Poisson counts, log-normal latency with a few 60 s
timeouts, and p95/p99 drawn as the exact order statistics of each bucket's requests. Some series carry one
injected incident: an error burst on one model (mixed status codes), a burst of one status code on every model,
or a latency regression of one model. Writes bench/results/detection_quality.json and the section "Spike
detection quality" of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import random
import subprocess
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import NormalDist
from typing import Any

from bench.harness.output import Progress, say
from reliability.attribution import Composition, Contribution, Key, attribute
from reliability.report import COMPOSITION_SPAN
from reliability.spikes import Detection, Metric, Point, detect, poisson_sf

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "detection_quality.json"
DOC = ROOT / "docs" / "benchmarks.md"
HEADING = "## Spike detection quality"

DAYS, HISTORY_DAYS, SEASON = 30, 7, 24
TIMEOUT_MS = 60_000.0
ALPHA_ORACLE = 1e-6
MODELS = ("gpt-4o", "gpt-4o-mini", "claude-3-7-sonnet", "deepseek-v3", "llama-3-70b", "mistral-large")
BASE_MIX: tuple[tuple[int, str, float], ...] = (
    (500, "internal_error", 0.5),
    (502, "bad_gateway", 0.2),
    (503, "service_unavailable", 0.2),
    (504, "upstream_timeout", 0.1),
)
STATUS_CAUSES = ((502, "bad_gateway"), (503, "service_unavailable"), (504, "upstream_timeout"), (529, "overloaded"))
ERROR_SIZES = (1.5, 2.0, 3.0, 5.0, 10.0)  # the series' error rate multiplied by this during the incident
LATENCY_FACTORS = (1.5, 2.0, 3.0, 5.0)  # the regressed model's latencies multiplied by this
VOLUME_BANDS: tuple[tuple[float, float, str], ...] = (
    (0, 100, "<100"),
    (100, 300, "100-300"),
    (300, 1000, "300-1k"),
    (1000, 3000, "1k-3k"),
    (3000, math.inf, ">=3k"),
)
RISE_BANDS = ((0, 1.5, "<1.5x"), (1.5, 2, "1.5-2x"), (2, 3, "2-3x"), (3, math.inf, ">=3x"))
_NORMAL = NormalDist()


@dataclass
class Incident:
    kind: str  # error_model | error_status | latency
    first: int
    last: int
    size: float  # error: the series' rate multiplier; latency: the model's latency multiplier
    model: str | None = None
    status: int | None = None
    error_type: str | None = None
    volume: float = 0.0  # mean requests per bucket in the window
    rise: float = 0.0  # error: rate ratio (= size); latency: the series' true p95 ratio
    oracle: float = 1.0  # error: power of an ideal pooled Poisson test at ALPHA_ORACLE knowing the true baseline


@dataclass
class Series:
    models: list[str]
    volume: float
    sigma: float
    timeout: float
    incident: Incident | None
    points: list[Point] = field(default_factory=list)
    requests: list[dict[str, int]] = field(default_factory=list)
    errors: list[dict[Key, int]] = field(default_factory=list)
    mu: list[float] = field(default_factory=list)  # log-latency location of each bucket (ms)


# --- random draws --------------------------------------------------------------------------------------------------


def poisson(rng: random.Random, mean: float) -> int:
    """A Poisson draw: inversion for small means, PTRS (Hormann 1993, as numpy does) for large ones."""
    if mean <= 0:
        return 0
    if mean >= 10:
        return _poisson_ptrs(rng, mean)
    u, x, p = rng.random(), 0, math.exp(-mean)
    cumulative = p
    while u > cumulative and x < 1000:
        x += 1
        p *= mean / x
        cumulative += p
    return x


def _poisson_ptrs(rng: random.Random, mean: float) -> int:
    log_mean, b = math.log(mean), 0.931 + 2.53 * math.sqrt(mean)
    a, inv_alpha, v_r = -0.059 + 0.02483 * b, 1.1239 + 1.1328 / (b - 3.4), 0.9277 - 3.6224 / (b - 2)
    while True:
        u, v = rng.random() - 0.5, rng.random()
        us = 0.5 - abs(u)
        k = math.floor((2 * a / us + b) * u + mean + 0.43)
        if us >= 0.07 and v <= v_r:
            return k
        if k < 0 or (us < 0.013 and v > us):
            continue
        if math.log(v) + math.log(inv_alpha) - math.log(a / (us * us) + b) <= -mean + k * log_mean - math.lgamma(k + 1):
            return k


def latency_quantile(u: float, mu: float, sigma: float, timeout: float, share: float, shift: float) -> float:
    """The u-quantile (ms) of: timeouts (share ``timeout``, at the top), else log-normal(mu, sigma) of which a part
    ``share`` is slowed by exp(shift)."""
    if u >= 1 - timeout:
        return TIMEOUT_MS
    v = min(u / (1 - timeout), 1 - 1e-12)
    z = _NORMAL.inv_cdf(v)
    if share <= 0 or shift == 0:
        return math.exp(mu + sigma * z)
    lo, hi = mu + sigma * z, mu + shift + sigma * z
    for _ in range(40):
        mid = (lo + hi) / 2
        cdf = (1 - share) * _NORMAL.cdf((mid - mu) / sigma) + share * _NORMAL.cdf((mid - mu - shift) / sigma)
        lo, hi = (mid, hi) if cdf < v else (lo, mid)
    return math.exp((lo + hi) / 2)


def sample_p95_p99(rng: random.Random, n: int, args: tuple[float, float, float, float, float]) -> tuple[float, float]:
    """p95 and p99 (nearest rank) of n requests, drawn as exact order statistics of uniforms (no n draws)."""
    k95, k99 = math.ceil(0.95 * n), math.ceil(0.99 * n)
    u95 = rng.betavariate(k95, n - k95 + 1)
    u99 = u95 + (1 - u95) * rng.betavariate(k99 - k95, n - k99 + 1) if k99 > k95 else u95
    return latency_quantile(u95, *args), latency_quantile(u99, *args)


# --- the corpus ----------------------------------------------------------------------------------------------------


def make_series(rng: random.Random, kind: str | None) -> Series:
    models = rng.sample(MODELS, rng.randint(1, 4))
    series = Series(
        models=models,
        volume=math.exp(rng.uniform(math.log(30), math.log(30_000))),
        sigma=rng.uniform(0.4, 0.8),
        timeout=rng.choice((0.0, 0.0005, 0.001, 0.002)),
        incident=None if kind is None else _make_incident(rng, kind, models),
    )
    _fill(rng, series)
    return series


def _make_incident(rng: random.Random, kind: str, models: list[str]) -> Incident:
    first = rng.randrange(HISTORY_DAYS * SEASON, DAYS * SEASON - 6)
    last = first + rng.randint(1, 6) - 1
    if kind == "error_status":
        status, error_type = rng.choice(STATUS_CAUSES)
        return Incident(kind, first, last, rng.choice(ERROR_SIZES), status=status, error_type=error_type)
    sizes = LATENCY_FACTORS if kind == "latency" else ERROR_SIZES
    return Incident(kind, first, last, rng.choice(sizes), model=rng.choice(models))


def _fill(rng: random.Random, s: Series) -> None:
    n_models = len(s.models)
    weights = [rng.uniform(0.2, 1.0) for _ in s.models]
    shares = [w / sum(weights) for w in weights]
    rates = [math.exp(rng.uniform(math.log(0.002), math.log(0.03))) for _ in s.models]
    mu0, phase = math.log(rng.uniform(400, 3000)), rng.uniform(0, 24)
    day_load = [math.exp(rng.gauss(0, 0.1)) for _ in range(DAYS)]
    day_rate = [[math.exp(rng.gauss(0, 0.1)) for _ in range(n_models)] for _ in range(DAYS)]
    day_mu = [rng.gauss(0, 0.03) for _ in range(DAYS)]
    inc, expected_base, volume = s.incident, 0.0, 0
    for t in range(DAYS * SEASON):
        day, hour = divmod(t, SEASON)
        wave = math.sin(2 * math.pi * (hour - phase) / SEASON)
        load = s.volume * (1 + 0.6 * wave) * (0.7 if day % 7 in (5, 6) else 1.0) * day_load[day]
        requests = {m: poisson(rng, load * sh) for m, sh in zip(s.models, shares, strict=True)}
        n = sum(requests.values())
        rate_of = {m: rates[i] * day_rate[day][i] for i, m in enumerate(s.models)}
        series_rate = sum(requests[m] * rate_of[m] for m in s.models) / n if n else 0.0
        errors = _base_errors(rng, requests, rate_of)
        active = inc is not None and inc.first <= t <= inc.last
        if active and inc is not None:
            expected_base += series_rate * n
            volume += n
            if inc.kind != "latency":
                _inject_errors(rng, inc, requests, series_rate, errors)
        s.mu.append(mu0 + 0.08 * wave + day_mu[day])
        s.requests.append(requests)
        s.errors.append(errors)
        s.points.append(_point(rng, s, t, n, sum(errors.values())))
    if inc is not None:
        _describe(inc, s, expected_base, volume)


def _base_errors(rng: random.Random, requests: dict[str, int], rate_of: dict[str, float]) -> dict[Key, int]:
    errors: dict[Key, int] = {}
    for m, n in requests.items():
        for status, error_type, w in BASE_MIX:
            e = poisson(rng, n * rate_of[m] * w)
            if e:
                errors[(m, status, error_type)] = e
    return errors


def _inject_errors(
    rng: random.Random, inc: Incident, requests: dict[str, int], series_rate: float, errors: dict[Key, int]
) -> None:
    extra_rate = (inc.size - 1) * series_rate
    total = sum(requests.values())
    if inc.kind == "error_model" and inc.model is not None:
        for status, error_type, w in BASE_MIX:
            key: Key = (inc.model, status, error_type)
            errors[key] = errors.get(key, 0) + poisson(rng, extra_rate * total * w)
    elif inc.status is not None:
        for m, n in requests.items():
            key = (m, inc.status, inc.error_type)
            errors[key] = errors.get(key, 0) + poisson(rng, extra_rate * n)


def _regression(s: Series, t: int, n: int) -> tuple[float, float]:
    """(share of requests slowed, log of the factor) in bucket t."""
    inc = s.incident
    if inc is None or inc.kind != "latency" or not inc.first <= t <= inc.last or inc.model is None or n == 0:
        return 0.0, 0.0
    return s.requests[t][inc.model] / n, math.log(inc.size)


def _point(rng: random.Random, s: Series, t: int, n: int, errors: int) -> Point:
    if n == 0:
        return Point(0, 0, None, None)
    share, shift = _regression(s, t, n)
    p95, p99 = sample_p95_p99(rng, n, (s.mu[t], s.sigma, s.timeout, share, shift))
    return Point(n, min(errors, n), p95, p99)


def _describe(inc: Incident, s: Series, expected_base: float, volume: int) -> None:
    buckets = inc.last - inc.first + 1
    inc.volume = volume / buckets
    if inc.kind == "latency":
        rises = []
        for t in range(inc.first, inc.last + 1):
            n = s.points[t].requests
            share, shift = _regression(s, t, n)
            base = latency_quantile(0.95, s.mu[t], s.sigma, s.timeout, 0.0, 0.0)
            rises.append(latency_quantile(0.95, s.mu[t], s.sigma, s.timeout, share, shift) / base)
        inc.rise = sorted(rises)[len(rises) // 2]
        return
    inc.rise = inc.size
    inc.oracle = oracle_power(expected_base, inc.size * expected_base)


def oracle_power(base: float, spiked: float, alpha: float = ALPHA_ORACLE) -> float:
    """Power of the one-sided Poisson test at ``alpha`` on the window's pooled count, the true base known."""
    if base <= 0:
        return 0.0
    c = max(1, math.floor(base))
    while poisson_sf(c, base) >= alpha:
        c += max(1, int(math.sqrt(base) / 4))
    return poisson_sf(c, spiked)


# --- evaluation ----------------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    kind: str | None
    volume: float  # the series' mean requests per bucket
    detections: list[Detection]
    incident: Incident | None
    detected: bool = False
    attributed: bool | None = None  # None: not detected
    first_row: str = ""
    seconds: float = 0.0


def evaluate(s: Series, rng: random.Random) -> Outcome:
    started = time.perf_counter()
    found = detect(s.points, HISTORY_DAYS * SEASON, SEASON)
    seconds = time.perf_counter() - started
    mean_volume = sum(p.requests for p in s.points) / len(s.points)
    out = Outcome(s.incident.kind if s.incident else None, mean_volume, found, s.incident, seconds=seconds)
    inc = s.incident
    hit = [d for d in found if inc is not None and _matches(d, inc)]
    if inc is None or not hit:
        return out
    out.detected = True
    det = min(hit, key=lambda d: (d.metric != Metric.ERROR_RATE and d.metric != Metric.LATENCY_P95, d.first))
    rows = attribute(*_compositions(s, det, rng))
    out.attributed = bool(rows) and _names_cause(rows[0], inc)
    out.first_row = _describe_row(rows[0]) if rows else "(none)"
    return out


def _matches(d: Detection, inc: Incident) -> bool:
    family = d.metric == Metric.ERROR_RATE if inc.kind != "latency" else d.metric != Metric.ERROR_RATE
    return family and d.first <= inc.last and d.last >= inc.first


def _compositions(s: Series, det: Detection, rng: random.Random) -> tuple[Composition, Composition]:
    window = range(det.first, det.last + 1)
    if det.metric == Metric.ERROR_RATE:
        return _error_composition(s, window), _error_composition(s, det.reference)
    # As the API reads them (reliability/report.py): at most COMPOSITION_SPAN of the spike from its start, and of
    # its reference before the reference's end (HOUR buckets).
    span = int(COMPOSITION_SPAN / dt.timedelta(hours=1))
    threshold = math.log(det.baseline)
    window, reference = window[:span], det.reference[-span:]
    return _slow_composition(s, window, threshold, rng), _slow_composition(s, reference, threshold, rng)


def _error_composition(s: Series, buckets: Iterable[int]) -> Composition:
    requests: dict[str, int] = defaultdict(int)
    hits: dict[Key, int] = defaultdict(int)
    for t in buckets:
        for m, n in s.requests[t].items():
            requests[m] += n
        for key, e in s.errors[t].items():
            hits[key] += e
    return Composition(requests, hits)


def _slow_composition(s: Series, buckets: Iterable[int], log_threshold: float, rng: random.Random) -> Composition:
    """Requests slower than the baseline percentile, per model (all status 200), drawn from each bucket's law."""
    requests: dict[str, int] = defaultdict(int)
    hits: dict[Key, int] = defaultdict(int)
    for t in buckets:
        n_all = s.points[t].requests
        share, shift = _regression(s, t, n_all)
        for m, n in s.requests[t].items():
            slowed = shift if share and s.incident is not None and m == s.incident.model else 0.0
            above = 1 - _NORMAL.cdf((log_threshold - s.mu[t] - slowed) / s.sigma)
            requests[m] += n
            hits[(m, 200, None)] += poisson(rng, n * (s.timeout + (1 - s.timeout) * above))
    return Composition(requests, hits)


def _names_cause(row: Contribution, inc: Incident) -> bool:
    """The first row names the injected cause: its dimensions and nothing that the injected hits do not share."""
    if inc.kind == "error_model":
        return row.model == inc.model and row.status_code is None and row.error_type is None
    if inc.kind == "error_status":
        return row.model is None and row.status_code == inc.status and row.error_type in (None, inc.error_type)
    return row.model == inc.model and row.status_code in (None, 200) and row.error_type is None


def _describe_row(row: Contribution) -> str:
    return f"{row.model}/{row.status_code}/{row.error_type} {row.share:.2f}"


# --- summary -------------------------------------------------------------------------------------------------------


def band(value: float, bands: Sequence[tuple[float, float, str]]) -> str:
    return next(label for lo, hi, label in bands if lo <= value < hi)


def _ratio(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


def _recall(outcomes: list[Outcome]) -> dict[str, Any]:
    detected = sum(o.detected for o in outcomes)
    return {"incidents": len(outcomes), "detected": detected, "recall": _ratio(detected, len(outcomes))}


def _is_error(o: Outcome) -> bool:
    return o.kind in ("error_model", "error_status")


def summarize(outcomes: list[Outcome]) -> dict[str, Any]:
    steady = [o for o in outcomes if o.kind is None]
    incidents = [o for o in outcomes if o.incident is not None]
    days = len(steady) * (DAYS - HISTORY_DAYS)
    false_steady = [d for o in steady for d in o.detections]
    true_positive = sum(1 for o in incidents for d in o.detections if o.incident and _matches(d, o.incident))
    all_detections = sum(len(o.detections) for o in outcomes)
    detected = [o for o in incidents if o.detected]
    error_target = [o for o in incidents if _is_error(o) and _in_target(o)]
    latency_target = [o for o in incidents if o.kind == "latency" and _in_target(o)]
    return {
        "series": len(outcomes),
        "steady_series": len(steady),
        "steady_series_days": days,
        "false_spikes_steady": len(false_steady),
        "false_per_1000_steady_series_days": round(1000 * len(false_steady) / days, 3) if days else None,
        "false_steady_by_metric": {m.value: sum(d.metric == m for d in false_steady) for m in Metric},
        "precision": _ratio(true_positive, all_detections),
        "detections": all_detections,
        "error_target": _recall(error_target),
        "error_target_reachable": _recall([o for o in error_target if _inc(o).oracle >= 0.95]),
        "error_target_unreachable": _recall([o for o in error_target if _inc(o).oracle < 0.95]),
        "latency_target": _recall(latency_target),
        "latency_target_by_volume": {
            label: _recall([o for o in latency_target if band(_inc(o).volume, VOLUME_BANDS) == label])
            for _, _, label in VOLUME_BANDS
        },
        "attribution_first": _ratio(sum(bool(o.attributed) for o in detected), len(detected)),
        "attribution_by_kind": {
            kind: _ratio(
                sum(bool(o.attributed) for o in detected if o.kind == kind), sum(o.kind == kind for o in detected)
            )
            for kind in ("error_model", "error_status", "latency")
        },
        "detect_ms_per_series_mean": round(1000 * sum(o.seconds for o in outcomes) / len(outcomes), 3),
    }


def _in_target(o: Outcome) -> bool:
    """The incidents issue 12's recall target is about: >= 100 requests per bucket, and the error rate at least
    doubled or p95 raised by at least 50 %."""
    inc = _inc(o)
    return inc.volume >= 100 and (inc.size >= 2 if _is_error(o) else inc.rise >= 1.5)


def _inc(o: Outcome) -> Incident:
    assert o.incident is not None
    return o.incident


def strata(outcomes: list[Outcome]) -> dict[str, Any]:
    """Recall (and, for errors, the oracle's power) by incident size x volume band."""
    cells: dict[str, dict[str, list[Outcome]]] = defaultdict(lambda: defaultdict(list))
    for o in outcomes:
        if o.incident is None:
            continue
        inc = o.incident
        size = f"x{inc.size:g}" if _is_error(o) else band(inc.rise, RISE_BANDS)
        family = "error" if _is_error(o) else "latency"
        cells[f"{family} {size}"][band(inc.volume, VOLUME_BANDS)].append(o)
    table: dict[str, Any] = {}
    for row in sorted(cells, key=_row_order):
        table[row] = {}
        for label, group in cells[row].items():
            entry = _recall(group)
            if row.startswith("error"):
                entry["oracle_power_mean"] = round(sum(_inc(o).oracle for o in group) / len(group), 3)
            table[row][label] = entry
    return table


def _row_order(row: str) -> tuple[str, float]:
    family, size = row.split(" ")
    if size.startswith("x"):
        return family, float(size[1:])
    return family, float(next(i for i, (_, _, label) in enumerate(RISE_BANDS) if label == size))


def misses(outcomes: list[Outcome], limit: int = 40) -> list[dict[str, Any]]:
    """Incidents in the target strata that were missed or attributed to something else."""
    rows = []
    for o in outcomes:
        if o.incident is not None and _in_target(o) and (not o.detected or o.attributed is False):
            rows.append({**asdict(o.incident), "detected": o.detected, "first_row": o.first_row})
    return rows[:limit]


def false_spikes(outcomes: list[Outcome], limit: int = 30) -> list[dict[str, Any]]:
    rows = []
    for i, o in enumerate(outcomes):
        for d in o.detections:
            if o.incident is None or not _matches(d, o.incident):
                rows.append(
                    {
                        "series": i,
                        "kind": o.kind,
                        "metric": d.metric.value,
                        "first": d.first,
                        "last": d.last,
                        "observed": round(d.observed, 5),
                        "baseline": round(d.baseline, 5),
                        "series_volume": round(o.volume, 1),
                    }
                )
    return rows[:limit]


# --- the run -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    series: int = 3000
    steady: float = 0.4  # the share of series with no incident
    seed: int = 12


def corpus_kinds(config: Config, rng: random.Random) -> list[str | None]:
    n_steady = round(config.series * config.steady)
    kinds: list[str | None] = [None] * n_steady
    weights = (("error_model", 0.4), ("error_status", 0.2), ("latency", 0.4))
    kinds += rng.choices([k for k, _ in weights], [w for _, w in weights], k=config.series - n_steady)
    return kinds


def run(config: Config, progress: bool = True) -> dict[str, Any]:
    rng = random.Random(config.seed)
    kinds = corpus_kinds(config, rng)
    outcomes = []
    meter = Progress("series generated and evaluated", len(kinds)) if progress else None
    for i, kind in enumerate(kinds):
        series = make_series(random.Random(f"{config.seed}/{i}"), kind)
        outcomes.append(evaluate(series, random.Random(f"{config.seed}/{i}/attribution")))
        if meter:
            meter.advance(1)
    return {
        "config": asdict(config),
        "summary": summarize(outcomes),
        "strata": strata(outcomes),
        "misses": misses(outcomes),
        "false_spikes": false_spikes(outcomes),
    }


# --- the write-up (docs/benchmarks.md) ----------------------------------------------------------------------------


def _pct(entry: dict[str, Any]) -> str:
    recall = entry["recall"]
    return "-" if recall is None else f"{100 * recall:.1f} % ({entry['detected']}/{entry['incidents']})"


def _mark(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def targets_table(s: dict[str, Any]) -> str:
    fp, attribution = s["false_per_1000_steady_series_days"], s["attribution_first"]
    rows = [
        ("recall: error rate at least doubled, >= 100 requests per bucket (all)", _pct(s["error_target"]), ">= 95 %",
         _mark(s["error_target"]["recall"] >= 0.95)),
        ("... of them, those an ideal test can find (oracle power >= 0.95)", _pct(s["error_target_reachable"]),
         ">= 95 %", _mark(s["error_target_reachable"]["recall"] >= 0.95)),
        ("... of them, the rest (too few errors to tell from noise)", _pct(s["error_target_unreachable"]),
         "(unreachable)", ""),
        ("recall: p95 raised >= 50 %, >= 100 requests per bucket", _pct(s["latency_target"]), ">= 95 %",
         _mark(s["latency_target"]["recall"] >= 0.95)),
        ("false spikes per 1,000 steady series-days",
         f"{fp} ({s['false_spikes_steady']} in {s['steady_series_days']:,})", "<= 1", _mark(fp <= 1)),
        ("attribution names the injected cause first (detected incidents)", f"{100 * attribution:.1f} %", ">= 95 %",
         _mark(attribution >= 0.95)),
        ("precision (detections that overlap an injected incident of their kind)",
         f"{100 * s['precision']:.1f} % of {s['detections']:,}", "", ""),
    ]  # fmt: skip
    lines = ["| what | measured | target |  |", "|---|---|---|---|"]
    return "\n".join([*lines, *(f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows)]) + "\n"


def strata_table(table: dict[str, Any], family: str) -> str:
    bands = [label for _, _, label in VOLUME_BANDS]
    lines = ["| " + ("error rate x" if family == "error" else "true p95 rise") + " | " + " | ".join(bands) + " |"]
    lines.append("|---" * (len(bands) + 1) + "|")
    for row, cells in table.items():
        if not row.startswith(family):
            continue
        out = []
        for label in bands:
            cell = cells.get(label)
            if cell is None:
                out.append("")
                continue
            text = f"{cell['detected']}/{cell['incidents']}"
            out.append(f"{text} (ideal {cell['oracle_power_mean']:.2f})" if family == "error" else text)
        lines.append(f"| {row.split(' ', 1)[1]} | " + " | ".join(out) + " |")
    return "\n".join(lines) + "\n"


def reachability_table() -> str:
    """Power of an ideal test (true base rate known) for doubling a 1 % rate, by volume and incident length, at
    the detector's alpha and at the loosest alpha the false-spike target leaves (1 in 24,000 hourly tests)."""
    volumes, lengths = (100, 300, 1000, 3000, 10_000), (1, 3, 6)
    header = "| requests per bucket (errors expected at 1 %) | " + " | ".join(f"{h} h" for h in lengths) + " |"
    lines = [header, "|---" * (len(lengths) + 1) + "|"]
    for n in volumes:
        pairs = [(0.01 * n * h, 0.02 * n * h) for h in lengths]
        cells = [f"{oracle_power(b, x):.2f} / {oracle_power(b, x, 1 / 24_000):.2f}" for b, x in pairs]
        lines.append(f"| {n:,} ({0.01 * n:g}) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def section(result: dict[str, Any]) -> str:
    s, cfg = result["summary"], result["config"]
    per_series = s["detect_ms_per_series_mean"]
    return _unwrap(f"""{HEADING}

```sh
.venv/bin/python -m bench.detection_quality     # -> bench/results/detection_quality.json and this section
```

Measured {result["measured_at"]} at commit `{result["commit"]}` in {result["seconds"]} s. How the detector works
and why: [spike detection](spike-detection.md).

**Corpus** (seed {cfg["seed"]}). {s["series"]:,} series of HOUR buckets over {DAYS} days ({HISTORY_DAYS} days of
history, {DAYS - HISTORY_DAYS} evaluated), each one org with 1-4 models: mean volume log-uniform over 30-30,000
requests per hour, daily (±60 %) and weekly (weekends −30 %) seasonality, day-to-day wobble of the volume and of
each model's error rate (10 %), base error rates 0.2-3 % (status 500/502/503/504), Poisson counts, log-normal
latency (σ 0.4-0.8, slower at peak) with 0-0.2 % of 60 s timeouts; p95 and p99 are drawn as the exact order
statistics of each bucket's requests. {s["steady_series"]:,} series are steady; each of the others carries one
incident of 1-6 hours: an error burst on one model with mixed status codes (40 %), one status code on every
model (20 %), or one model's latency multiplied by 1.5-5 (40 %; stratified by the true rise of the series' p95,
which depends on the model's share). Error incidents multiply the series' error rate by 1.5, 2, 3, 5 or 10.

**Scoring.** `detect(points, 168, 24)` per series. An incident is found when a detection of its kind (error
rate; p95 or p99) overlaps its buckets; every other detection is false. Attribution runs on the detection's
window and `reference`, with errors per (model, status, error type), or for latency the requests slower than the
detection's baseline; it names the cause when the first row fixes the injected model (status and error type
open) or the injected status code (model open). *Ideal* is the power of a one-sided Poisson test at α = 1e-6 on
the incident's pooled errors with the true base rate known.

{targets_table(s)}
The error-rate target is met where the counts allow it, and no method meets it where they do
not: doubling a rate means telling 2λ errors from λ. The ideal test's power for doubling a 1 % rate, at the
detector's α = 1e-6 / at 1 in 24,000 (the loosest α that the false-spike target leaves for hourly error-rate
tests, before any error in the baseline):

{reachability_table()}
So "at least double over ≥ 100 requests per bucket" becomes reachable at about 20-60
expected errors in the incident window. Recall by incident size and volume (found/incidents, and the ideal
test's mean power):

{strata_table(result["strata"], "error")}
The gap to the ideal in the 1k-3k and ≥ 3k columns is the price of not
knowing the base rate (estimated from a week, scaled for over-dispersion) and of the per-bucket screen that
forms runs (α = 1e-2).

Latency (a p95 or p99 detection; found/incidents), by the true rise of the series' p95:

{strata_table(result["strata"], "latency")}
Below 100 requests per bucket p95 is not judged
(`MIN_REQUESTS_P95`); at 100-300 requests a 1.5-2x rise is
within about 4 standard errors of a sample p95, so single hours are inconclusive and only runs of them are
found; some are missed there ({_pct(s["latency_target_by_volume"]["100-300"])} of the target incidents at that volume).

Attribution first, by incident kind: error burst on one model
{100 * s["attribution_by_kind"]["error_model"]:.1f} %, one status code
{100 * s["attribution_by_kind"]["error_status"]:.1f} %, latency regression
{100 * s["attribution_by_kind"]["latency"]:.1f} %. False spikes in steady series by metric:
{", ".join(f"{k} {v}" for k, v in s["false_steady_by_metric"].items())}. The misses and false spikes are listed
in the JSON.

**Speed.** `detect` took {per_series:.2f} ms per series (720 buckets, 3 metrics; mean over the run, on a machine
shared with other work), so 30 days of HOUR × 10 series × 3 metrics takes about {10 * per_series:.0f} ms: more
than the "well under 10 ms" the brief hopes for, one series at a time as here. A report detects all its series
together (`detect_all`), which numpy passes serve at once: the error-rate screen is a fixed point over the
winsorized candidates (window sums in int64, a series still changing after three passes finished bucket by
bucket), the latency screen counts and bounds each bucket's lagged references by doubling, then sorts a matrix of
the screened buckets' references (7 seasonal, or 24 trailing where too few seasonal ones) for their medians and
MADs. The largest org of the 10M benchmark set (3 models × 888 HOUR buckets, all three metrics) is detected in
about 1.8 ms (`bench/results/reliability.json`, where the time goes).
""")


def _unwrap(text: str) -> str:
    """Paragraphs on one line each (tables and code blocks as they are), as the rest of the page is written."""
    blocks = text.split("\n\n")
    return "\n\n".join(b if b.startswith(("|", "```")) else b.strip().replace("\n", " ") for b in blocks) + "\n"


def write_section(text: str) -> None:
    """Replace (or append) this section of docs/benchmarks.md; every other section stays as it is."""
    page = DOC.read_text()
    start = page.find(HEADING + "\n")
    if start < 0:
        page = page.rstrip("\n") + "\n\n" + text
    else:
        end = page.find("\n## ", start + len(HEADING))
        rest = "\n" + page[end + 1 :] if end >= 0 else ""
        page = page[:start] + text.rstrip("\n") + "\n" + rest
    DOC.write_text(page.rstrip("\n") + "\n")


def _commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()

    paths = ["reliability/spikes.py", "reliability/attribution.py", "bench/detection_quality.py"]
    dirty = git("status", "--porcelain", "--", *paths)
    return git("rev-parse", "--short=12", "HEAD") + (" with uncommitted changes to the detector" if dirty else "")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--series", type=int, default=Config.series)
    parser.add_argument("--steady", type=float, default=Config.steady)
    parser.add_argument("--seed", type=int, default=Config.seed)
    parser.add_argument("--no-write", action="store_true", help="print the summary, write nothing")
    parser.add_argument("--render", action="store_true", help="only rewrite the section from the recorded results")
    args = parser.parse_args(argv)
    if args.render:
        write_section(section(json.loads(RESULTS.read_text())))
        return
    started = time.monotonic()
    result = run(Config(args.series, args.steady, args.seed))
    result["seconds"] = round(time.monotonic() - started, 1)
    result["measured_at"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    result["commit"] = _commit()
    say(json.dumps(result["summary"], indent=1))
    if args.no_write:
        return
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    write_section(section(result))
    say(f"wrote {RESULTS.relative_to(ROOT)} and the section {HEADING[3:]!r} of {DOC.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
