"""The usage benchmark's data: ``--events`` synthetic events over 30 days in ``bench_graphql_<events>``, loaded
once through ``EventWriter``, rolled up, vacuumed, and reused while its marker row says it is complete."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
import multiprocessing
import queue
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import msgspec
from sqlalchemy.ext.asyncio import AsyncEngine

from bench.harness.output import Progress, say
from bench.harness.services import ADMIN_URL, admin, database_url
from db.engine import create_engine
from db.migrate import current_head, migrate
from db.partitions import ensure_usage_partitions
from db.prices import upsert_price
from db.rollup import run_cycle
from gateway.metrics import Metrics
from gateway.seed import demo_prices
from ingest.events import TimeWindow, UsageEvent, check_rules
from ingest.metrics import IngestMetrics
from ingest.synthetic import Traffic, generate
from ingest.writer import EventWriter

SEED = 7
ORGS = 1000
MODELS = 20
LOAD_BATCH = 10_000
PRODUCER_CHECK_S = 5.0  # how often a wait for the next batch checks that the producer still runs
DATA_DAYS = 30
DATA_END_BEFORE_NOW = dt.timedelta(minutes=5)
MARKER_TABLE = "bench_graphql_load"


@dataclasses.dataclass
class Dataset:
    name: str
    url: str
    info: dict[str, Any]  # the marker row: load parameters, timings, the largest org

    @property
    def largest_org(self) -> str:
        return str(self.info["largest_org"])


def load_params(events: int) -> dict[str, Any]:
    return {"events": events, "orgs": ORGS, "models": MODELS, "seed": SEED, "days": DATA_DAYS, "zipf_s": 1.1}


async def prepare_dataset(events: int, *, fresh: bool, writers: int,
                          before_load: Callable[[], Awaitable[None]]) -> Dataset:  # fmt: skip
    """The complete dataset of ``events`` events: reused unless ``fresh``, else loaded (after ``before_load``)."""
    params = load_params(events)
    name = f"bench_graphql_{events}"
    found = None if fresh else await existing_dataset(name, params)
    if found is not None:
        age = dt.datetime.now(dt.UTC) - dt.datetime.fromisoformat(found.info["data_end"])
        say(f"reusing {name} (loaded {found.info['loaded_at']}, data ends {age.total_seconds() / 3600:.1f} h ago)")
        if age > dt.timedelta(days=1):
            say("!! the data ends more than a day ago: 'last 30 days' now covers less of it (--fresh reloads)")
        found.info["reused"] = True
        return found
    await before_load()
    dataset = await load_dataset(name, params, writers)
    dataset.info["reused"] = False
    return dataset


async def marker_of(name: str) -> dict[str, Any] | None:
    """The latest marker row of database ``name``: None when the database, its marker table or a row is missing."""
    connection = await asyncpg.connect(ADMIN_URL)
    try:
        exists = await connection.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
    finally:
        await connection.close()
    return await _marker(database_url(name)) if exists else None


async def existing_dataset(name: str, params: dict[str, Any]) -> Dataset | None:
    """The dataset when its database exists and its marker says it was completely loaded with ``params``."""
    info = await marker_of(name)
    if info is None or not still_valid(name, info, params):
        return None
    if info.get("migration") != current_head():
        await upgrade_in_place(name, info)
    return Dataset(name, database_url(name), info)


def still_valid(name: str, info: dict[str, Any], params: dict[str, Any]) -> bool:
    """Whether a data set's completion marker says it was loaded with ``params``; says why not. The benchmarks
    that keep a data set between runs all decide reuse here (an older migration head is upgraded in place, as a
    deployment would be: :func:`upgrade_in_place`)."""
    if info.get("params") != params:
        say(f"{name} was loaded with other parameters: rebuilding it")
        return False
    return True


async def upgrade_in_place(name: str, info: dict[str, Any]) -> None:
    """Migrate a kept data set from its marker's revision to the code's head, as ``migrate`` does on a live
    deployment (migrations fill what they add from the existing rows), vacuum, and record the new head."""
    url = database_url(name)
    say(f"{name} is at migration {info.get('migration')}, the code at {current_head()}: upgrading it in place")
    engine = create_engine(url, pool_size=1)
    started = time.monotonic()
    try:
        info["migration"] = await migrate(engine)
    finally:
        await engine.dispose()
    info |= await _settle(url, name)
    info["upgraded_in_s"] = round(time.monotonic() - started, 1)
    await _mark(url, info)
    say(f"{name} upgraded to {info['migration']} in {info['upgraded_in_s']:,.0f} s")


async def _marker(url: str) -> dict[str, Any] | None:
    connection = await asyncpg.connect(url)
    try:
        if not await connection.fetchval("SELECT to_regclass($1) IS NOT NULL", MARKER_TABLE):
            return None
        row = await connection.fetchrow(f"SELECT info FROM {MARKER_TABLE} ORDER BY completed_at DESC LIMIT 1")
    finally:
        await connection.close()
    return None if row is None else dict(json.loads(row["info"]))


async def load_dataset(name: str, params: dict[str, Any], writers: int) -> Dataset:
    """Create, migrate and fill the database; returns it with its marker row."""
    url = database_url(name)
    say(f"creating database {name}")
    await admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await admin(f'CREATE DATABASE "{name}"')
    engine = create_engine(url, pool_size=writers + 1)
    info: dict[str, Any] = {"params": params}
    try:
        revision = await migrate(engine)
        now = dt.datetime.now(dt.UTC)
        prices = await _load_prices(engine, now)
        traffic = _traffic(params, now)
        start = traffic.first_time()
        end = start + traffic.span
        info |= {"migration": revision, "price_versions": prices, "data_start": start.isoformat(),
                 "data_end": end.isoformat(), "loaded_at": now.isoformat()}  # fmt: skip
        say(
            f"loading {params['events']:,} events ({start:%Y-%m-%d %H:%M} .. {end:%Y-%m-%d %H:%M} UTC), "
            f"{params['orgs']:,} orgs, {params['models']} models, {LOAD_BATCH:,} a batch, {writers} writers"
        )
        info |= await _write_events(engine, traffic, writers)
        info["rollup_s"] = await roll_up(engine, start)
        info |= await _settle(url, name)
        await _mark(url, info)
    finally:
        await engine.dispose()
    say(f"dataset ready: largest org {info['largest_org']} with {info['largest_org_events']:,} events; "
        f"database {info['database_size']}")  # fmt: skip
    return Dataset(name, url, info)


async def _load_prices(engine: AsyncEngine, now: dt.datetime) -> int:
    prices = demo_prices(now)
    async with engine.begin() as transaction:
        for price in prices:
            await upsert_price(transaction, price, created_by="bench")
    return len(prices)


def _traffic(params: dict[str, Any], now: dt.datetime) -> Traffic:
    end = now - DATA_END_BEFORE_NOW
    start = end - dt.timedelta(days=params["days"])
    return Traffic(
        seed=params["seed"], events=params["events"], orgs=params["orgs"], models=params["models"],
        span=end - start, start=start, zipf_s=params["zipf_s"], source="//bench/graphql-load",
    )  # fmt: skip


def _produce(traffic: Traffic, batch: int, queue: Any) -> None:
    """Child process: generate the events and put them on ``queue`` as JSON arrays of ``batch`` events."""
    encoder = msgspec.json.Encoder()
    chunk: list[dict[str, object]] = []
    for event in generate(traffic):
        chunk.append(event)
        if len(chunk) == batch:
            queue.put(encoder.encode(chunk))
            chunk = []
    if chunk:
        queue.put(encoder.encode(chunk))
    queue.put(None)


async def _write_events(engine: AsyncEngine, traffic: Traffic, writers: int) -> dict[str, Any]:
    """The events generated in a child process while ``writers`` batches are written at a time."""
    # Partitions first: concurrent writers creating the same day's partition can fail with
    # DuplicateTableError (analytics_ensure_usage_partition re-checks to_regclass after an advisory lock,
    # which does not refresh the catalog snapshot).
    async with engine.connect() as transaction:
        start = traffic.first_time()
        await ensure_usage_partitions(transaction, start.date(), (start + traffic.span).date())
        await transaction.commit()
    context = multiprocessing.get_context("spawn")
    handoff = context.Queue(maxsize=8)
    producer = context.Process(target=_produce, args=(traffic, LOAD_BATCH, handoff), daemon=True)
    producer.start()
    writer = EventWriter(engine, None, None, IngestMetrics(Metrics.create().meter("bench")))
    started = time.monotonic()
    try:
        accepted = await _drain(handoff, writer, writers, traffic.events, producer)
    finally:
        producer.join(timeout=10)
        if producer.is_alive():
            producer.terminate()
    load_s = time.monotonic() - started
    say(f"loaded {accepted:,} events in {load_s:,.0f} s: {accepted / load_s:,.0f} events/s")
    return {"events_loaded": accepted, "load_s": round(load_s, 1), "load_events_per_s": round(accepted / load_s)}


async def _drain(handoff: Any, writer: EventWriter, writers: int, total: int, producer: Any) -> int:
    """Write the bodies the producer hands over with ``writers`` concurrent batches; the events accepted.
    A producer that dies before its last batch is an error naming its exit code (a negative one is the signal
    that ended it), not a wait forever."""
    window = TimeWindow.around(dt.datetime.now(dt.UTC), 90)
    decoder = msgspec.json.Decoder(list[UsageEvent])
    bodies: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=writers)
    progress = Progress("loading events", total)
    accepted = 0

    def take() -> bytes | None:
        while True:
            try:
                body: bytes | None = handoff.get(timeout=PRODUCER_CHECK_S)
                return body
            except queue.Empty:
                if not producer.is_alive():
                    raise RuntimeError(f"the event producer died (exit code {producer.exitcode})") from None

    async def read() -> None:
        while (body := await asyncio.to_thread(take)) is not None:
            await bodies.put(body)
        for _ in range(writers):
            await bodies.put(None)

    async def write() -> None:
        nonlocal accepted
        while (body := await bodies.get()) is not None:
            events = decoder.decode(body)
            for event in events:
                check_rules(event, window)
            written = await writer.write(events, channel="seed")
            accepted += written.accepted  # after the await: the writers share the counter
            progress.advance(len(events))

    async with asyncio.TaskGroup() as tasks:  # a failure in one cancels the others
        tasks.create_task(read())
        for _ in range(writers):
            tasks.create_task(write())
    return accepted


async def roll_up(engine: AsyncEngine, start: dt.datetime) -> float:
    """``run_cycle`` a day at a time up to now (each cycle rolls the day before its ``now``), with progress."""
    started = time.monotonic()
    now = dt.datetime.now(dt.UTC)
    steps = [start + dt.timedelta(days=d) for d in range(1, (now - start).days + 1)] + [now]
    for index, moment in enumerate(steps, 1):
        result = await run_cycle(engine, moment)
        say(f"rollup: cycle {index}/{len(steps)} rolled through {result.rolled_until}  "
            f"({time.monotonic() - started:,.0f} s)")  # fmt: skip
    return round(time.monotonic() - started, 1)


async def _settle(url: str, name: str) -> dict[str, Any]:
    """VACUUM ANALYZE, the largest org, the size, and the marker row that makes the dataset reusable."""
    info: dict[str, Any] = {}
    connection = await asyncpg.connect(url)
    try:
        say("VACUUM ANALYZE (so that plans and visibility maps are as a settled database's)")
        started = time.monotonic()
        await connection.execute("VACUUM (ANALYZE)")
        info["vacuum_s"] = round(time.monotonic() - started, 1)
        say(f"VACUUM ANALYZE took {info['vacuum_s']} s")
        info |= await largest_org(connection)
        info["database_size"] = await connection.fetchval("SELECT pg_size_pretty(pg_database_size($1))", name)
        info["completed_at"] = dt.datetime.now(dt.UTC).isoformat()
    finally:
        await connection.close()
    return info


async def _mark(url: str, info: dict[str, Any]) -> None:
    """The marker row: the dataset is complete, loaded as ``info`` says."""
    connection = await asyncpg.connect(url)
    try:
        await connection.execute(
            f"CREATE TABLE IF NOT EXISTS {MARKER_TABLE} (completed_at timestamptz NOT NULL, info jsonb NOT NULL)"
        )
        await connection.execute(f"INSERT INTO {MARKER_TABLE} VALUES (now(), $1::jsonb)", json.dumps(info))
    finally:
        await connection.close()


async def largest_org(connection: asyncpg.Connection) -> dict[str, Any]:
    row = await connection.fetchrow(
        "SELECT org_id, sum(requests)::bigint AS n FROM usage_hourly WHERE org_id LIKE 'org\\_%' "
        "GROUP BY org_id ORDER BY n DESC LIMIT 1"
    )
    assert row is not None, "no rolled-up events"
    events = await connection.fetchval("SELECT count(*) FROM usage_events WHERE org_id = $1", row["org_id"])
    orgs = await connection.fetchval("SELECT count(DISTINCT org_id) FROM freshness_status WHERE org_id LIKE 'org\\_%'")
    models = await connection.fetch("SELECT DISTINCT model FROM usage_hourly WHERE org_id = $1", row["org_id"])
    return {
        "events_in_database": int(await connection.fetchval("SELECT count(*) FROM usage_events")),
        "largest_org": row["org_id"],
        "largest_org_events": int(events),
        "largest_org_models": sorted(r["model"] for r in models),
        "orgs_with_events": int(orgs),
    }
