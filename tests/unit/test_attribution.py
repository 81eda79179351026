"""Attribution of a spike to model / status code / error type (reliability/attribution.py)."""

from __future__ import annotations

import pytest

from reliability.attribution import Composition, Contribution, Key, attribute


def comp(requests: dict[str, int], hits: dict[Key, int]) -> Composition:
    return Composition(requests=requests, hits=hits)


def row(c: Contribution) -> tuple[str | None, int | None, str | None]:
    return c.model, c.status_code, c.error_type


REFERENCE = comp(
    {"a": 100_000, "b": 50_000, "c": 50_000},
    {
        ("a", 500, "internal_error"): 500,
        ("a", 503, "service_unavailable"): 200,
        ("b", 500, "internal_error"): 250,
        ("b", 503, "service_unavailable"): 100,
        ("c", 500, "internal_error"): 250,
        ("c", 503, "service_unavailable"): 100,
    },
)


def test_a_whole_model_failing_with_mixed_status_codes_is_the_model() -> None:
    spike = comp(
        {"a": 1000, "b": 500, "c": 500},
        {
            ("a", 500, "internal_error"): 5,
            ("a", 503, "service_unavailable"): 2,
            ("b", 500, "internal_error"): 120,
            ("b", 502, "bad_gateway"): 80,
            ("b", 503, "service_unavailable"): 60,
            ("c", 500, "internal_error"): 3,
        },
    )
    rows = attribute(spike, REFERENCE)
    assert row(rows[0]) == ("b", None, None)
    assert rows[0].count == 260
    assert rows[0].share >= 0.8


def test_ranked_by_excess_not_raw_count() -> None:
    """Model a always fails a lot; b bursts with fewer errors than a has: b comes first."""
    reference = comp({"a": 10_000, "b": 10_000}, {("a", 500, "internal_error"): 1000, ("b", 500, "internal_error"): 10})
    spike = comp({"a": 1000, "b": 1000}, {("a", 500, "internal_error"): 100, ("b", 500, "internal_error"): 60})
    rows = attribute(spike, reference)
    assert row(rows[0]) == ("b", None, None) or row(rows[0])[0] == "b"
    assert rows[0].share == pytest.approx((60 - 1) / (160 - 101), rel=1e-6)
    assert all(r.model != "a" for r in rows)  # a is where it always is: no excess


def test_one_status_code_on_every_model_is_the_status_code() -> None:
    spike = comp(
        {"a": 1000, "b": 500, "c": 500},
        {
            ("a", 500, "internal_error"): 5,
            ("a", 529, "overloaded"): 100,
            ("b", 529, "overloaded"): 50,
            ("c", 529, "overloaded"): 50,
            ("b", 500, "internal_error"): 2,
        },
    )
    first = attribute(spike, REFERENCE)[0]
    assert (first.model, first.status_code) == (None, 529)
    assert first.error_type in (None, "overloaded")
    assert first.share >= 0.95


def test_one_status_code_on_one_model_is_that_pair() -> None:
    spike = comp(
        {"a": 1000, "b": 500, "c": 500},
        {("a", 500, "internal_error"): 5, ("c", 504, "upstream_timeout"): 90, ("b", 500, "internal_error"): 2},
    )
    first = attribute(spike, REFERENCE)[0]
    assert (first.model, first.status_code) == ("c", 504)
    assert first.count == 90


def test_one_model_carrying_all_traffic_is_not_named_for_a_status_burst() -> None:
    reference = comp({"a": 10_000}, {("a", 500, "internal_error"): 100, ("a", 503, "service_unavailable"): 20})
    spike = comp({"a": 1000}, {("a", 500, "internal_error"): 10, ("a", 503, "service_unavailable"): 80})
    assert row(attribute(spike, reference)[0])[:2] == (None, 503)
    mixed = comp({"a": 1000}, {("a", 500, "internal_error"): 50, ("a", 503, "service_unavailable"): 10})
    assert row(attribute(mixed, reference)[0]) == ("a", None, None)  # no dimension explains more: the model


def test_rows_are_distinct_ranked_and_bounded() -> None:
    spike = comp(
        {"a": 1000, "b": 500, "c": 500},
        {
            ("a", 503, "service_unavailable"): 60,
            ("b", 500, "internal_error"): 40,
            ("c", 502, "bad_gateway"): 20,
            ("c", 500, "internal_error"): 3,
        },
    )
    rows = attribute(spike, REFERENCE, limit=2)
    assert len(rows) == 2
    assert [r.share for r in rows] == sorted((r.share for r in rows), reverse=True)
    assert all(0 <= r.share <= 1 for r in rows)
    assert row(rows[0])[0] == "a"
    assert row(rows[1])[0] == "b"


def test_no_excess_no_rows() -> None:
    same = comp({"a": 1000, "b": 500, "c": 500}, {("a", 500, "internal_error"): 5, ("b", 500, "internal_error"): 2})
    assert attribute(same, REFERENCE) == []
    assert attribute(comp({"a": 10}, {}), REFERENCE) == []


def test_without_a_reference_raw_counts_rank() -> None:
    spike = comp({"a": 100, "b": 100}, {("a", 500, "internal_error"): 30, ("b", 502, "bad_gateway"): 10})
    rows = attribute(spike, comp({}, {}))
    assert [row(r)[0] for r in rows] == ["a", "b"]
    assert rows[0].share == pytest.approx(0.75)


def test_a_new_model_is_judged_against_the_overall_rate() -> None:
    spike = comp({"a": 1000, "new": 1000}, {("a", 500, "internal_error"): 5, ("new", 500, "internal_error"): 200})
    assert row(attribute(spike, REFERENCE)[0])[0] == "new"
