"""Writing usage events: COPY into staging, deduplicate, insert, account.

All in the caller's transaction. ``insert_batch`` returns what happened per
org so freshness can be updated in the same transaction.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

from db.locks import WATERMARK_LOCK_KEY

STAGE_COLUMNS = (
    "ord", "org_id", "event_time", "source", "event_id", "project_id", "api_key_id", "model",
    "input_tokens", "cached_input_tokens", "output_tokens", "latency_ms", "ttft_ms",
    "status_code", "error_type", "region",
)  # fmt: skip
EVENT_COLUMNS = STAGE_COLUMNS[1:]

CREATE_STAGE = """
CREATE TEMP TABLE IF NOT EXISTS usage_stage (
    ord integer NOT NULL, org_id text, event_time timestamptz, source text, event_id text,
    project_id text, api_key_id text, model text, input_tokens bigint, cached_input_tokens bigint,
    output_tokens bigint, latency_ms double precision, ttft_ms double precision,
    status_code smallint, error_type text, region text
) ON COMMIT DELETE ROWS
"""

_COLUMNS = ", ".join(EVENT_COLUMNS)
# An event's identity is (source, id), whatever its org (shared/contracts/README.md, docs/events.md): the same
# (source, id) sent again for another org is a duplicate like any other re-send. ``event_receipts`` is keyed by it
# (migration 0011).
_KEY = "source, event_id"

# One statement per shared table, in the caller's transaction. No statement writes two shared tables (a
# distributed database could not push such a data-modifying CTE down to its shards; docs/scaling.md). The staging
# table ends up holding exactly this batch's new events, which the later statements read. Repeats of an identity
# within the batch never reach the database (``insert_batch`` keeps the first).
#
# ``usage_events`` and ``rollup_dirty`` are keyed or grouped by org_id and would be distributed by it. A table
# distributed by org_id cannot enforce a key without org_id, so ``event_receipts``, keyed by (source, event_id),
# would be distributed by ``source`` (hash) or kept on the coordinator: statement 1 is then a write that is not
# co-located with the others, in the same distributed transaction (docs/scaling.md, step 3).
#
# 1. Receipts, first write wins across batches, ingesters and orgs (a concurrent writer of the same identity makes
#    this wait for its commit or rollback; every batch inserts in key order). ON CONFLICT has no target: the
#    table's only unique key is the identity. The staging table keeps only the events whose receipt this wrote
#    (it holds one row per identity, so source and event_id find it). The other table this statement changes is
#    the session's own temporary table, never a shared one.
INSERT_RECEIPTS = f"""
WITH fresh AS (
    INSERT INTO event_receipts ({_KEY}, org_id, event_time, batch_id)
    SELECT {_KEY}, org_id, event_time, $1 FROM usage_stage ORDER BY {_KEY}
    ON CONFLICT DO NOTHING
    RETURNING {_KEY}
)
DELETE FROM usage_stage s
WHERE NOT EXISTS (SELECT FROM fresh f WHERE f.source = s.source AND f.event_id = s.event_id)
"""
# 2. The new events.
INSERT_EVENTS = f"INSERT INTO usage_events ({_COLUMNS}, batch_id) SELECT {_COLUMNS}, $1 FROM usage_stage"
# 3. Late events below the dirty watermark: their hours must be re-rolled (db/rollup.py). The watermark cannot move
#    during this transaction: it holds the watermark lock shared (begin_batch), which the rollup needs exclusively.
MARK_DIRTY = """
INSERT INTO rollup_dirty (org_id, hour)
SELECT DISTINCT n.org_id, date_trunc('hour', n.event_time, 'UTC')
FROM usage_stage n CROSS JOIN rollup_state s
WHERE n.event_time < s.dirty_before
ORDER BY 1, 2
ON CONFLICT (org_id, hour) DO UPDATE SET marked_at = excluded.marked_at
"""
# 4. Per org, model and status class: what the freshness update and the platform's SLO counter need.
SUMMARISE = """
SELECT org_id, model, status_code / 100 AS status_class, count(*) AS events, min(event_time) AS first_at,
       max(event_time) AS last_at
