"""Verify a finished export: its stored bytes, its job row and a fresh ``usage`` answer (issue 13, Reconciliation).

Finance should not have to re-add a file by hand to trust it, so ``analytics-gateway verify-export JOB_ID`` does
it: it streams the object once (memory stays flat whatever its size), hashes the exact bytes, parses the CSV,
re-adds its columns exactly (``int`` counts, ``Decimal`` spend) and compares

1. the sha256 with ``checksum_sha256``, the data rows with ``row_count``, the header with the contract's, and
   each row's org and day (time) with the job's org and window: the file is what the worker wrote;
2. the column sums with ``totals``: the worker summed what it wrote;
3. the column sums with a fresh ``usage`` answer for the same org and window (COST: the worker's own query,
   ``usage_rows`` by UTC day, model and project; INCIDENT: the same filters, when the export is not "errors
   only", which ``usage`` cannot express): the file still agrees with the API.

Each difference is a :class:`Finding` naming both values and a likely reason. A ``usage`` answer may rightly
move after the export's snapshot: events ingested later (``usage_events.ingested_at``, the ingesting
transaction's start, after ``snapshot_at``) or price versions written later. Those are counted in the same
database snapshot as the fresh answer, and a finding says whether they account for the whole difference.

Text cells are compared in the file's own encoding: the expected value is passed through
:func:`exports.csv_format.neutralize` rather than the cell through :func:`unneutralize`, because neutralizing is
not one-to-one (``=x`` and ``'=x`` are both written ``'=x``).
"""

from __future__ import annotations

import codecs
import csv
import datetime as dt
import decimal
import hashlib
import io
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from db import exports as queries
from db.exports import ExportJobRow
from db.prices import EXACT
from db.rollup import watermarks
from db.usage import UsageQuery, driver_connection, usage_rows
from exports.csv_format import (
    COST,
    FORMULA_PREFIXES,
    INCIDENT,
    CsvFormat,
    Kind,
    format_date,
    format_timestamp,
    neutralize,
)
from exports.jobs import ExportJobNotFound, Totals
from exports.storage.protocol import ObjectMissing, Storage
from kernel.errors import BadUserInput

SUM_FIELDS = ("requests", "input_tokens", "cached_input_tokens", "output_tokens", "spend")
MAX_EXAMPLES = 5  # rows named per kind of row problem, and days per difference
_INTEGER = re.compile(r"[0-9]+")
_DECIMAL = re.compile(r"[0-9]+(?:\.[0-9]+)?")  # contract §5: exact, no exponent (and never negative)
_DAY = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_TIMESTAMP = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{6}Z")  # csv_format's one width


class NotVerifiable(BadUserInput):
    """The job has no file to verify (not SUCCEEDED)."""


class CsvDamaged(ValueError):
    """The bytes are not a CSV the reader can go on with (not UTF-8, a quote left open at the end)."""


def unneutralize(cell: str) -> str:
    """A TEXT cell as it was before :func:`~exports.csv_format.neutralize`: the leading ``'`` removed where the
    writer adds one (before ``=``, ``+``, ``-``, ``@``, tab or CR). Not one-to-one: a value that itself began
    with ``'`` and a formula character reads back without its ``'``; U+FFFD replacements are not undone."""
    if cell.startswith("'") and cell[1:].startswith(FORMULA_PREFIXES):
        return cell[1:]
    return cell


