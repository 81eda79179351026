"""The reliability series written as JSON text (resolvers/reliability_json.py) is, byte for byte, what the
executor's projection and orjson write for the same selection (the buckets as dicts, encoded with the response's
options), whatever the values: hostile model names, tiny and huge floats, 64-bit counts, instants in other zones."""

from __future__ import annotations

import datetime as dt
import math
import zoneinfo

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reliability.report import Series, error_rate, error_rates
from resolvers.reliability_json import _repeated_floats, render_series
from schema.execution import FieldPlan, ObjectPlan
from schema.json import dumps
from schema.scalars import serialize_datetime

PERCENTILES = [0.5, 0.95, 0.99]
ZONES = [dt.UTC, dt.timezone(dt.timedelta(hours=5, minutes=30)), dt.timezone(-dt.timedelta(hours=8))]


def latency_plan(*fields: FieldPlan) -> ObjectPlan:
    return ObjectPlan("LatencyPercentile", fields or (FieldPlan("percentile", "percentile"), FieldPlan("ms", "ms")))


def bucket_plan(*fields: FieldPlan) -> ObjectPlan:
    return ObjectPlan("ReliabilityBucket", fields)


FULL = bucket_plan(
    FieldPlan("start", "start", non_null=True), FieldPlan("end", "end", non_null=True), FieldPlan("model", "model"),
    FieldPlan("requests", "requests", non_null=True), FieldPlan("errors", "errors", non_null=True),
    FieldPlan("clientErrors", "client_errors", non_null=True), FieldPlan("errorRate", "error_rate", non_null=True),
    FieldPlan("latency", "latency", nested=latency_plan(), object_list=True, non_null=True),
)  # fmt: skip


def projected(plan: ObjectPlan, series: Series, percentiles: list[float]) -> bytes:
    """What the executor's projection of BucketItems and the response encoder write (a reference, by hand)."""
    items = []
    for i in range(len(series)):
        values = {
            "start": serialize_datetime(series.starts[i]), "end": serialize_datetime(series.ends[i]),
            "model": series.models[i], "requests": series.requests[i], "errors": series.errors[i],
            "client_errors": series.client_errors[i], "error_rate": error_rate(series.errors[i], series.requests[i]),
        }  # fmt: skip
        items.append({f.key: _value(f, values, series.latency[i], percentiles) for f in plan.fields})
    return dumps(items)


def _value(field: FieldPlan, values: dict[str, object], latency: list[float], percentiles: list[float]) -> object:
    if field.attribute is None:
        return field.typename
    if field.denied:
        return None
    if field.attribute == "latency":
        assert field.nested is not None
        pairs = [{"percentile": p, "ms": v} for p, v in zip(percentiles, latency, strict=False)]
        return [{f.key: (f.typename if f.attribute is None else pair[f.attribute]) for f in field.nested.fields}
                for pair in pairs]  # fmt: skip
    return values[field.attribute or ""]


def rendered(plan: ObjectPlan, series: Series, percentiles: list[float]) -> bytes | None:
    result = render_series(plan, series, percentiles)
    return None if result is None else ("[" + result.json + "]").encode()


instants = st.builds(
    lambda t, zone: t.replace(tzinfo=dt.UTC).astimezone(zone),
    st.datetimes(min_value=dt.datetime(1970, 1, 2), max_value=dt.datetime(9998, 12, 31)),
    st.sampled_from(ZONES),
)
counts = st.integers(0, 2**63 - 1)
floats = st.one_of(st.floats(0, 1e300, allow_nan=False), st.sampled_from([0.0, -0.0, 1e-7, 5e-324, 1e16, 123456.789]))


