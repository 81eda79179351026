"""The rows of an export, read in one consistent snapshot through a server-side cursor.

:func:`snapshot` opens a read-only REPEATABLE READ transaction on a connection of its own: every statement in
it sees the database as of its first statement, whose ``clock_timestamp()`` is recorded as the instant the
export's data was cut at (``snapshot_at``). Events committed later are not in the file, even when their
event time falls inside the window; ``verify-export`` names them.

COST rows are exactly what ``usage`` sums (the same statement, :func:`db.usage.usage_statement`, grouped by
UTC day, project and model), so the file reconciles with the API to the last decimal; INCIDENT rows are
:data:`db.exports.INCIDENT_ROWS`.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

import asyncpg
from sqlalchemy.ext.asyncio import AsyncEngine

from db.exports import INCIDENT_ROWS, INCIDENT_WHERE, IncidentSelection
from db.usage import UsageQuery, driver_connection, usage_statement

PREFETCH = 5000  # rows per cursor round trip: bounds memory, keeps round trips few
WORK_MEM = "64MB"  # per sort or hash of the export's statement, in its own transaction only

# The COST columns of contract §5 in file order, then ``unpriced`` (whether a row's hours lacked a price;
# not a CSV column: it names the unpriced models in the totals). Sorted by org, project, model, day.
_COST = """
SELECT org_id, project_id, model, (bucket AT TIME ZONE 'UTC')::date AS day, requests, input_tokens,
       cached_input_tokens, output_tokens, spend, unpriced
FROM ({usage}) AS usage_rows
"""
_COST_ORDER = 'ORDER BY org_id COLLATE "C", project_id COLLATE "C" NULLS FIRST, model COLLATE "C", day'


def cost_statement(
    org_id: str | None,
    start: dt.datetime,
    end: dt.datetime,
    materialized_through: dt.datetime | None,
    *,
    ordered: bool = True,
) -> tuple[str, tuple[object, ...]]:
    """One org's (None: every org's) usage and spend in [start, end) by UTC day, project and model."""
    query = UsageQuery(
        org_id=org_id, start=start, end=end, granularity="DAY", time_zone="UTC",
        group_by=frozenset({"model", "project_id"}),
    )  # fmt: skip
    usage, args = usage_statement(query, materialized_through, ordered=False)
    sql = _COST.format(usage=usage)
    return (sql + _COST_ORDER if ordered else sql), args


def incident_statement(selection: IncidentSelection) -> tuple[str, tuple[object, ...]]:
    return INCIDENT_ROWS, selection.args()


# --- CSV lines written by PostgreSQL ------------------------------------------------------------------------
# The formats of exports/csv_format.py, cell for cell, in SQL: PostgreSQL formats a million rows in a fraction
# of the time Python takes (the exports benchmark: 68 % of an INCIDENT export's time was Python's CSV
# encoding). Byte equality with the Python writer is a test (tests/integration/test_export_sql_format.py).
# A float outside [1e-4, 1e15) (PostgreSQL would print an exponent), negative or not finite makes the row's
# line NULL: the writer formats that row in Python from its raw columns, which come back only for such rows.


def _neutralized(column: str) -> str:
    """A text value as a spreadsheet shows it as text: a leading = + - @ tab or CR gets a ' (NULL stays NULL)."""
    return (
        f"CASE WHEN left({column}, 1) IN ('=', '+', '-', '@', E'\\t', E'\\r') THEN '''' || {column} ELSE {column} END"
    )


def _quoted(column: str) -> str:
    """A neutralized text cell as RFC 4180 writes it (quoted, quotes doubled, when it holds , " CR or LF); NULL
    is an empty field."""
    special = " OR ".join(f"strpos({column}, {char}) > 0" for char in ("','", "'\"'", "E'\\r'", "E'\\n'"))
    return (
        f"CASE WHEN {column} IS NULL THEN '' WHEN {special} "
        f"THEN '\"' || replace({column}, '\"', '\"\"') || '\"' ELSE {column} END"
    )


def _float_fits(column: str) -> str:
    """Whether PostgreSQL's shortest round-trip text of the float is the Python writer's (no exponent)."""
    return f"({column} IS NULL OR {column} = 0 OR ({column} >= 1e-4 AND {column} < 1e15))"


def _number(column: str) -> str:
    return f"coalesce({column}::text, '')"


_INCIDENT_COLUMNS = ("event_time", "event_id", "source", "org_id", "project_id", "api_key_id", "model", "status_code",
                     "error_type", "latency_ms", "ttft_ms", "input_tokens", "cached_input_tokens", "output_tokens",
                     "region")  # fmt: skip
_INCIDENT_TEXT = ("event_id", "source", "org_id", "project_id", "api_key_id", "model", "error_type", "region")


def _incident_cell(column: str) -> str:
    if column == "event_time":
        return "to_char(s.event_time AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')"
    return _quoted(f"s.n_{column}") if column in _INCIDENT_TEXT else _number(f"s.{column}")


