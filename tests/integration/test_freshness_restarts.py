"""Freshness across restarts, crashes and deploys of real ``serve --role ingest`` processes (issue 16).

Each test has its own database (so only its own ingesters' heartbeats count), its own AMQP names, and a
freshness schedule in seconds instead of minutes (FRESH under ``FRESH_S``, STALE from ``STALE_S``): the
promise is the same, only shorter. Freshness is read as the gateway reads it (``db.freshness.load_freshness``
and ``ingest.freshness.assess``), without the cache, every ``POLL_S``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import signal
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from db.engine import create_engine
from db.freshness import load_freshness
from ingest.freshness import Status, assess
from ingest.publisher import EventPublisher
from ingest.synthetic import Traffic, generate
from ingest.topology import Topology
from kernel.settings import Settings
from tests.integration.ingest_support import POLL_S, drained, eventually, publisher
from tests.integration.test_ingest_faults import Ingester, Ingesters

pytestmark = pytest.mark.slow

FRESH_S = 6.0
STALE_S = 20.0


@pytest.fixture
async def pool(prefix: str, migrated_database: str, tmp_path: Path) -> AsyncIterator[Ingesters]:
    ingesters = Ingesters(prefix, migrated_database, tmp_path)
    try:
        yield ingesters
    finally:
        await ingesters.stop_all()


# --- what freshness says, sampled ---------------------------------------------------------------------------


@dataclass
class Sample:
    at: float  # time.monotonic()
    status: Status
    lag: float


@dataclass
class Watch:
    """Samples freshness (as the API computes it) in the background, from the start of the block."""

    engine: AsyncEngine
    settings: Settings = field(default_factory=lambda: Settings(freshness_fresh_s=FRESH_S, freshness_stale_s=STALE_S))
    samples: list[Sample] = field(default_factory=list)

    async def sample(self) -> Sample:
        async with self.engine.connect() as connection:
            [row] = await load_freshness(connection, ["org_any"])
        lag, status = assess(row, self.settings, dt.datetime.now(dt.UTC))
        taken = Sample(time.monotonic(), status, lag)
        self.samples.append(taken)
        return taken

    async def run(self) -> None:
        while True:
            await self.sample()
            await asyncio.sleep(POLL_S)  # a clock is what is observed: there is no event to await

    def since(self, start: float) -> list[Sample]:
        return [s for s in self.samples if s.at >= start]

    def worst(self, start: float = 0.0) -> Sample:
        return max(self.since(start), key=lambda s: s.lag)

    def first(self, status: Status, start: float = 0.0) -> Sample | None:
        return next((s for s in self.since(start) if s.status == status), None)


@contextlib.asynccontextmanager
async def watching(database_url: str) -> AsyncIterator[Watch]:
    engine = create_engine(database_url, pool_size=1)
    watch = Watch(engine)
    task = asyncio.create_task(watch.run())
    try:
        yield watch
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await engine.dispose()


async def observe(watch: Watch, seconds: float) -> None:
    """Let the watch sample for ``seconds`` more (the test asserts on what it saw)."""
    end = time.monotonic() + seconds
    await eventually(lambda: _past(end), seconds + 5, f"{seconds} s of samples")
    assert watch.samples, "no freshness samples"


async def _past(instant: float) -> bool:
    return time.monotonic() >= instant


# --- steady load --------------------------------------------------------------------------------------------


@dataclass
class Load:
    """One single-event message every ``interval_s`` until stopped; counts what was confirmed."""

    pub: EventPublisher
    events: list[dict[str, object]]
    interval_s: float = 0.02
    sent: int = 0

    async def run(self) -> None:
        for event in self.events:
            await self.pub.publish([event], as_batch=False)
            self.sent += 1
            await asyncio.sleep(self.interval_s)  # the load's pace, not a wait for an event


@contextlib.asynccontextmanager
async def steady_load(prefix: str, source: str) -> AsyncIterator[Load]:
    traffic = Traffic(seed=5, events=5_000, orgs=3, source=source, org_prefix=f"org_{source[-8:]}")
    async with publisher(prefix) as pub:
        load = Load(pub, list(generate(traffic)))
        task = asyncio.create_task(load.run())
        try:
            yield load
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def heartbeat_rows(database_url: str) -> list[str]:
    connection = await asyncpg.connect(database_url)
    try:
        return [r["instance"] for r in await connection.fetch("SELECT instance FROM ingest_heartbeats")]
    finally:
        await connection.close()


async def stored(database_url: str, source: str) -> int:
    connection = await asyncpg.connect(database_url)
    try:
        return int(await connection.fetchval("SELECT count(*) FROM usage_events WHERE source = $1", source))
    finally:
        await connection.close()


async def start(pool: Ingesters, fresh_s: float = FRESH_S, stale_s: float = STALE_S) -> Ingester:
    """An ingester on the test's short freshness schedule (it prunes rows silent for ``stale_s``)."""
    return await pool.start(freshness_fresh_s=str(fresh_s), freshness_stale_s=str(stale_s))


async def stop(ingester: Ingester) -> None:
    ingester.process.send_signal(signal.SIGTERM)
    await asyncio.wait_for(ingester.process.wait(), 30)


def of(ingester: Ingester) -> str:
    """The heartbeat instance of ``ingester`` (``<host>/<pid>/<queue>``) ends with this."""
    return f"/{ingester.pid}/"


