"""One attempt's work: read a job's rows in one snapshot, write them as CSV parts into the store, and tally
the file's column sums as they are written (so ``totals`` describes the file's own bytes, not a second query).

Memory stays flat: rows arrive ``PREFETCH`` at a time from a server-side cursor, and at most one part (8 MiB)
is buffered before it is uploaded. On any failure or cancellation the upload is aborted (no multipart
upload is left behind, no partial object is visible).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import decimal
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass

import asyncpg
import structlog
from sqlalchemy.ext.asyncio import AsyncEngine

from db.export_rows import Snapshot, cost_statement, incident_statement, snapshot
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


class _CostTally:
    """Column sums of COST rows (file columns then ``unpriced``), passing the file's columns on."""

    def __init__(self) -> None:
        self.rows = self.requests = self.input = self.cached = self.output = 0
        self.spend = decimal.Decimal(0)
        self.unpriced: set[str] = set()

    async def pass_on(self, records: AsyncIterator[asyncpg.Record]) -> AsyncIterator[Sequence[object]]:
        async for record in records:
            self.rows += 1
            self.requests += record[4]
            self.input += record[5]
            self.cached += record[6]
            self.output += record[7]
            # Exact: the default context keeps 28 digits and would round a sum of long decimals (found by
            # the reconciliation test's adversarial prices); EXACT raises rather than round.
            self.spend = EXACT.add(self.spend, record[8])
            if record[9]:
                self.unpriced.add(record[2])
            yield tuple(record)[:9]

    def totals(self) -> Totals:
        return Totals(self.requests, self.input, self.cached, self.output, self.spend, tuple(sorted(self.unpriced)))


class _IncidentTally:
    """Sums of INCIDENT rows: one request per row, the token columns; no spend column."""

    def __init__(self) -> None:
        self.rows = self.input = self.cached = self.output = 0

    async def pass_on(self, records: AsyncIterator[asyncpg.Record]) -> AsyncIterator[Sequence[object]]:
        async for record in records:
            self.rows += 1
            self.input += record[11]
            self.cached += record[12]
            self.output += record[13]
            yield record  # type: ignore[misc]  # a Record is a sequence of its values

    def totals(self) -> Totals:
        return Totals(self.rows, self.input, self.cached, self.output, None)


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
        fmt, tally, records = _source(job, snap)
        upload = await storage.start(key)
        try:
            async for part in csv_format.aencode_parts(fmt, tally.pass_on(records), part_size):
                await upload.write(part)
            await before_complete()
            size, digest = await upload.complete()
        except BaseException:
            await _abort(upload)
            raise
    return Written(key, size, digest, tally.rows, tally.totals(), snap.taken_at)


def _source(
    job: ExportJobRow, snap: Snapshot
) -> tuple[csv_format.CsvFormat, _CostTally | _IncidentTally, AsyncIterator[asyncpg.Record]]:
    if job.kind == COST:
        sql, args = cost_statement(job.org_id, job.range_from, job.range_to, snap.materialized_through)
        return csv_format.COST, _CostTally(), snap.rows(sql, args)
    sql, args = incident_statement(incident_selection(job))
    return csv_format.INCIDENT, _IncidentTally(), snap.rows(sql, args)


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