class RecordReader:
    """CSV records from a byte stream fed in chunks of any size: UTF-8 decoded incrementally, each complete
    record (a quoted field may hold line breaks) parsed by the ``csv`` module, the partial tail kept for the
    next chunk. Memory: one chunk plus one record."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")
        self._carry = ""
        self._offset = 0  # bytes fed so far, for error messages

    def feed(self, chunk: bytes) -> list[list[str]]:
        try:
            decoded = self._decoder.decode(chunk)
        except UnicodeDecodeError as exc:
            raise CsvDamaged(f"not UTF-8 at byte {self._offset + exc.start:,}") from None
        self._offset += len(chunk)
        return self._records(self._carry + decoded, final=False)

    def finish(self) -> list[list[str]]:
        """The last records; :class:`CsvDamaged` when the bytes end inside a UTF-8 sequence or a quoted field."""
        try:
            tail = self._decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise CsvDamaged(f"not UTF-8: the file ends inside a character (byte {self._offset:,})") from None
        return self._records(self._carry + tail, final=True)

    def _records(self, buffered: str, *, final: bool) -> list[list[str]]:
        end = len(buffered) if final else _record_boundary(buffered)
        self._carry = buffered[end:]
        if final and buffered.count('"') % 2:
            raise CsvDamaged("the file ends inside a quoted field (truncated?)")
        if end == 0:
            return []
        return list(csv.reader(io.StringIO(buffered[:end], newline=""), strict=True))


def _record_boundary(buffered: str) -> int:
    """The end of the last complete record in ``buffered`` (just after a line feed outside quotes), 0 if none.
    RFC 4180 doubles a quote inside a quoted field, so a line feed is outside quotes when the quotes before it
    are even in number."""
    position = buffered.rfind("\n")
    quotes = buffered.count('"', 0, position) if position >= 0 else 0
    while position >= 0:
        if quotes % 2 == 0:
            return position + 1
        previous = buffered.rfind("\n", 0, position)
        quotes -= buffered.count('"', previous + 1, position)
        position = previous
    return 0


@dataclass
class _Sums:
    requests: int = 0
    input_tokens: int = 0
    cached_input_tokens: int = 0
    output_tokens: int = 0
    spend: decimal.Decimal = decimal.Decimal(0)

    def add(self, requests: int, input_tokens: int, cached: int, output: int, spend: decimal.Decimal) -> None:
        self.add_counts(requests, input_tokens, cached, output)
        self.spend = EXACT.add(self.spend, spend)  # exact whatever the digits (Inexact traps)

    def add_counts(self, requests: int, input_tokens: int, cached: int, output: int) -> None:
        self.requests += requests
        self.input_tokens += input_tokens
        self.cached_input_tokens += cached
        self.output_tokens += output

    def totals(self, with_spend: bool) -> Totals:
        return Totals(
            self.requests,
            self.input_tokens,
            self.cached_input_tokens,
            self.output_tokens,
            self.spend if with_spend else None,
        )


@dataclass
class _RowProblems:
    """Rows failing one check: how many, and the first few."""

    count: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, example: str) -> None:
        self.count += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(example)


class ColumnSums:
    """Re-adds one export's data rows (cells as read, header excluded) and checks each row's shape, org and
    window. ``problems`` maps a check's name to the rows that failed it."""

    def __init__(self, fmt: CsvFormat, job: ExportJobRow) -> None:
        self.format = fmt
        self.rows = 0
        self.by_day: dict[str, _Sums] = {}
        self.problems: dict[str, _RowProblems] = {}
        index = {column.name: n for n, column in enumerate(fmt.columns)}
        self._counts = tuple(index[name] for name in ("input_tokens", "cached_input_tokens", "output_tokens"))
        self._requests = index.get("requests")
        self._spend = index.get("spend_usd")
        self._org = index["org_id"]
        self._when = index["day"] if "day" in index else index["time"]
        self._org_cell = neutralize(job.org_id) if job.org_id is not None else None
        # The window as text of the column's one fixed width (COST: the UTC days it touches; INCIDENT: its
        # instants), so that a row is checked by comparing strings.
        if fmt is COST:
            self._when_shape = _DAY
            self._first = format_date(job.range_from.astimezone(dt.UTC).date())
            self._end = format_date((job.range_to.astimezone(dt.UTC) - dt.timedelta(microseconds=1)).date()) + "~"
        else:
            self._when_shape = _TIMESTAMP
            self._first, self._end = format_timestamp(job.range_from), format_timestamp(job.range_to)
        self._kinds = tuple(column.kind for column in fmt.columns)
        self._numbers = tuple(
            (n, column.name, column.kind.value, _INTEGER if column.kind is Kind.INTEGER else _DECIMAL)
            for n, column in enumerate(fmt.columns)
            if column.kind in (Kind.INTEGER, Kind.DECIMAL)
        )

    def add(self, cells: Sequence[str]) -> None:
        self.rows += 1
        if len(cells) != len(self._kinds):
            self._problem("malformed rows", f"row {self.rows:,}: {len(cells)} fields, not {len(self._kinds)}")
            return
        for index, name, kind, pattern in self._numbers:
            if not pattern.fullmatch(cells[index]):
                self._problem("malformed rows", f"row {self.rows:,}: {name} {cells[index][:40]!r} is not a {kind}")
                return
        when = cells[self._when]
        if not self._when_shape.fullmatch(when) or not _valid(when):
            name = self.format.columns[self._when].name
            self._problem("malformed rows", f"row {self.rows:,}: {name} {when[:40]!r} is not a valid UTC {name}")
            return
        if not self._first <= when < self._end:  # one fixed width: text order is time order
            self._problem("rows outside the window", f"row {self.rows:,}: {when}")
        day = when[:10]
        sums = self.by_day.get(day)
        if sums is None:
            sums = self.by_day[day] = _Sums()
        input_tokens, cached, output = (int(cells[n]) for n in self._counts)
        if self._spend is None:
            sums.add_counts(1, input_tokens, cached, output)
        else:
            sums.add_counts(int(cells[self._requests]), input_tokens, cached, output)  # type: ignore[index]
            sums.spend = EXACT.add(sums.spend, decimal.Decimal(cells[self._spend]))  # exact (Inexact traps)
        if self._org_cell is not None and cells[self._org] != self._org_cell:
            self._problem("rows of another org", f"row {self.rows:,}: org_id {cells[self._org][:60]!r}")

    def _problem(self, check: str, example: str) -> None:
        self.problems.setdefault(check, _RowProblems()).add(example)

    def totals(self) -> Totals:
        total = _Sums()
        for day in self.by_day.values():
            total.add(day.requests, day.input_tokens, day.cached_input_tokens, day.output_tokens, day.spend)
        return total.totals(with_spend=self._spend is not None)


