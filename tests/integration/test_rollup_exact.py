"""After rollup cycles with late events (and duplicates of them), every hourly table equals the aggregate of the raw
events, computed here in Python from the rows of ``usage_events``: ``usage_hourly``, ``usage_hourly_model``,
``reliability_hourly_model``, ``errors_hourly`` and ``reliability_minute_model``, row for row, sketches included."""

from __future__ import annotations

import datetime as dt
import random
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import orjson
import pytest
from opentelemetry.metrics import get_meter
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from db.engine import create_engine
from db.rollup import floor_hour, run_cycle, watermarks
from db.sketch import index_sql
from ingest.events import TimeWindow, UsageEvent, validate
from ingest.metrics import IngestMetrics
from ingest.writer import EventWriter
from reliability.sketch import PACKED

NOW = dt.datetime.now(dt.UTC)
START = floor_hour(NOW) - dt.timedelta(hours=8)
STATUSES = (200, 200, 200, 201, 400, 404, 429, 500, 503)
# Dyadic values (sums exact in any order), below and above the sketch's zero bucket (MIN_VALUE_MS = 0.001).
LATENCIES = (0.0, 2**-11, 2**-10, 1.0, 12.5, 99.75, 250.0, 1000.0, 60_000.0)

RAW = f"""
SELECT org_id, date_trunc('hour', event_time, 'UTC') AS hour, date_trunc('minute', event_time, 'UTC') AS minute,
       model, project_id, api_key_id, status_code,
       error_type, input_tokens, cached_input_tokens, output_tokens, latency_ms, {index_sql("latency_ms")} AS idx
FROM usage_events
"""


