"""One attempt's work: read a job's rows in one snapshot, write them as CSV parts into the store, and record
the file's column sums.

PostgreSQL writes the CSV lines (db/export_rows.py: the formats of exports/csv_format.py in SQL, byte for byte;
a row it cannot format exactly comes back raw and is formatted here). COST sums are added up from the rows as
they are written; INCIDENT sums (a request per row, the token columns) come from the same rows in the same
snapshot, and the row count written is checked against them.

Memory stays flat: rows arrive ``PREFETCH`` at a time from a server-side cursor, and at most one part (8 MiB)
is buffered before it is uploaded. On any failure or cancellation the upload is aborted (no multipart
upload is left behind, no partial object is visible).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import decimal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import asyncpg
import structlog
from sqlalchemy.ext.asyncio import AsyncEngine

from db.export_rows import cost_lines_statement, incident_lines_statement, incident_totals_statement, snapshot
from db.exports import ExportJobRow
from db.prices import EXACT
from exports import csv_format
from exports.jobs import COST, Totals, incident_selection
from exports.storage.protocol import Storage, Upload

log = structlog.get_logger(__name__)
ABORT_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Written:
    """What an attempt stored: the object's size and sha256, its data rows and their sums, and the instant
    the data was cut at."""

    key: str
    size: int
    sha256: str
    row_count: int
    totals: Totals
    snapshot_at: dt.datetime


class _Parts:
    """Lines (CRLF included) into parts of at least ``part_size`` bytes, the header first: at most one part
    is held (its characters count at most its bytes, so a part of ``part_size`` characters is big enough)."""

    def __init__(self, header: str, part_size: int) -> None:
        self._part_size = part_size
        self._lines = [header]
        self._chars = len(header)

    def add(self, lines: list[str]) -> bytes | None:
        self._lines += lines
        self._chars += sum(map(len, lines))
        return self._take() if self._chars >= self._part_size else None

    def finish(self) -> bytes:
        return self._take()

    def _take(self) -> bytes:
        part = "".join(self._lines).encode("utf-8")
        self._lines, self._chars = [], 0
        return part


class _CostLines:
    """COST lines from PostgreSQL, and their column sums (the totals of the file's own rows)."""

    def __init__(self) -> None:
        self.rows = self.requests = self.input = self.cached = self.output = 0
        self.spend = decimal.Decimal(0)
        self.unpriced: set[str] = set()

    def lines(self, batch: list[asyncpg.Record]) -> list[str]:
        spend = self.spend
        for _line, model, requests, input_tokens, cached, output, amount, unpriced in batch:
            self.requests += requests
            self.input += input_tokens
            self.cached += cached
            self.output += output
            # Exact: the default context keeps 28 digits and would round a sum of long decimals (found by
            # the reconciliation test's adversarial prices); EXACT raises rather than round.
            spend = EXACT.add(spend, amount)
            if unpriced:
                self.unpriced.add(model)
        self.spend = spend
        self.rows += len(batch)
        return [record[0] for record in batch]

    def totals(self) -> Totals:
        return Totals(self.requests, self.input, self.cached, self.output, self.spend, tuple(sorted(self.unpriced)))


class _IncidentLines:
    """INCIDENT lines from PostgreSQL; a row it could not format (a float PostgreSQL would print with an
    exponent) is formatted here from its raw columns. Totals come from the same rows in the same snapshot."""

    def __init__(self) -> None:
        self.rows = 0

    def lines(self, batch: list[asyncpg.Record]) -> list[str]:
        self.rows += len(batch)
        return [record[0] if record[0] is not None else csv_format.line(csv_format.INCIDENT, tuple(record)[1:])
                for record in batch]  # fmt: skip


async def write_export(
    engine: AsyncEngine,
    storage: Storage,
    job: ExportJobRow,
    key: str,
    *,
    before_complete: Callable[[], Awaitable[None]],
    part_size: int = csv_format.PART_SIZE,
) -> Written:
    """Write ``job``'s file under ``key``. ``before_complete`` runs after the last part and before the upload
    is completed (the worker checks there that the job is still its own: a worker whose lease was taken
    over must not overwrite the file of the one that took it)."""
    async with snapshot(engine) as snap:
        if job.kind == COST:
            header = csv_format.COST_HEADER
            source: _CostLines | _IncidentLines = _CostLines()
            sql, args = cost_lines_statement(job.org_id, job.range_from, job.range_to, snap.materialized_through)
        else:
            header = csv_format.INCIDENT_HEADER
            source = _IncidentLines()
            selection = incident_selection(job)
            totals_sql, totals_args = incident_totals_statement(selection)
            sums = await snap.connection.fetchrow(totals_sql, *totals_args)
            sql, args = incident_lines_statement(selection)
        parts = _Parts(header + "\r\n", part_size)
        upload = await storage.start(key)
        try:
            async for batch in snap.batches(sql, args):
                part = parts.add(source.lines(batch))
                if part is not None:
                    await upload.write(part)
            await upload.write(parts.finish())
            await before_complete()
            size, digest = await upload.complete()
        except BaseException:
            await _abort(upload)
            raise
    if isinstance(source, _CostLines):
        totals = source.totals()
    else:
        assert sums is not None  # an aggregate always has its row
        totals = Totals(int(sums[0]), int(sums[1]), int(sums[2]), int(sums[3]), None)
        if totals.requests != source.rows:  # the same WHERE in the same snapshot: a bug if ever different
            raise RuntimeError(f"incident export wrote {source.rows} rows but its totals count {totals.requests}")
    return Written(key, size, digest, source.rows, totals, snap.taken_at)


async def _abort(upload: Upload) -> None:
    """Abort even while the task is being cancelled (shielded, bounded); the store's lifecycle rule removes
    what an abort that fails leaves behind."""
    task = asyncio.ensure_future(upload.abort())
    try:
        await asyncio.wait_for(asyncio.shield(task), ABORT_TIMEOUT_S)
    except (asyncio.CancelledError, TimeoutError):
        log.warning("exports.abort_unfinished", left="the store's lifecycle rule removes the parts")
    except Exception as error:  # noqa: BLE001 - the original failure is what the caller reports
        log.warning("exports.abort_failed", error=type(error).__name__)
