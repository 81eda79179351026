"""The two export CSV formats (contract §5) and their exact cell encoding.

RFC 4180: UTF-8, a header row, ``\\r\\n`` line ends, a field quoted when it holds a comma, a double quote, CR or
LF, and a double quote inside a quoted field doubled. Each column has one kind, so a cell is encoded by what its
column holds, never by guessing from the value:

- TEXT (ids, model, source, error_type, region): free text from producers, neutralized against CSV injection
  (OWASP): a cell that starts with ``=``, ``+``, ``-``, ``@``, tab or CR gets a leading ``'``. NUL and lone
  surrogates (impossible upstream: PostgreSQL text holds neither) become U+FFFD, so any string encodes.
- INTEGER, DECIMAL, FLOAT: plain digits, no exponent, no trailing zeros (``0.0002``, ``100``, ``0``), the same
  canonical form as the API's ``Decimal`` scalar; a float prints its shortest round-trip value. Numbers are
  never neutralized: every numeric column of the contract is non-negative (the database's CHECKs on tokens,
  latencies and status codes; prices are >= 0), so no number starts with ``-``. Integers go to the writer as
  they are; a negative or non-finite decimal or float is a bug upstream and raises ``ValueError``.
- TIMESTAMP: UTC, RFC 3339, always six fractional digits and ``Z`` (``2026-11-03T14:05:09.000000Z``): one
  fixed width, so every parser sees one shape and text order equals time order.
- DATE: ``YYYY-MM-DD`` (the UTC day).
- NULL (``None``) in any column: an empty field.

Rows are encoded into parts of at least ``part_size`` bytes (8 MiB by default; S3 needs 5 MiB for every
multipart part but the last), so memory stays flat whatever the row count.
"""

from __future__ import annotations

import csv
import datetime as dt
import decimal
import io
import math
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from enum import Enum
from functools import cached_property
from typing import Any

PART_SIZE = 8 * 1024 * 1024
S3_MIN_PART_SIZE = 5 * 1024 * 1024
_TEXT_CHUNK = 64 * 1024

FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
WRITER: dict[str, Any] = {"lineterminator": "\r\n", "quoting": csv.QUOTE_MINIMAL}  # RFC 4180 as above
_WIDE = decimal.Context(prec=100)  # normalize() rounds to the context's precision: keep every digit


class Kind(Enum):
    TEXT = "text"
    INTEGER = "integer"
    DECIMAL = "decimal"
    FLOAT = "float"
    TIMESTAMP = "timestamp"
    DATE = "date"


def neutralize(text: str) -> str:
    """A free-text cell as a spreadsheet shows it as text, never as a formula (OWASP CSV injection)."""
    if "\x00" in text or not text.isascii():
        text = _UNSTORABLE.sub("\ufffd", text)
    return "'" + text if text.startswith(FORMULA_PREFIXES) else text


def format_decimal(value: decimal.Decimal) -> str:
    """Exact, no exponent, no trailing zeros; refuses negative and non-finite values."""
    if not value.is_finite() or value < 0:
        raise ValueError(f"export numbers are finite and non-negative, got {value}")
    text = str(value)
    if "E" not in text and not ("." in text and text.endswith("0")) and text[0] != "-":
        return text  # already canonical, as SQL's trimmed amounts are: skip the slow path
    if value == 0:
        return "0"  # also Decimal("-0") and Decimal("0E-12")
    return format(value.normalize(_WIDE), "f")


def format_float(value: float) -> str:
    """The shortest decimal that reads back as the same float, without an exponent (``1e-05`` -> ``0.00001``)."""
    text = repr(value)
    if "e" in text or "n" in text or value < 0:  # an exponent, nan or inf, or negative
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"export numbers are finite and non-negative, got {value!r}")
        return format_decimal(decimal.Decimal(text))
    return text[:-2] if text.endswith(".0") else text


def format_timestamp(value: dt.datetime) -> str:
    if value.tzinfo is not dt.UTC:
        if value.tzinfo is None:
            raise ValueError("naive datetime in an export: the database must return timestamptz")
        value = value.astimezone(dt.UTC)
    return value.isoformat(timespec="microseconds")[:-6] + "Z"  # "+00:00" -> "Z"


def format_date(value: dt.date) -> str:
    if isinstance(value, dt.datetime):
        raise ValueError("a DATE column got a datetime: the query must return a date")
    return value.isoformat()


# INTEGER columns are not formatted: the CSV writer prints an int itself (in C). They are counts, tokens and
# status codes, non-negative by the database's CHECK constraints, so no cell of ours starts with "-".
_FORMATTERS: dict[Kind, Callable[[Any], str]] = {
    Kind.TEXT: neutralize,
    Kind.DECIMAL: format_decimal,
    Kind.FLOAT: format_float,
    Kind.TIMESTAMP: format_timestamp,
    Kind.DATE: format_date,
}