@pytest.fixture
async def own_engine(migrated_database: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(migrated_database, pool_size=4)
    yield engine
    await engine.dispose()


def _events(rng: random.Random, tag: str, count: int, start: dt.datetime, hours: int) -> list[UsageEvent]:
    window = TimeWindow.around(NOW, retention_days=30)
    events = []
    for i in range(count):
        status = rng.choice(STATUSES)
        input_tokens = rng.randint(0, 5000)
        data: dict[str, Any] = {
            "org_id": f"org_{rng.randint(0, 3)}", "model": f"m{rng.randint(0, 2)}",
            "input_tokens": input_tokens, "cached_input_tokens": rng.randint(0, input_tokens),
            "output_tokens": rng.randint(0, 900), "latency_ms": rng.choice(LATENCIES) * rng.choice((1, 1.5)),
            "status_code": status,
        }  # fmt: skip
        if rng.random() < 0.8:
            data["project_id"] = f"p{rng.randint(0, 2)}"
        if rng.random() < 0.8:
            data["api_key_id"] = f"k{rng.randint(0, 1)}"
        if status >= 400 and rng.random() < 0.7:
            data["error_type"] = rng.choice(("rate_limited", "timeout", "bad_request"))
        moment = start + dt.timedelta(seconds=rng.randint(0, hours * 3600 - 1))
        events.append(
            validate(
                {"specversion": "1.0", "id": f"{tag}-{i}", "source": "//rollup/exact", "type": "ai.usage.request.v1",
                 "time": moment.isoformat(), "data": data},
                window,
            )
        )  # fmt: skip
    return events


def _expected(raw: list[Any], minute_from: dt.datetime) -> dict[str, set[tuple[Any, ...]]]:
    """Every table's rows from the raw events; minute rows only from ``minute_from`` on (older hours have none)."""
    usage: dict[tuple[Any, ...], list[Any]] = defaultdict(lambda: [0, 0, 0, 0, 0.0, Counter()])
    by_model: dict[tuple[Any, ...], list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    reliability: dict[tuple[Any, ...], list[Any]] = defaultdict(lambda: [0, 0, 0, Counter()])
    errors: Counter[tuple[Any, ...]] = Counter()
    minutes: dict[tuple[Any, ...], list[Any]] = defaultdict(lambda: [0, 0, 0, Counter()])
    for r in raw:
        u = usage[(r.org_id, r.hour, r.model, r.project_id, r.api_key_id, r.status_code // 100)]
        u[0] += 1
        u[1] += r.input_tokens
        u[2] += r.cached_input_tokens
        u[3] += r.output_tokens
        u[4] += r.latency_ms
        u[5][r.idx] += 1
        m = by_model[(r.org_id, r.hour, r.model)]
        for i, value in enumerate((1, r.input_tokens, r.cached_input_tokens, r.output_tokens)):
            m[i] += value
        rel = reliability[(r.org_id, r.hour, r.model)]
        rel[0] += 1
        rel[1] += r.status_code >= 500
        rel[2] += 400 <= r.status_code <= 499
        rel[3][r.idx] += 1
        if r.hour >= minute_from:
            minute = minutes[(r.org_id, r.hour, r.minute, r.model)]
            minute[0] += 1
            minute[1] += r.status_code >= 500
            minute[2] += 400 <= r.status_code <= 499
            minute[3][r.idx] += 1
        if r.status_code >= 400:
            errors[(r.org_id, r.hour, r.model, r.project_id, r.api_key_id, r.status_code, r.error_type)] += 1
    return {
        "usage_hourly": {(*k, *v[:4], v[4], _sketch(v[5])) for k, v in usage.items()},
        "usage_hourly_model": {(*k, *v) for k, v in by_model.items()},
        "reliability_hourly_model": {(*k, *v[:3], _sketch(v[3])) for k, v in reliability.items()},
        "errors_hourly": {(*k, n) for k, n in errors.items()},
        "reliability_minute_model": {(*k, *v[:3], _sketch(v[3])) for k, v in minutes.items()},
    }


def _sketch(counts: Counter[int]) -> tuple[tuple[int, int], ...]:
    return tuple(sorted(counts.items()))


def _stored_sketch(value: Any) -> tuple[tuple[int, int], ...]:
    parsed = orjson.loads(value) if isinstance(value, str | bytes) else value
    return tuple(sorted((int(k), int(n)) for k, n in parsed.items()))


async def _stored(engine: AsyncEngine) -> dict[str, set[tuple[Any, ...]]]:
    async with engine.connect() as connection:

        async def rows(sql: str) -> list[Any]:
            return list((await connection.execute(text(sql))).all())

        usage = await rows(
            "SELECT org_id, hour, model, project_id, api_key_id, status_class, requests, input_tokens, "
            "cached_input_tokens, output_tokens, latency_sum_ms, latency_sketch FROM usage_hourly"
        )
        by_model = await rows(
            "SELECT org_id, hour, model, requests, input_tokens, cached_input_tokens, output_tokens "
            "FROM usage_hourly_model"
        )
        reliability = await rows(
            "SELECT org_id, hour, model, requests, errors, client_errors, latency_sketch, "
            "latency_sketch_packed = sketch_pack(latency_sketch) AS packed_ok FROM reliability_hourly_model"
        )
        errors = await rows(
            "SELECT org_id, hour, model, project_id, api_key_id, status_code, error_type, requests FROM errors_hourly"
        )
        minutes = await rows(
            "SELECT org_id, hour, minute, model, requests, errors, client_errors, latency_sketch_packed "
            "FROM reliability_minute_model"
        )
    assert all(r.packed_ok for r in reliability)
    packed = [np.frombuffer(r.latency_sketch_packed, dtype=PACKED) for r in minutes]
    assert all(bool(np.all(np.diff(p["index"].astype(np.int64)) > 0)) for p in packed)  # stored: ascending
    return {
        "usage_hourly": {(*r[:10], r[10], _stored_sketch(r[11])) for r in usage},
        "usage_hourly_model": {tuple(r) for r in by_model},
        "reliability_hourly_model": {(*r[:6], _stored_sketch(r[6])) for r in reliability},
        "errors_hourly": {tuple(r) for r in errors},
        "reliability_minute_model": {
            (*r[:7], tuple(zip(p["index"].tolist(), p["count"].tolist(), strict=True)))
            for r, p in zip(minutes, packed, strict=True)
        },
    }


async def test_rollups_equal_raw_aggregates_after_cycles_with_late_events(own_engine: AsyncEngine) -> None:
    rng = random.Random(2026)  # noqa: S311 - test data
    writer = EventWriter(own_engine, None, None, IngestMetrics(get_meter("test_rollup_exact")))
    on_time = _events(rng, "a", 1500, START, hours=7)
    await writer.write(on_time, channel="http")
    first = await run_cycle(own_engine, NOW)
    assert first.ran and first.rolled_until == floor_hour(NOW)

    # Late: in hours already rolled and in older ones, and re-sends of events already rolled up.
    late = _events(rng, "b", 400, START - dt.timedelta(hours=2), hours=9)
    resent = rng.sample(on_time, 100)
    await writer.write([*late, *resent], channel="amqp")
    async with own_engine.connect() as connection:
        dirty = await connection.scalar(text("SELECT count(*) FROM rollup_dirty"))
    assert dirty > 0
    second = await run_cycle(own_engine, NOW + dt.timedelta(hours=1))
    assert second.ran and second.rerolled_hours > 0

    async with own_engine.connect() as connection:
        through = (await watermarks(connection)).materialized_through
        raw = (await connection.execute(text(RAW))).all()
    assert through is not None and all(r.hour < through for r in raw)
    assert len(raw) == 1900
    async with own_engine.connect() as connection:
        minute_from = await connection.scalar(text("SELECT minute_from FROM rollup_state"))
    # Minute rows start with the first rolled hour; the late events' earlier hours have none (raw for reports).
    assert minute_from == START and any(r.hour < minute_from for r in raw)
    expected, stored = _expected(raw, minute_from), await _stored(own_engine)
    for table in expected:
        assert stored[table] == expected[table], table
