from __future__ import annotations

import datetime as dt
import decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from schema.json import dumps
from schema.scalars import (
    MAX_DECIMAL_DIGITS,
    parse_bigint,
    parse_datetime,
    parse_decimal,
    serialize_datetime,
    serialize_decimal,
)


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (decimal.Decimal("12.5000025"), "12.5000025"),
        (decimal.Decimal("1E-7"), "0.0000001"),
        (decimal.Decimal("1E+3"), "1000"),
        (decimal.Decimal("0.000"), "0"),
        (decimal.Decimal("-3.10"), "-3.1"),
        (decimal.Decimal("0.00020"), "0.0002"),
        (decimal.Decimal("123456789012345678901234567890.123456789"), "123456789012345678901234567890.123456789"),
    ],
)
def test_decimal_is_an_exact_string_without_exponent(value: decimal.Decimal, text: str) -> None:
    assert serialize_decimal(value) == text


@given(st.decimals(allow_nan=False, allow_infinity=False, places=12, min_value=-(10**20), max_value=10**20))
def test_decimal_round_trips_exactly(value: decimal.Decimal) -> None:
    text = serialize_decimal(value)
    assert "E" not in text.upper()
    assert parse_decimal(text) == value


@pytest.mark.parametrize("bad", ["NaN", "Infinity", "abc", 1.5, True, None])
def test_decimal_rejects_non_exact_input(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_decimal(bad)


def test_datetime_is_answered_in_utc_with_z() -> None:
    kolkata = dt.timezone(dt.timedelta(hours=5, minutes=30))
    answer = {
        "a": serialize_datetime(dt.datetime(2026, 11, 29, 17, 30, tzinfo=kolkata)),
        "b": serialize_datetime(dt.datetime(2026, 11, 29, 12, 0, 0, 123000, tzinfo=dt.UTC)),
    }
    assert dumps(answer) == b'{"a":"2026-11-29T12:00:00Z","b":"2026-11-29T12:00:00.123000Z"}'
    with pytest.raises(ValueError):
        serialize_datetime(dt.datetime(2026, 11, 29))


def test_datetime_input_needs_an_offset() -> None:
    assert parse_datetime("2026-11-29T12:00:00+05:30") == dt.datetime(2026, 11, 29, 6, 30, tzinfo=dt.UTC)
    assert parse_datetime("2026-11-29T12:00:00Z").tzinfo == dt.UTC
    for bad in ("2026-11-29T12:00:00", "yesterday", 1700000000):
        with pytest.raises(ValueError):
            parse_datetime(bad)


def test_bigint_is_a_64_bit_integer() -> None:
    assert parse_bigint(2**53 + 1) == 2**53 + 1
    for bad in (2**63, "12", 1.0, True):
        with pytest.raises(ValueError):
            parse_bigint(bad)


@pytest.mark.parametrize(
    "bad", ["1e999999", "-1e999999", "1e-999999", "0E-1000", "1" * (MAX_DECIMAL_DIGITS + 1),
            "0." + "1" * (MAX_DECIMAL_DIGITS + 1), "1E+38"],
)  # fmt: skip
def test_decimal_input_is_bounded(bad: str) -> None:
    """Finite is not enough: 1e999999 is finite, and PostgreSQL's NUMERIC (and exact arithmetic) cannot take it."""
    with pytest.raises(ValueError, match="out of range"):
        parse_decimal(bad)


@pytest.mark.parametrize("good", ["9" * MAX_DECIMAL_DIGITS, "0." + "9" * MAX_DECIMAL_DIGITS, "1E+37", "2.5e-30", "0"])
def test_decimal_input_within_bounds_is_exact(good: str) -> None:
    assert parse_decimal(good) == decimal.Decimal(good)


def test_datetime_that_overflows_in_utc_is_a_value_error() -> None:
    for bad in ("0001-01-01T00:00:00+01:00", "9999-12-31T23:00:00-05:00"):
        with pytest.raises(ValueError, match="out of range"):
            parse_datetime(bad)
    assert parse_datetime("0001-01-01T00:00:00-01:00") == dt.datetime(1, 1, 1, 1, tzinfo=dt.UTC)