def _valid(when: str) -> bool:
    """A real date (and time): the shape's regex lets 2026-02-30 and 25:00 through."""
    try:
        dt.datetime.fromisoformat(when)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class Finding:
    """One difference: ``check`` names what was compared, ``found`` is the value of the file (or the job
    field being checked), ``expected`` the value of ``against`` it should equal, ``reason`` the likely cause."""

    check: str
    found: str
    expected: str
    against: str
    reason: str

    def render(self) -> str:
        return f"- {self.check}: {self.found} in the file, {self.expected} in {self.against}\n    {self.reason}"


@dataclass
class Verification:
    """The outcome: ``ok`` when there is no finding. ``notes`` say what was not compared and why, and what
    the fresh answer saw (they never make a verification fail)."""

    job: ExportJobRow
    findings: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    sha256: str | None = None
    size: int = 0
    row_count: int | None = None
    file_totals: Totals | None = None
    usage_totals: Totals | None = None

    @property
    def ok(self) -> bool:
        return not self.findings

    def render(self) -> str:
        job = self.job
        org = job.org_id if job.org_id is not None else "all orgs"
        lines = [
            f"export job {job.id}: {job.kind}, {org}, [{_instant(job.range_from)}, {_instant(job.range_to)}), "
            f"snapshot at {_instant(job.snapshot_at) if job.snapshot_at else 'unknown'}",
            f"object {job.object_key}: {self.size:,} bytes, sha256 {self.sha256 or '-'}, "
            f"{self.row_count if self.row_count is not None else '-'} rows",
        ]
        if self.file_totals is not None:
            lines.append(f"file sums:  {_describe(self.file_totals)}")
        if self.usage_totals is not None:
            lines.append(f"usage now:  {_describe(self.usage_totals)}")
        lines.extend(f"note: {note}" for note in self.notes)
        if self.ok:
            lines.append("OK: the file matches its checksum, row count, totals and the usage answer")
        else:
            lines.append(f"NOT OK: {len(self.findings)} finding(s)")
            lines.extend(finding.render() for finding in self.findings)
        return "\n".join(lines)


