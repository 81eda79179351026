"""The verifier's streaming CSV reader and the inverse of neutralization, against the real writer."""

from __future__ import annotations

import csv
import datetime as dt
import decimal
import io
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from db.exports import ExportJobRow
from exports.csv_format import COST, FORMULA_PREFIXES, INCIDENT, encode, neutralize
from exports.jobs import Totals
from exports.verify import ColumnSums, CsvDamaged, RecordReader, unneutralize

TEXT = st.text(alphabet=st.sampled_from(['"', ",", "\r", "\n", "'", "=", "-", "@", "\t", "a", "é", "€", "😀"]))
START = dt.datetime(2026, 11, 3, tzinfo=dt.UTC)


def incident_row(n: int, error_type: str, region: str) -> tuple[object, ...]:
    return (START + dt.timedelta(microseconds=n), f"evt-{n}", "api", "org_a", "proj", "key", "m", 500, error_type,
            12.5, None, 10, 1, 3, region)  # fmt: skip


def read_in_chunks(data: bytes, sizes: list[int]) -> list[list[str]]:
    reader, records, position = RecordReader(), [], 0
    for size in sizes:
        records += reader.feed(data[position : position + size])
        position += size
    records += reader.feed(data[position:])
    return records + reader.finish()


@settings(max_examples=300)
@given(cells=st.lists(st.tuples(TEXT, TEXT), max_size=8), sizes=st.lists(st.integers(1, 40), max_size=60))
def test_records_read_in_any_chunks_are_the_csv_modules_records_of_the_whole_file(
    cells: list[tuple[str, str]], sizes: list[int]
) -> None:
    data = encode(INCIDENT, [incident_row(n, a, b) for n, (a, b) in enumerate(cells)])
    whole = list(csv.reader(io.StringIO(data.decode("utf-8"), newline="")))
    records = read_in_chunks(data, sizes)
    assert records == whole
    assert len(records) == len(cells) + 1
    assert [(r[8], r[14]) for r in records[1:]] == [(neutralize(a), neutralize(b)) for a, b in cells]


def test_a_quoted_line_break_split_across_chunks_stays_in_its_field() -> None:
    data = encode(INCIDENT, [incident_row(0, 'timeout\r\n"x", y', "=eu")])
    cut = data.index(b"\r\n", data.index(b"timeout"))  # inside the quoted field
    records = read_in_chunks(data, [cut, 1, 1])
    assert records[1][8] == 'timeout\r\n"x", y'
    assert records[1][14] == "'=eu"


def test_a_character_split_across_chunks_decodes() -> None:
    data = encode(INCIDENT, [incident_row(0, "€uro", "😀")])
    cut = data.index("€".encode()) + 1
    assert read_in_chunks(data, [cut, 2])[1][8] == "€uro"


def test_a_file_cut_inside_a_quoted_field_is_damaged() -> None:
    data = encode(INCIDENT, [incident_row(0, 'a "quoted" error', "eu")])
    reader = RecordReader()
    reader.feed(data[: data.index(b"quoted")])
    with pytest.raises(CsvDamaged, match="quoted field"):
        reader.finish()


def test_bytes_that_are_not_utf8_are_damaged_at_their_offset() -> None:
    reader = RecordReader()
    reader.feed(b"time,event_id\r\n")
    with pytest.raises(CsvDamaged, match="byte 17"):
        reader.feed(b"ab\xff\r\n")


@given(st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\x00")))
def test_unneutralize_undoes_neutralize_except_for_its_one_ambiguity(value: str) -> None:
    restored = unneutralize(neutralize(value))
    if value.startswith("'") and value[1:].startswith(FORMULA_PREFIXES):
        assert restored == value[1:]  # written as the writer writes "=x": it reads back as "=x"
    else:
        assert restored == value


def test_unneutralize_keeps_an_apostrophe_the_writer_did_not_add() -> None:
    assert unneutralize("'quoted'") == "'quoted'"
    assert unneutralize("'=SUM(A1)") == "=SUM(A1)"
    assert unneutralize("'") == "'"


def cost_job(org_id: str | None) -> ExportJobRow:
    start, end = dt.datetime(2026, 11, 1, tzinfo=dt.UTC), dt.datetime(2026, 11, 3, 12, tzinfo=dt.UTC)
    return ExportJobRow(uuid.uuid4(), org_id, "COST", "SUCCEEDED", "finance", start, end, start, None, None, 1, None,
                        None, None, None, None)  # fmt: skip


def test_cost_rows_are_re_added_exactly_and_checked_for_org_window_and_shape() -> None:
    sums = ColumnSums(COST, cost_job("=org"))
    tiny = "0.0000000000000000000000000000001"  # 31 decimals: the default 28-digit context would round the sum
    for cells in (
        ["'=org", "p", "m", "2026-11-01", "2", "10", "1", "5", "1000000000000"],
        ["'=org", "p", "m", "2026-11-01", "1", "1", "0", "1", tiny],  # the same day: one sum
        ["org_b", "p", "m", "2026-11-02", "1", "1", "0", "1", "0"],  # another org
        ["'=org", "p", "m", "2026-11-04", "1", "1", "0", "1", "0"],  # the day after the window
        ["'=org", "p", "m", "2026-11-02", "1", "1", "0", "1", "1E-7"],  # an exponent
        ["'=org", "p", "m", "2026-02-30", "1", "1", "0", "1", "0"],  # no such day
        ["'=org", "p", "m", "2026-11-02", "-1", "1", "0", "1", "0"],  # negative
    ):
        sums.add(cells)
    assert sums.rows == 7
    assert sums.totals() == Totals(5, 13, 1, 8, decimal.Decimal("1000000000000" + tiny[1:]))
    assert {check: problems.count for check, problems in sums.problems.items()} == {
        "rows of another org": 1, "rows outside the window": 1, "malformed rows": 3,
    }  # fmt: skip
    assert sums.problems["rows outside the window"].examples == ["row 4: 2026-11-04"]
    assert sorted(sums.by_day) == ["2026-11-01", "2026-11-02", "2026-11-04"]