# The inner query neutralizes each text column once (n_*); the outer one quotes and joins the cells.
INCIDENT_LINES = (
    f"SELECT CASE WHEN s.fits THEN concat_ws(',', {', '.join(map(_incident_cell, _INCIDENT_COLUMNS))}) || E'\\r\\n' "
    "END AS line, " + ", ".join(f"CASE WHEN NOT s.fits THEN s.{c} END" for c in _INCIDENT_COLUMNS) + " "
    f"FROM (SELECT {_float_fits('e.latency_ms')} AND {_float_fits('e.ttft_ms')} AS fits, "
    + ", ".join(f"{_neutralized(f'e.{c}')} AS n_{c}" for c in _INCIDENT_TEXT)
    + ", "
    + ", ".join(f"e.{c}" for c in _INCIDENT_COLUMNS)
    + f" FROM usage_events e WHERE {INCIDENT_WHERE}) AS s ORDER BY s.event_time, s.event_id, s.source"
)
INCIDENT_TOTALS = (
    "SELECT count(*), coalesce(sum(e.input_tokens), 0)::bigint, coalesce(sum(e.cached_input_tokens), 0)::bigint, "
    f"coalesce(sum(e.output_tokens), 0)::bigint FROM usage_events e WHERE {INCIDENT_WHERE}"
)


def incident_lines_statement(selection: IncidentSelection) -> tuple[str, tuple[object, ...]]:
    """The INCIDENT file's lines (CRLF included) in :data:`INCIDENT_ROWS`'s order; NULL and the raw columns
    for a row the writer formats itself."""
    return INCIDENT_LINES, selection.args()


def incident_totals_statement(selection: IncidentSelection) -> tuple[str, tuple[object, ...]]:
    """The row count and token sums of the same rows (run in the same snapshot)."""
    return INCIDENT_TOTALS, selection.args()


_COST_LINES = """
SELECT concat_ws(',', {org}, {project}, {model}, to_char(s.day, 'YYYY-MM-DD'), s.requests::text,
                 s.input_tokens::text, s.cached_input_tokens::text, s.output_tokens::text, s.spend::text) || E'\\r\\n',
       s.model, s.requests, s.input_tokens, s.cached_input_tokens, s.output_tokens, s.spend, s.unpriced
FROM (SELECT {n_org} AS n_org_id, {n_project} AS n_project_id, {n_model} AS n_model, cost_rows.*
      FROM ({cost}) AS cost_rows) AS s
ORDER BY s.org_id COLLATE "C", s.project_id COLLATE "C" NULLS FIRST, s.model COLLATE "C", s.day
"""  # (the order of _COST_ORDER)


def cost_lines_statement(
    org_id: str | None, start: dt.datetime, end: dt.datetime, materialized_through: dt.datetime | None
) -> tuple[str, tuple[object, ...]]:
    """The COST file's lines in :func:`cost_statement`'s order, each with the values the writer adds up. The
    amounts are NUMERIC with trimmed scale: their text has no exponent and no trailing zeros, as the Python
    writer prints them."""
    sql, args = cost_statement(org_id, start, end, materialized_through, ordered=False)
    lines = _COST_LINES.format(
        org=_quoted("s.n_org_id"), project=_quoted("s.n_project_id"), model=_quoted("s.n_model"),
        n_org=_neutralized("cost_rows.org_id"), n_project=_neutralized("cost_rows.project_id"),
        n_model=_neutralized("cost_rows.model"), cost=sql,
    )  # fmt: skip
    return lines, args


@dataclass(frozen=True)
class Snapshot:
    connection: asyncpg.Connection
    taken_at: dt.datetime
    materialized_through: dt.datetime | None

    async def batches(
        self, sql: str, args: Sequence[object], size: int = PREFETCH
    ) -> AsyncIterator[list[asyncpg.Record]]:
        """The statement's rows in lists of up to ``size`` (one cursor round trip each): the caller loops over
        a list without an await per row."""
        cursor = await self.connection.cursor(sql, *args)
        while batch := await cursor.fetch(size):
            yield batch


@asynccontextmanager
async def snapshot(engine: AsyncEngine) -> AsyncIterator[Snapshot]:
    """A read-only REPEATABLE READ snapshot on a connection of ``engine`` (no statement timeout: the workers'
    pool), with its instant and the rollup watermark as of it."""
    async with engine.connect() as connection:
        raw = await driver_connection(connection)
        transaction = raw.transaction(isolation="repeatable_read", readonly=True)
        await transaction.start()
        try:
            # The first statement takes the snapshot; clock_timestamp() is read while it runs.
            taken_at = await raw.fetchval("SELECT clock_timestamp()")
            through = await raw.fetchval("SELECT materialized_through FROM rollup_state")
            # A month of COST rows is aggregated and sorted before the first row: with the default 4 MB the
            # aggregate spills in batches and the sort goes to disk (the exports benchmark).
            await raw.execute(f"SET LOCAL work_mem = '{WORK_MEM}'")
            await raw.execute("SET LOCAL extra_float_digits = 1")  # shortest round-trip floats (the CSV lines)
            yield Snapshot(raw, taken_at, through)
        except BaseException:
            # On a connection the server closed, a rollback would fail and its error hide the real cause.
            if not raw.is_closed():
                await transaction.rollback()
            raise
        await transaction.commit()