def _instant(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


def _describe(totals: Totals) -> str:
    spend = f", spend {totals.spend} USD" if totals.spend is not None else ""
    return (
        f"{totals.requests:,} requests, {totals.input_tokens:,} input ({totals.cached_input_tokens:,} cached), "
        f"{totals.output_tokens:,} output tokens{spend}"
    )


def _values(totals: Totals) -> dict[str, object]:
    return {name: getattr(totals, name) for name in SUM_FIELDS if getattr(totals, name) is not None}


async def verify_export(engine: AsyncEngine, storage: Storage, job_id: uuid.UUID) -> Verification:
    """Verify export job ``job_id`` (see the module's docstring). :class:`ExportJobNotFound` for an unknown
    job, :class:`NotVerifiable` for one that is not SUCCEEDED."""
    async with engine.connect() as connection:
        job = await queries.get_export_job(connection, job_id)
    if job is None:
        raise ExportJobNotFound(f"export job {job_id} does not exist")
    if job.status != queries.SUCCEEDED:
        detail = f": {job.error}" if job.error else ""
        raise NotVerifiable(
            f"export job {job_id} is {job.status}, not SUCCEEDED{detail}; only a finished export has a file to verify"
        )
    result = Verification(job)
    fmt = COST if job.kind == "COST" else INCIDENT
    sums = await _read_object(storage, job, fmt, result)
    if sums is None:
        return result
    result.row_count = sums.rows
    result.file_totals = sums.totals()
    _check_totals(job, result.file_totals, result)
    await _check_usage(engine, job, sums, result)
    return result


async def _read_object(storage: Storage, job: ExportJobRow, fmt: CsvFormat, result: Verification) -> ColumnSums | None:
    """Stream the object once: hash it, parse it, re-add it; findings for what the file itself gets wrong.
    None when there is nothing to compare further (no object, or no rows to trust)."""
    if job.object_key is None:
        result.findings.append(Finding("object", "no object key", "an object", "the job", "the job row is damaged"))
        return None
    digest = hashlib.sha256()
    reader = RecordReader()
    sums = ColumnSums(fmt, job)
    header: list[str] | None = None
    damaged: str | None = None
    try:
        async for chunk in storage.read(job.object_key):
            digest.update(chunk)
            result.size += len(chunk)
            if damaged is not None:
                continue  # keep hashing: the checksum finding says whether the store or the worker is at fault
            try:
                records = reader.feed(chunk)
            except (CsvDamaged, csv.Error) as exc:
                damaged = str(exc)
                continue
            header = _add_records(records, header, sums)
        if damaged is None:
            header = _add_records(reader.finish(), header, sums)
    except ObjectMissing:
        result.findings.append(
            Finding(
                "object",
                "missing",
                job.object_key,
                "the store",
                "the object was deleted (retention, by hand) or never stored",
            )
        )
        return None
    except (CsvDamaged, csv.Error) as exc:
        damaged = str(exc)
    result.sha256 = digest.hexdigest()
    if result.sha256 != (job.checksum_sha256 or "").lower():
        result.findings.append(
            Finding(
                "checksum",
                result.sha256,
                str(job.checksum_sha256),
                "job.checksum_sha256",
                "the stored bytes are not the bytes the worker wrote (changed or replaced "
                "in the store, or a partial upload)",
            )
        )
    if damaged is not None:
        result.findings.append(
            Finding(
                "csv",
                damaged,
                "RFC 4180 UTF-8 CSV",
                "contract §5",
                "the file is damaged; its columns cannot be re-added",
            )
        )
        return None
    if header != list(fmt.header):
        found = ",".join(header) if header is not None else "an empty file"
        result.findings.append(
            Finding(
                "header",
                found[:300],
                ",".join(fmt.header),
                f"contract §5 ({fmt.name})",
                "not the contract's columns: another kind of export, or a damaged file",
            )
        )
        return None
    if sums.rows != job.row_count:
        result.findings.append(
            Finding(
                "row_count",
                f"{sums.rows:,}",
                f"{job.row_count}",
                "job.row_count",
                "rows were added to or lost from the file after the worker counted them",
            )
        )
    for check, problems in sums.problems.items():
        result.findings.append(
            Finding(
                check, f"{problems.count:,} row(s)", "none", f"the job's {_scope(job)}", "; ".join(problems.examples)
            )
        )
    return sums


def _add_records(records: list[list[str]], header: list[str] | None, sums: ColumnSums) -> list[str] | None:
    for record in records:
        if header is None:
            header = record
        else:
            sums.add(record)
    return header


def _scope(job: ExportJobRow) -> str:
    org = f"org {job.org_id!r}" if job.org_id is not None else "orgs"
    return f"{org} and window [{_instant(job.range_from)}, {_instant(job.range_to)})"


def _check_totals(job: ExportJobRow, file: Totals, result: Verification) -> None:
    if job.totals is None:
        result.findings.append(Finding("totals", "column sums", "none", "job.totals", "the job row has no totals"))
        return
    try:
        stored = Totals.from_json(job.totals)
    except (KeyError, ValueError, TypeError, decimal.InvalidOperation) as exc:
        result.findings.append(
            Finding(
                "totals",
                "column sums",
                str(job.totals)[:200],
                "job.totals",
                f"the job's totals cannot be read ({type(exc).__name__})",
            )
        )
        return
    found, expected = _values(file), _values(stored)
    for name in SUM_FIELDS:
        if found.get(name) != expected.get(name):
            result.findings.append(
                Finding(
                    f"totals.{name}",
                    str(found.get(name)),
                    str(expected.get(name)),
                    "job.totals",
                    "the file's column sum is not what the worker recorded: "
                    "the file was changed, or the worker summed other rows than it wrote",
                )
            )


@dataclass(frozen=True)
class _Fresh:
    """What the database answers now, in one snapshot."""

    totals: Totals
    by_day: dict[str, _Sums]
    unpriced_models: list[str]
    late: _Sums | None  # events of the export's selection ingested after its snapshot
    late_prices: int  # price versions written after the snapshot that apply inside the window


async def _check_usage(engine: AsyncEngine, job: ExportJobRow, sums: ColumnSums, result: Verification) -> None:
    params = job.params or {}
    if job.kind == "INCIDENT" and params.get("errors_only"):
        result.notes.append("not comparable with usage: filtered (errors only; usage counts every request)")
        return
    fresh = await _fresh_usage(engine, job)
    result.usage_totals = fresh.totals
    if job.kind == "INCIDENT" and any(
        params.get(name) is not None for name in ("models", "project_ids", "api_key_ids")
    ):
        result.notes.append("usage asked with the export's filters (models, projects, API keys)")
    file, now = _values(sums.totals()), _values(fresh.totals)
    differing = [name for name in SUM_FIELDS if name in file and file[name] != now[name]]
    if differing:
        reason = _why_usage_differs(job, result, sums, fresh)
        for name in differing:
            result.findings.append(
                Finding(f"usage.{name}", str(file[name]), str(now[name]), "a fresh usage answer", reason)
            )
    elif fresh.late is not None and fresh.late.requests:
        result.notes.append(f"{fresh.late.requests:,} event(s) arrived after the snapshot but leave the sums unchanged")
    if job.kind == "COST" and job.totals is not None and "unpriced_models" in job.totals:
        stored = sorted(job.totals.get("unpriced_models") or [])
        if stored != fresh.unpriced_models:
            reason = (
                f"{fresh.late_prices} price version(s) were written after the snapshot"
                if fresh.late_prices
                else "events of models without a price arrived after the snapshot, or prices were deleted"
            )
            result.findings.append(
                Finding(
                    "totals.unpriced_models", str(stored), str(fresh.unpriced_models), "a fresh usage answer", reason
                )
            )


def _why_usage_differs(job: ExportJobRow, result: Verification, sums: ColumnSums, fresh: _Fresh) -> str:
    reasons: list[str] = []
    file_matches_totals = not any(f.check.startswith(("totals.", "checksum", "row_count")) for f in result.findings)
    if not file_matches_totals:
        reasons.append("the file does not match the job's own totals or checksum (see above)")
    if fresh.late is None:
        reasons.append("the job records no snapshot instant, so late events cannot be counted")
    elif fresh.late.requests:
        late, snapshot = fresh.late, _instant(job.snapshot_at) if job.snapshot_at else "?"
        line = f"{late.requests:,} event(s) arrived after the export's snapshot (snapshot_at {snapshot})"
        explained = _minus(fresh.totals, late) == _values(sums.totals())
        line += "; without them usage equals the file exactly" if explained else "; they explain part of the difference"
        reasons.append(line)
    if fresh.late_prices:
        reasons.append(
            f"{fresh.late_prices} price version(s) in effect inside the window were written after the "
            "snapshot (spend is priced anew)"
        )
    if not reasons:
        reasons.append(
            "no late events or price changes: rows were deleted (raw retention?) or the usage query "
            "changed since the export"
        )
    days = [
        day
        for day in sorted(set(sums.by_day) | set(fresh.by_day))
        if _day_values(sums.by_day.get(day)) != _day_values(fresh.by_day.get(day))
    ]
    if days:
        shown = ", ".join(
            f"{d} (file {_day_values(sums.by_day.get(d))['requests']:,} / usage "
            f"{_day_values(fresh.by_day.get(d))['requests']:,} requests)"
            for d in days[:MAX_EXAMPLES]
        )
        more = f" and {len(days) - MAX_EXAMPLES} more" if len(days) > MAX_EXAMPLES else ""
        reasons.append(f"days that differ: {shown}{more}")
    return "; ".join(reasons)


def _day_values(sums: _Sums | None) -> dict[str, object]:
    sums = sums or _Sums()
    return {
        "requests": sums.requests,
        "input_tokens": sums.input_tokens,
        "cached_input_tokens": sums.cached_input_tokens,
        "output_tokens": sums.output_tokens,
        "spend": sums.spend,
    }


def _minus(totals: Totals, late: _Sums) -> dict[str, object]:
    """The fresh totals without the late events."""
    spend = EXACT.subtract(totals.spend, late.spend) if totals.spend is not None else None
    return _values(
        Totals(
            totals.requests - late.requests,
            totals.input_tokens - late.input_tokens,
            totals.cached_input_tokens - late.cached_input_tokens,
            totals.output_tokens - late.output_tokens,
            spend,
        )
    )


_LATE_EVENTS = """
SELECT count(*) AS requests, coalesce(sum(e.input_tokens), 0) AS input_tokens,
       coalesce(sum(e.cached_input_tokens), 0) AS cached_input_tokens,
       coalesce(sum(e.output_tokens), 0) AS output_tokens,
       trim_scale(coalesce(sum((e.input_tokens - e.cached_input_tokens) * p.input_per_million
                               + e.cached_input_tokens * p.cached_input_per_million
                               + e.output_tokens * p.output_per_million), 0) * 0.000001) AS spend
FROM usage_events e
LEFT JOIN LATERAL (
    SELECT input_per_million, cached_input_per_million, output_per_million FROM model_prices p
    WHERE p.model = e.model AND p.effective_from <= e.event_time ORDER BY p.effective_from DESC LIMIT 1
) p ON true
WHERE ($1::text IS NULL OR e.org_id = $1) AND e.event_time >= $2 AND e.event_time < $3 AND e.ingested_at > $4
  AND ($5::text[] IS NULL OR e.model = ANY($5::text[]))
  AND ($6::text[] IS NULL OR e.project_id = ANY($6::text[]))
  AND ($7::text[] IS NULL OR e.api_key_id = ANY($7::text[]))
"""
_LATE_PRICES = """
SELECT count(*) FROM model_prices WHERE created_at > $1 AND effective_from < $2
"""


async def _fresh_usage(engine: AsyncEngine, job: ExportJobRow) -> _Fresh:
    """The usage answer for the job's org and window now, the late events and the late prices, all in one
    read-only REPEATABLE READ snapshot so that they add up."""
    params = job.params or {}
    filtered = job.kind == "INCIDENT"
    query = UsageQuery(
        org_id=job.org_id,
        start=job.range_from,
        end=job.range_to,
        granularity="DAY",
        time_zone="UTC",
        group_by=frozenset({"model", "project_id"}) if job.kind == "COST" else frozenset(),
        models=params.get("models") if filtered else None,
        project_ids=params.get("project_ids") if filtered else None,
        api_key_ids=params.get("api_key_ids") if filtered else None,
    )
    async with engine.connect() as connection, connection.begin():
        # The first statement begins the transaction (lazily); the driver-level statements below run in it.
        await connection.execute(text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY"))
        rows = await usage_rows(connection, query, (await watermarks(connection)).materialized_through)
        late, late_prices = await _late(connection, job, query)
    total, by_day, unpriced = _Sums(), dict[str, _Sums](), set[str]()
    for row in rows:
        values = (row.requests, row.input_tokens, row.cached_input_tokens, row.output_tokens, row.spend)
        total.add(*values)
        day = row.bucket.astimezone(dt.UTC).date().isoformat() if row.bucket is not None else "?"
        by_day.setdefault(day, _Sums()).add(*values)
        if row.unpriced:
            unpriced.add(row.model)
    return _Fresh(total.totals(with_spend=job.kind == "COST"), by_day, sorted(unpriced), late, late_prices)


async def _late(connection: AsyncConnection, job: ExportJobRow, query: UsageQuery) -> tuple[_Sums | None, int]:
    if job.snapshot_at is None:
        return None, 0
    raw = await driver_connection(connection)
    listed = [list(v) if v is not None else None for v in (query.models, query.project_ids, query.api_key_ids)]
    row: Any = await raw.fetchrow(_LATE_EVENTS, job.org_id, job.range_from, job.range_to, job.snapshot_at, *listed)
    late = _Sums(
        int(row["requests"]),
        int(row["input_tokens"]),
        int(row["cached_input_tokens"]),
        int(row["output_tokens"]),
        decimal.Decimal(row["spend"]),
    )
    prices = int(await raw.fetchval(_LATE_PRICES, job.snapshot_at, job.range_to))
    return late, prices