FROM usage_stage GROUP BY 1, 2, 3
"""

# In org order, as every batch does: concurrent batches sharing orgs lock their rows in one order (in any other
# they deadlock; tests/integration/test_concurrent_writers.py).
UPSERT_FRESHNESS = """
INSERT INTO freshness_status AS f (org_id, last_event_at, last_ingested_at, updated_at)
SELECT org_id, last_at, clock_timestamp(), clock_timestamp()
FROM unnest($1::text[], $2::timestamptz[]) AS t(org_id, last_at)
ORDER BY org_id COLLATE "C"
ON CONFLICT (org_id) DO UPDATE SET
    last_event_at = greatest(f.last_event_at, excluded.last_event_at),
    last_ingested_at = excluded.last_ingested_at,
    updated_at = excluded.updated_at
"""

INSERT_BATCH = """
INSERT INTO ingestion_batches
    (id, channel, accepted, duplicates, rejected, min_event_time, max_event_time, started_at, duration_ms)
OVERRIDING SYSTEM VALUE
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, extract(epoch FROM clock_timestamp() - $8) * 1000)
"""


@dataclass(frozen=True)
class OrgIngested:
    org_id: str
    events: int
    first_at: dt.datetime
    last_at: dt.datetime


Record = tuple[object, ...]


@dataclass(frozen=True)
class Inserted:
    """What a batch stored: per org (freshness), and per model and status class (the platform SLO counter)."""

    orgs: list[OrgIngested]
    by_model_and_class: dict[tuple[str, int], int]


async def begin_batch(connection: asyncpg.Connection) -> int:
    """Take the shared rollup lock for this transaction (see db/rollup.py) and a batch id."""
    return int(
        await connection.fetchval(
            "SELECT nextval(pg_get_serial_sequence('ingestion_batches', 'id')) "
            "FROM (SELECT pg_advisory_xact_lock_shared($1)) AS locked",
            WATERMARK_LOCK_KEY,
        )
    )


async def ensure_partitions(connection: asyncpg.Connection, days: Sequence[dt.date]) -> None:
    await connection.execute("SELECT analytics_ensure_usage_partition(d) FROM unnest($1::date[]) AS d", list(days))


_IDENTITY = tuple(STAGE_COLUMNS.index(c) for c in ("source", "event_id"))


def first_occurrences(records: Sequence[Record]) -> list[Record]:
    """``records`` without later repeats of an identity (source, id), whatever their org, in their order."""
    seen: set[tuple[object, ...]] = set()
    firsts = []
    source, event_id = _IDENTITY
    for record in records:
        key = (record[source], record[event_id])
        if key not in seen:
            seen.add(key)
            firsts.append(record)
    return firsts


async def insert_batch(connection: asyncpg.Connection, batch_id: int, records: Sequence[Record]) -> Inserted:
    """COPY ``records`` (in STAGE_COLUMNS order) and insert the new ones (first write wins, per (source, id))."""
    await connection.execute(CREATE_STAGE)
    await connection.copy_records_to_table("usage_stage", records=first_occurrences(records), columns=STAGE_COLUMNS)
    await connection.execute(INSERT_RECEIPTS, batch_id)
    await connection.execute(INSERT_EVENTS, batch_id)
    await connection.execute(MARK_DIRTY)
    orgs: dict[str, OrgIngested] = {}
    by_model_and_class: dict[tuple[str, int], int] = {}
    for r in await connection.fetch(SUMMARISE):
        key = (r["model"], r["status_class"])
        by_model_and_class[key] = by_model_and_class.get(key, 0) + r["events"]
        known = orgs.get(r["org_id"])
        orgs[r["org_id"]] = OrgIngested(r["org_id"], r["events"], r["first_at"], r["last_at"]) if known is None else (
            OrgIngested(known.org_id, known.events + r["events"], min(known.first_at, r["first_at"]),
                        max(known.last_at, r["last_at"]))
        )  # fmt: skip
    return Inserted(sorted(orgs.values(), key=lambda o: o.org_id), by_model_and_class)


async def record_batch(
    connection: asyncpg.Connection,
    *,
    batch_id: int,
    channel: str,
    orgs: Sequence[OrgIngested],
    duplicates: int,
    rejected: int,
    started_at: dt.datetime,
) -> None:
    """Update freshness per org and write the batch's ``ingestion_batches`` row."""
    if orgs:
        await connection.execute(UPSERT_FRESHNESS, [o.org_id for o in orgs], [o.last_at for o in orgs])
    accepted = sum(o.events for o in orgs)
    first = min((o.first_at for o in orgs), default=None)
    last = max((o.last_at for o in orgs), default=None)
    await connection.execute(INSERT_BATCH, batch_id, channel, accepted, duplicates, rejected, first, last, started_at)
