"""PostgreSQL writes the export CSV lines (db/export_rows.py); the Python writer (exports/csv_format.py) is the
definition of the format. Property test: for generated rows with hostile text (formula prefixes, commas,
quotes, CR, LF, tabs, non-ASCII, empty strings, NULLs) and floats of every magnitude (tiny and huge ones come
back raw and are formatted in Python), the file ``write_export`` stores is byte for byte what the Python writer
makes of the same rows, for INCIDENT and COST exports."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from db.engine import create_engine
from db.export_rows import cost_statement, snapshot
from db.exports import INCIDENT_ROWS, ExportJobRow, IncidentSelection
from db.partitions import ensure_usage_partitions
from exports import csv_format
from exports.export_file import write_export
from exports.jobs import COST, INCIDENT
from exports.storage.local import LocalStorage

DAY = dt.datetime(2026, 11, 3, tzinfo=dt.UTC)
SECRET = "sql-format-" + "k" * 32
nasty = st.text(alphabet=st.sampled_from(list("ab=+-@\t\r\n,\"' é€😀0")), max_size=8)
identifier = st.text(alphabet=st.sampled_from(list("ab=+-@,\"' é")), min_size=1, max_size=6)
latency = st.one_of(
    st.floats(min_value=0, max_value=1e18, allow_nan=False, allow_infinity=False),
    st.sampled_from([0.0, 1e-4, 9.999e-5, 1e-7, 1e15, 999999999999999.9, 0.1, 1.5, 12.0, 123456.789]),
)
event = st.fixed_dictionaries({
    "source": nasty.filter(bool), "project_id": st.none() | nasty, "api_key_id": st.none() | nasty,
    "model": identifier, "status_code": st.integers(100, 599), "error_type": st.none() | nasty,
    "latency_ms": latency, "ttft_ms": st.none() | latency, "input_tokens": st.integers(0, 2**40),
    "output_tokens": st.integers(0, 2**40), "region": st.none() | nasty,
    "micros": st.integers(0, 86_400 * 10**6 - 1),
})  # fmt: skip


async def _insert(engine: Any, org: str, events: list[dict[str, Any]]) -> None:
    async with engine.begin() as connection:
        await ensure_usage_partitions(connection, DAY.date(), DAY.date())
        raw = (await connection.get_raw_connection()).driver_connection
        await raw.executemany(
            "INSERT INTO usage_events (org_id, event_time, source, event_id, project_id, api_key_id, model, "
            "input_tokens, cached_input_tokens, output_tokens, latency_ms, ttft_ms, status_code, error_type, region) "
            "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)",
            [(org, DAY + dt.timedelta(microseconds=e["micros"]), e["source"], f"=evt,{n}\"", e["project_id"],
              e["api_key_id"], e["model"], e["input_tokens"], e["input_tokens"] // 3, e["output_tokens"],
              e["latency_ms"], e["ttft_ms"], e["status_code"], e["error_type"], e["region"])
             for n, e in enumerate(events)],
        )  # fmt: skip


def _job(kind: str, org: str) -> ExportJobRow:
    return ExportJobRow(
        id=uuid.uuid4(), org_id=org, kind=kind, status="RUNNING", requested_by="t", range_from=DAY,
        range_to=DAY + dt.timedelta(days=1), created_at=DAY, started_at=None, finished_at=None, attempts=1,
        row_count=None, totals=None, checksum_sha256=None, expires_at=None, error=None,
        params={"models": None, "project_ids": None, "api_key_ids": None, "errors_only": False},
    )  # fmt: skip


async def _both(database_url: str, root: Path, events: list[dict[str, Any]]) -> list[tuple[bytes, bytes]]:
    """(stored by write_export, written by the Python writer) for an INCIDENT and a COST export."""
    engine = create_engine(database_url, pool_size=2)
    storage = LocalStorage(root, SECRET)
    org = f'=org,{uuid.uuid4().hex[:6]}"'
    try:
        await _insert(engine, org, events)
        pairs = []
        for kind in (INCIDENT, COST):
            job = _job(kind, org)
            key = f"exports/x/2026/11/{job.id}.csv"

            async def nothing() -> None:
                return None

            await write_export(engine, storage, job, key, before_complete=nothing, part_size=4096)
            stored = storage.path_of(key).read_bytes()
            async with snapshot(engine) as snap:
                if kind == INCIDENT:
                    selection = IncidentSelection(org, DAY, DAY + dt.timedelta(days=1))
                    rows = await snap.connection.fetch(INCIDENT_ROWS, *selection.args())
                    expected = csv_format.encode(csv_format.INCIDENT, [tuple(r) for r in rows])
                else:
                    sql, args = cost_statement(org, DAY, DAY + dt.timedelta(days=1), snap.materialized_through)
                    rows = await snap.connection.fetch(sql, *args)
                    expected = csv_format.encode(csv_format.COST, [tuple(r)[:9] for r in rows])
            pairs.append((stored, expected))
        return pairs
    finally:
        await engine.dispose()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(events=st.lists(event, min_size=0, max_size=25))
def test_postgresql_writes_the_python_writers_bytes(database_url: str, data_dir: Path, events: list[Any]) -> None:
    for stored, expected in asyncio.run(_both(database_url, data_dir / "sql-format", events)):
        assert stored == expected
