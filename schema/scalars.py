"""The contract's custom scalars, mapped onto plain Python types.

Resolvers return ``datetime``, ``decimal.Decimal`` and ``int``; the schema's
``scalar_map`` turns them into ``DateTime`` (RFC 3339, answered in UTC with
``Z``), ``Decimal`` (an exact string with no exponent) and ``BigInt`` (a JSON
integer).
"""

from __future__ import annotations

import datetime as dt
import decimal
from typing import NewType

import strawberry
from strawberry.types.scalar import ScalarDefinition

BigInt = NewType("BigInt", int)

_MAX_BIGINT = 2**63 - 1


def serialize_datetime(value: dt.datetime) -> dt.datetime:
    """The instant in UTC, left as a datetime: the response encoder (orjson with
    OPT_UTC_Z, schema/json.py) writes it as RFC 3339 with "Z", in C."""
    if value.tzinfo is None:
        raise ValueError("naive datetime reached the API; the database must return timestamptz")
    return value if value.tzinfo is dt.UTC else value.astimezone(dt.UTC)


def parse_datetime(value: object) -> dt.datetime:
    if not isinstance(value, str):
        raise ValueError("DateTime must be an RFC 3339 string")
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"DateTime {value!r} is not RFC 3339") from None
    if parsed.tzinfo is None:
        raise ValueError(f"DateTime {value!r} needs an offset (Z or ±hh:mm)")
    try:
        return parsed.astimezone(dt.UTC)
    except OverflowError:  # e.g. 0001-01-01T00:00:00+01:00 is before year 1 in UTC
        raise ValueError(f"DateTime {value!r} is out of range in UTC (years 1 to 9999)") from None


_WIDE = decimal.Context(prec=100)
# Bounds of every Decimal argument: far beyond any price or amount, and within what PostgreSQL's NUMERIC
# stores and what exact arithmetic (db/prices.EXACT, 80 digits) can multiply by a 64-bit token count. Without
# them "1e999999" parsed and failed in the database (INTERNAL).
MAX_DECIMAL_DIGITS = 38  # significant digits; also the most digits after the point, and before it


def serialize_decimal(value: decimal.Decimal) -> str:
    """Canonical: no exponent, no trailing zeros ("0.0002", "100"), so equal amounts print alike."""
    text = str(value)
    if "E" in text or ("." in text and text.endswith("0")):  # amounts from SQL are already trimmed
        return format(value.normalize(_WIDE), "f")
    return text


def parse_decimal(value: object) -> decimal.Decimal:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError('Decimal must be a string such as "12.50" (or an integer)')
    try:
        parsed = decimal.Decimal(value)
    except decimal.InvalidOperation:
        raise ValueError(f"Decimal {value!r} is not a decimal number") from None
    if not parsed.is_finite():
        raise ValueError(f"Decimal {value!r} must be finite")
    _, digits, exponent = parsed.as_tuple()
    assert isinstance(exponent, int)  # finite
    if len(digits) > MAX_DECIMAL_DIGITS or exponent < -MAX_DECIMAL_DIGITS or parsed.adjusted() >= MAX_DECIMAL_DIGITS:
        shown = value if len(str(value)) <= 40 else f"{str(value)[:40]}..."
        raise ValueError(
            f"Decimal {shown!r} is out of range: at most {MAX_DECIMAL_DIGITS} significant digits, "
            f"{MAX_DECIMAL_DIGITS} after the point and {MAX_DECIMAL_DIGITS} before it"
        )
    return parsed


def serialize_bigint(value: int) -> int:
    return int(value)


def parse_bigint(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError("BigInt must be a JSON integer")
    if not -_MAX_BIGINT - 1 <= value <= _MAX_BIGINT:
        raise ValueError("BigInt must fit in 64 bits")
    return value


SCALAR_MAP: dict[object, ScalarDefinition] = {
    dt.datetime: strawberry.scalar(
        name="DateTime",
        description="RFC 3339 date-time with an offset; answered in UTC (Z).",
        serialize=serialize_datetime,
        parse_value=parse_datetime,
    ),
    decimal.Decimal: strawberry.scalar(
        name="Decimal",
        description="An exact decimal, serialized as a JSON string with no exponent.",
        serialize=serialize_decimal,
        parse_value=parse_decimal,
    ),
    BigInt: strawberry.scalar(
        name="BigInt",
        description="A 64-bit integer, serialized as a JSON integer (exact up to 2^53 - 1 in JavaScript).",
        serialize=serialize_bigint,
        parse_value=parse_bigint,
    ),
}