@dataclass(frozen=True)
class Column:
    name: str
    kind: Kind


@dataclass(frozen=True)
class CsvFormat:
    """One export's columns, in file order."""

    name: str
    columns: tuple[Column, ...]

    @property
    def header(self) -> tuple[str, ...]:
        return tuple(column.name for column in self.columns)

    def cells(self, row: Sequence[Any]) -> list[Any]:
        """One row's values (in column order) as the cells handed to the CSV writer: strings, plus integers
        left as they are (the writer prints them; ``None`` prints as an empty field)."""
        if len(row) != len(self.columns):
            raise ValueError(f"{self.name} rows have {len(self.columns)} values, got {len(row)}")
        cells = list(row)
        for index, write in self._formatters:
            value = cells[index]
            if value is not None:
                cells[index] = write(value)
        return cells

    @cached_property
    def _formatters(self) -> tuple[tuple[int, Callable[[Any], str]], ...]:
        return tuple(
            (index, _FORMATTERS[column.kind]) for index, column in enumerate(self.columns) if column.kind in _FORMATTERS
        )


def _columns(spec: str) -> tuple[Column, ...]:
    return tuple(Column(name, Kind(kind)) for name, kind in (item.split(":") for item in spec.split()))


COST = CsvFormat(
    "COST",
    _columns(
        "org_id:text project_id:text model:text day:date requests:integer input_tokens:integer "
        "cached_input_tokens:integer output_tokens:integer spend_usd:decimal"
    ),
)
INCIDENT = CsvFormat(
    "INCIDENT",
    _columns(
        "time:timestamp event_id:text source:text org_id:text project_id:text api_key_id:text model:text "
        "status_code:integer error_type:text latency_ms:float ttft_ms:float input_tokens:integer "
        "cached_input_tokens:integer output_tokens:integer region:text"
    ),
)
COST_HEADER = ",".join(COST.header)
INCIDENT_HEADER = ",".join(INCIDENT.header)


class PartEncoder:
    """Encodes rows of one format into byte parts: the header first, every part but the last >= ``part_size``.

    ``add(row)`` returns a finished part when the buffer reached ``part_size``, else ``None``; ``finish()``
    returns the rest, which is empty only when the last ``add`` just returned a part (the header makes the
    first part non-empty). ``rows`` counts the rows added.
    """

    def __init__(self, fmt: CsvFormat, part_size: int = PART_SIZE) -> None:
        if part_size < 1:
            raise ValueError("part_size must be positive")
        self.format = fmt
        self.part_size = part_size
        self.rows = 0
        # Text goes to a small StringIO and moves to the part's bytes every _TEXT_CHUNK characters: memory
        # stays near one part (plus its copy when handed out), not the several copies of one large StringIO.
        self._text = io.StringIO()
        self._writer = csv.writer(self._text, **WRITER)
        self._chars = self._writer.writerow(fmt.header)
        self._part = bytearray()
        self._finished = False

    def add(self, row: Sequence[Any]) -> bytes | None:
        if self._finished:
            raise RuntimeError("rows added after finish()")
        self._chars += self._writer.writerow(self.format.cells(row))
        self.rows += 1
        if self._chars < _TEXT_CHUNK:
            return None
        self._move_text()
        return self._take_part() if len(self._part) >= self.part_size else None

    def finish(self) -> bytes:
        self._finished = True
        self._move_text()
        return self._take_part()

    def _move_text(self) -> None:
        self._part += self._text.getvalue().encode("utf-8")
        self._text.seek(0)
        self._text.truncate()
        self._chars = 0

    def _take_part(self) -> bytes:
        part = bytes(self._part)
        self._part = bytearray()
        return part


def encode_parts(fmt: CsvFormat, rows: Iterable[Sequence[Any]], part_size: int = PART_SIZE) -> Iterator[bytes]:
    """The whole file as parts (see :class:`PartEncoder`); joined, they are the exact file bytes."""
    encoder = PartEncoder(fmt, part_size)
    for row in rows:
        part = encoder.add(row)
        if part is not None:
            yield part
    tail = encoder.finish()
    if tail:  # empty only when the last row closed a part
        yield tail


def line(fmt: CsvFormat, row: Sequence[Any]) -> str:
    """One row as its line of the file (CRLF included): for a row the SQL writer leaves to Python
    (db/export_rows.py)."""
    text = io.StringIO()
    csv.writer(text, **WRITER).writerow(fmt.cells(row))
    return text.getvalue()


def encode(fmt: CsvFormat, rows: Iterable[Sequence[Any]]) -> bytes:
    """A whole (small) file at once: for tests and previews."""
    return b"".join(encode_parts(fmt, rows))