@st.composite
def series_of(draw: st.DrawFn) -> Series:
    size = draw(st.integers(1, 12))
    models = draw(st.lists(st.one_of(st.none(), st.text(max_size=8), st.sampled_from(['a"b', "c,d", "%s", "é\x00"])),
                           min_size=size, max_size=size))  # fmt: skip
    requests = draw(st.lists(counts, min_size=size, max_size=size))
    latency = draw(st.lists(st.one_of(st.just([]), st.lists(floats, min_size=3, max_size=3)), min_size=size,
                            max_size=size))  # fmt: skip
    errors = [draw(st.integers(0, n)) for n in requests]
    return Series.of(
        starts=draw(st.lists(instants, min_size=size, max_size=size)),
        ends=draw(st.lists(instants, min_size=size, max_size=size)), models=models, requests=requests,
        errors=errors, client_errors=[draw(st.integers(0, n)) for n in requests], latency=latency,
    )  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(series=series_of())
def test_the_full_selection_is_written_as_the_projection_would_be(series: Series) -> None:
    assert rendered(FULL, series, PERCENTILES) == projected(FULL, series, PERCENTILES)


@settings(max_examples=100, deadline=None)
@given(series=series_of(), order=st.permutations(range(len(FULL.fields))), keep=st.integers(1, len(FULL.fields)))
def test_any_subset_order_and_aliases_with_typenames_are_written_alike(
    series: Series, order: list[int], keep: int
) -> None:
    chosen = [FULL.fields[i] for i in order[:keep]]
    aliased = [FieldPlan(f"k{i}_%s\u00e9", f.attribute, nested=f.nested, object_list=f.object_list,
                         non_null=f.non_null) for i, f in enumerate(chosen)]  # fmt: skip
    plan = bucket_plan(FieldPlan("__typename", None, typename="ReliabilityBucket"), *aliased)
    assert rendered(plan, series, PERCENTILES) == projected(plan, series, PERCENTILES)


def test_a_denied_field_is_null_and_a_non_null_denied_field_is_the_executors() -> None:
    series = Series.of([dt.datetime(2026, 1, 1, tzinfo=dt.UTC)], [dt.datetime(2026, 1, 1, 1, tzinfo=dt.UTC)], ["m"],
                       [10], [1], [2], [[1.5, 2.5, 3.5]])  # fmt: skip
    denied = bucket_plan(FieldPlan("model", "model", denied=True), FieldPlan("requests", "requests"))
    assert rendered(denied, series, PERCENTILES) == b'[{"model":null,"requests":10}]'
    assert rendered(bucket_plan(FieldPlan("requests", "requests", denied=True, non_null=True)), series, []) is None


def test_what_it_cannot_write_exactly_is_left_to_the_executor() -> None:
    series = Series.of([dt.datetime(2026, 1, 1, tzinfo=dt.UTC)], [dt.datetime(2026, 1, 1, 1, tzinfo=dt.UTC)], [None],
                       [10], [1], [2], [[math.inf, 1.0, 2.0]])  # fmt: skip
    assert rendered(FULL, series, PERCENTILES) is None  # not finite: the Float scalar's error
    assert rendered(bucket_plan(FieldPlan("unknown", "unknown")), series, PERCENTILES) is None
    assert rendered(ObjectPlan("UsageBucket", FULL.fields), series, PERCENTILES) is None
    assert render_series(FULL, Series.of([], [], [], [], [], [], []), PERCENTILES) is None
    assert orjson.loads(rendered(bucket_plan(FieldPlan("m", "model")), series, PERCENTILES) or b"") == [{"m": None}]


NESTED = [
    latency_plan(FieldPlan("ms", "ms")),
    latency_plan(
        FieldPlan("__typename", None, typename="LatencyPercentile"),
        FieldPlan("v", "ms"),
        FieldPlan("w", "ms"),
        FieldPlan("p", "percentile"),
    ),
    latency_plan(FieldPlan("p", "percentile"), FieldPlan("{0}%s", "ms")),  # braces and % in an alias (not GraphQL)
    latency_plan(FieldPlan("__typename", None, typename="LatencyPercentile")),
]