async def only_rows_of(database_url: str, *live: Ingester) -> bool:
    rows = await heartbeat_rows(database_url)
    return len(rows) == len(live) and all(any(of(i) in r for r in rows) for i in live)


# --- the tests ----------------------------------------------------------------------------------------------


async def test_a_clean_restart_stays_fresh_and_leaves_no_row(
    pool: Ingesters, prefix: str, migrated_database: str
) -> None:
    source = f"//test/fresh-restart/{uuid.uuid4().hex[:8]}"
    first = await start(pool)
    async with steady_load(prefix, source) as load, watching(migrated_database) as watch:
        await eventually(lambda: only_rows_of(migrated_database, first), 10, "the first ingester's heartbeat")
        await stop(first)
        stopped_at = time.monotonic()
        second = await start(pool)
        await eventually(lambda: only_rows_of(migrated_database, second), 10, "only the successor's row")
        # Long enough for a leftover row of the first to have turned freshness DELAYED.
        await observe(watch, FRESH_S + 2 - (time.monotonic() - stopped_at))
        assert load.sent > 0
    worst = watch.worst()
    assert worst.status == Status.FRESH, f"{worst}; stopped at {stopped_at}"
    print(f"clean restart: worst lag {worst.lag:.1f} s")


async def test_a_rolling_restart_of_two_ingesters_under_load_never_reports_delayed(
    pool: Ingesters, prefix: str, migrated_database: str
) -> None:
    source = f"//test/fresh-rolling/{uuid.uuid4().hex[:8]}"
    running = [await start(pool), await start(pool)]
    async with steady_load(prefix, source) as load, watching(migrated_database) as watch:
        await eventually(lambda: only_rows_of(migrated_database, *running), 10, "both heartbeats")
        first_stop = time.monotonic()
        for index in range(2):
            await stop(running[index])
            running[index] = await start(pool)
            await eventually(
                lambda: only_rows_of(migrated_database, *running), 10, "rows of the running ingesters only"
            )
        # Long enough for a leftover row of the first one stopped to have turned freshness DELAYED.
        await observe(watch, FRESH_S + 1 - (time.monotonic() - first_stop))
    await drained(Topology.named(prefix).queue, running[0].name, 30)  # the load stopped: all of it committed
    worst = watch.worst()
    assert worst.status == Status.FRESH and worst.lag < FRESH_S, worst
    assert load.sent > 0 and await stored(migrated_database, source) == load.sent


async def test_a_killed_ingester_stops_counting_once_the_survivor_has_caught_up(
    pool: Ingesters, prefix: str, migrated_database: str
) -> None:
    source = f"//test/fresh-kill/{uuid.uuid4().hex[:8]}"
    doomed, survivor = await start(pool), await start(pool)
    async with steady_load(prefix, source), watching(migrated_database) as watch:
        await eventually(lambda: only_rows_of(migrated_database, doomed, survivor), 10, "both heartbeats")
        doomed.process.kill()
        assert await asyncio.wait_for(doomed.process.wait(), 10) == -signal.SIGKILL
        killed_at = time.monotonic()
        await eventually(lambda: only_rows_of(migrated_database, survivor), 10, "the killed ingester's row to go")
        pruned_after = time.monotonic() - killed_at
        await observe(watch, FRESH_S + 2 - (time.monotonic() - killed_at))
    assert pruned_after < 6, f"the dead row counted for {pruned_after:.1f} s"
    worst = watch.worst(killed_at)
    assert worst.status == Status.FRESH, worst
    tail = watch.since(killed_at + pruned_after + 2)
    assert tail and max(s.lag for s in tail) < 3, f"lag once caught up: {max(s.lag for s in tail)}"


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["killed", "stopped"])
async def test_with_no_ingester_and_messages_waiting_freshness_goes_delayed_then_stale_on_schedule(
    how: signal.Signals, pool: Ingesters, prefix: str, migrated_database: str
) -> None:
    only = await start(pool, fresh_s=3, stale_s=6)
    source = f"//test/fresh-none/{uuid.uuid4().hex[:8]}"
    async with watching(migrated_database) as watch:
        watch.settings = Settings(freshness_fresh_s=3, freshness_stale_s=6)
        async with steady_load(prefix, source) as load:
            await eventually(lambda: only_rows_of(migrated_database, only), 10, "the heartbeat")
            only.process.send_signal(how)
            await asyncio.wait_for(only.process.wait(), 30)
            gone_at = time.monotonic()
            await observe(watch, 7)
        successor = await start(pool, fresh_s=3, stale_s=6)
        await drained(Topology.named(prefix).queue, successor.name, 30)
        await eventually(lambda: only_rows_of(migrated_database, successor), 10, "only the successor's row")

        async def fresh_again() -> bool:
            sample = await watch.sample()
            return sample.status == Status.FRESH and sample.lag < 3

        await eventually(fresh_again, 5, "FRESH once the successor has caught up")
    assert load.sent > 0 and await stored(migrated_database, source) == load.sent
    delayed, stale = watch.first(Status.DELAYED, gone_at), watch.first(Status.STALE, gone_at)
    assert delayed is not None and stale is not None, watch.worst(gone_at)
    # Lag runs from how far the last ingester had got, at most a beat (1 s) before it went.
    assert 3 - 1.5 <= delayed.at - gone_at <= 3 + 1.0, delayed.at - gone_at
    assert 6 - 1.5 <= stale.at - gone_at <= 6 + 1.0, stale.at - gone_at
