"""The reliability benchmark's incident data: the usage data set with two incidents injected for its largest org,
so that the measured report finds spikes and explains them (the attribution statements are part of the time).

``<dataset>_incident`` is a file-level copy of the data set (``CREATE DATABASE … TEMPLATE … STRATEGY FILE_COPY``)
in which, INCIDENT_DAYS before the data ends:

- a latency regression: for INCIDENT_HOURS hours, every request of the org's busiest model is LATENCY_FACTOR times
  slower (a LATENCY_P95 and LATENCY_P99 spike, explained by that model's slow requests);
- an error burst: for INCIDENT_HOURS hours, a day later, ERROR_SHARE of the requests of its second model answer
  503 ``overloaded`` (an ERROR_RATE spike explained by that model, status and error type).

The changed hours are marked dirty and re-rolled by the rollup worker's own cycle, as late events would be. The
copy is reused while its marker names the same source data set (its load time) and the same injection.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from typing import Any

import asyncpg

from bench.api.dataset import MARKER_TABLE, Dataset, marker_of
from bench.harness.output import say
from bench.harness.services import admin, database_url
from db.engine import create_engine
from db.migrate import current_head
from db.rollup import run_cycle
from kernel.hours import floor_hour

INCIDENT_DAYS = 10
INCIDENT_HOURS = 2
LATENCY_FACTOR = 3
ERROR_SHARE = 0.3


def injection(dataset: Dataset) -> dict[str, Any]:
    return {"source_loaded_at": dataset.info["loaded_at"], "days_before_end": INCIDENT_DAYS, "hours": INCIDENT_HOURS,
            "latency_factor": LATENCY_FACTOR, "error_share": ERROR_SHARE}  # fmt: skip


def reusable(info: dict[str, Any] | None, wanted: dict[str, Any], head: str) -> bool:
    """Whether a copy with marker ``info`` can be reused: the same injection into the same source load, at the code's
    migration head (the source is upgraded in place by a new migration, its load time unchanged: a copy of the
    earlier revision would be refused by the gateway's readiness check, so it is copied again, in seconds)."""
    return info is not None and info.get("injection") == wanted and info.get("migration") == head


async def prepare_incident_dataset(dataset: Dataset, *, fresh: bool) -> Dataset:
    name = f"{dataset.name}_incident"
    wanted = injection(dataset)
    info = None if fresh else await marker_of(name)
    if reusable(info, wanted, current_head()):
        assert info is not None
        say(f"reusing {name} (incidents: {info['incidents']})")
        return Dataset(name, database_url(name), info | {"reused": True})
    say(f"copying {dataset.name} to {name} (file copy)")
    started = time.monotonic()
    await admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await admin(f'CREATE DATABASE "{name}" TEMPLATE "{dataset.name}" STRATEGY FILE_COPY')
    say(f"copied in {time.monotonic() - started:,.0f} s; injecting the incidents")
    incidents = await _inject(database_url(name), dataset)
    info = dict(dataset.info) | {"injection": wanted, "incidents": incidents, "source": dataset.name}
    connection = await asyncpg.connect(database_url(name))
    try:
        await connection.execute(f"INSERT INTO {MARKER_TABLE} VALUES (now(), $1::jsonb)", json.dumps(info))
    finally:
        await connection.close()
    say(f"{name} ready in {time.monotonic() - started:,.0f} s: {incidents}")
    return Dataset(name, database_url(name), info | {"reused": False})


async def _inject(url: str, dataset: Dataset) -> dict[str, Any]:
    org = dataset.largest_org
    end = floor_hour(dt.datetime.fromisoformat(dataset.info["data_end"]))
    slow_from = end - dt.timedelta(days=INCIDENT_DAYS)
    errors_from = slow_from + dt.timedelta(days=1)
    span = dt.timedelta(hours=INCIDENT_HOURS)
    connection = await asyncpg.connect(url)
    try:
        models = [r["model"] for r in await connection.fetch(
            "SELECT model FROM usage_hourly WHERE org_id = $1 GROUP BY model ORDER BY sum(requests) DESC LIMIT 2", org
        )]  # fmt: skip
        slowed = await connection.execute(
            "UPDATE usage_events SET latency_ms = latency_ms * $4 "
            "WHERE org_id = $1 AND model = $2 AND event_time >= $3 AND event_time < $3 + $5::interval",
            org, models[0], slow_from, float(LATENCY_FACTOR), span,
        )  # fmt: skip
        failed = await connection.execute(
            "UPDATE usage_events SET status_code = 503, error_type = 'overloaded' "
            "WHERE org_id = $1 AND model = $2 AND event_time >= $3 AND event_time < $3 + $5::interval "
            "AND status_code < 500 AND abs(hashtext(event_id)) % 1000 < $4",
            org, models[-1], errors_from, round(ERROR_SHARE * 1000), span,
        )  # fmt: skip
        await connection.execute(
            "INSERT INTO rollup_dirty (org_id, hour) SELECT $1, h FROM unnest($2::timestamptz[]) AS h "
            "ON CONFLICT DO NOTHING",
            org, [slow_from + i * dt.timedelta(hours=1) for i in range(INCIDENT_HOURS)]
            + [errors_from + i * dt.timedelta(hours=1) for i in range(INCIDENT_HOURS)],
        )  # fmt: skip
    finally:
        await connection.close()
    engine = create_engine(url, pool_size=1)
    try:
        result = await run_cycle(engine, dt.datetime.now(dt.UTC))
    finally:
        await engine.dispose()
    return {
        "org": org,
        "latency": {"model": models[0], "from": slow_from.isoformat(), "events": int(slowed.split()[-1])},
        "errors": {"model": models[-1], "from": errors_from.isoformat(), "events": int(failed.split()[-1])},
        "rerolled_hours": result.rerolled_hours,
    }