@settings(max_examples=60, deadline=None)
@given(
    series=series_of(),
    nested=st.sampled_from(NESTED),
    percentiles=st.sampled_from([PERCENTILES, [1e-9, 0.5, 1 - 1e-16]]),
)
def test_every_latency_selection_is_written_alike(series: Series, nested: ObjectPlan, percentiles: list[float]) -> None:
    plan = bucket_plan(FieldPlan("requests", "requests"), FieldPlan("l", "latency", nested=nested, object_list=True))
    assert rendered(plan, series, percentiles) == projected(plan, series, percentiles)


@settings(max_examples=300, deadline=None)
@given(pairs=st.lists(st.integers(0, 2**53 - 1).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n))),
                      max_size=50))  # fmt: skip
def test_the_reports_error_rates_are_error_rate_of_each_bucket(pairs: list[tuple[int, int]]) -> None:
    errors = np.array([e for e, _ in pairs], dtype=np.int64)
    requests = np.array([n for _, n in pairs], dtype=np.int64)
    rates = error_rates(errors, requests).tolist()
    assert rates == [error_rate(e, n) for e, n in pairs]
    assert all(type(r) is float for r in rates)


def test_repeated_floats_are_written_once_each_zero_with_its_sign() -> None:
    """Distinct percentile values are written once (numpy's unique, where -0.0 equals 0.0): a -0.0 among them is
    still written "-0.0", and a value that is not finite still leaves the list to the executor."""

    def texts(values: list[float]) -> list[str] | None:
        written = _repeated_floats(np.array(values, dtype=np.float64))
        return None if written is None else written.tolist()

    assert texts([1.5, 0.0, 1.5, 2.0, 0.0]) == ["1.5", "0.0", "1.5", "2.0", "0.0"]
    assert texts([1.5, 0.0, 1.5, -0.0, 2.0]) == ["1.5", "0.0", "1.5", "-0.0", "2.0"]
    extremes = [5e-324, 1e300, 5e-324, 1e16, 1e300]
    assert texts(extremes) == [orjson.dumps(v).decode() for v in extremes]
    assert texts([1.0, math.nan, 1.0]) is None
    assert texts([1.0, -math.inf]) is None
    assert texts([]) == []
    assert _repeated_floats(np.array([[2.0, 1.0], [1.0, 2.0]])).tolist() == [["2.0", "1.0"], ["1.0", "2.0"]]  # type: ignore[union-attr]


def test_a_series_is_its_lists() -> None:
    """A series is its arrays; its per-bucket lists (the executor's path) are made from them, and equality is theirs."""
    start, end = dt.datetime(2026, 1, 1, tzinfo=dt.UTC), dt.datetime(2026, 1, 1, 1, tzinfo=dt.UTC)
    berlin = end.astimezone(zoneinfo.ZoneInfo("Europe/Berlin"))  # the same instant
    series = Series.of([start, start, end], [end, end, berlin], ["a", None, "a"], [4, 0, 2**63 - 1], [1, 0, 3],
                       [2, 0, 0], [[1.0, 2.0], [], [3.0, 4.0]])  # fmt: skip
    assert len(series) == 3 and series.bounds == [start, end]
    assert (series.starts, series.ends) == ([start, start, end], [end, end, end])
    assert series.models == ["a", None, "a"] and series.requests == [4, 0, 2**63 - 1]
    assert series.error_rates == [0.25, 0.0, error_rate(3, 2**63 - 1)]
    assert series.latency == [[1.0, 2.0], [], [3.0, 4.0]]
    assert series == Series.of(series.starts, series.ends, series.models, series.requests, series.errors,
                               series.client_errors, series.latency)  # fmt: skip
    assert series != Series.of([start], [end], ["a"], [4], [1], [2], [[1.0, 2.0]])
    assert Series.of([start], [end], [None], [1], [0], [0], [[]]).latency == [[]]
    with pytest.raises(ValueError, match="must all have 2 values"):
        Series.of([start, start], [end, end], ["a", "b"], [1, 1], [0, 0], [0, 0], [[1.0, 2.0], [1.0]])
