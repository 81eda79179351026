"""``analytics-gateway seed-demo``: a demo price catalog and synthetic traffic."""

from __future__ import annotations

import datetime as dt
import decimal
from contextlib import AsyncExitStack
from dataclasses import dataclass

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TimeRemainingColumn
from sqlalchemy.ext.asyncio import AsyncEngine

from db.prices import Price, upsert_price
from gateway.metrics import Metrics
from gateway.resources import open_database
from ingest.events import TimeWindow, validate
from ingest.metrics import IngestMetrics
from ingest.synthetic import MODELS, Traffic, generate
from ingest.writer import EventWriter
from kernel.hours import floor_hour
from kernel.settings import Settings

BATCH = 5000
D = decimal.Decimal


@dataclass(frozen=True)
class Seeded:
    events: int
    accepted: int
    prices: int
    orgs: int


def demo_prices(now: dt.datetime) -> list[Price]:
    """A price for every demo model but the last (left unpriced on purpose), and a
    price cut ten days ago for the first two."""
    since = floor_hour(now - dt.timedelta(days=90))
    cut = floor_hour(now - dt.timedelta(days=10))
    prices = []
    for rank, model in enumerate(MODELS[:-1]):
        base = D(rank % 7 + 1) * D("0.25")
        prices.append(Price(model, since, base, base * 4, base / 2))
        if rank < 2:
            prices.append(Price(model, cut, base * D("0.8"), base * D("3.2"), base * D("0.4")))
    return prices


async def seed_demo(settings: Settings, *, events: int, orgs: int, days: int, seed: int) -> Seeded:
    async with AsyncExitStack() as stack:
        engine, _, _ = await open_database(settings, stack)
        now = dt.datetime.now(dt.UTC)
        prices = demo_prices(now)
        async with engine.begin() as connection:
            for price in prices:
                await upsert_price(connection, price, created_by="seed-demo")
        traffic = Traffic(seed=seed, events=events, orgs=orgs, models=len(MODELS), span=dt.timedelta(days=days),
                          start=now - dt.timedelta(days=days), org_prefix="org", source="//demo/seed")  # fmt: skip
        accepted = await _write(engine, traffic, settings.raw_retention_days)
    return Seeded(events=events, accepted=accepted, prices=len(prices), orgs=orgs)


async def _write(engine: AsyncEngine, traffic: Traffic, retention_days: int) -> int:
    writer = EventWriter(engine, None, None, IngestMetrics(Metrics.create().meter("seed")))
    window = TimeWindow.around(dt.datetime.now(dt.UTC), retention_days)
    columns = (BarColumn(), MofNCompleteColumn(), TaskProgressColumn(), TimeRemainingColumn())
    accepted, batch = 0, []
    with Progress("seeding events", *columns) as progress:
        task = progress.add_task("events", total=traffic.events)
        for event in generate(traffic):
            batch.append(validate(event, window))
            if len(batch) == BATCH:
                accepted += (await writer.write(batch, channel="seed")).accepted
                progress.advance(task, len(batch))
                batch = []
        if batch:
            accepted += (await writer.write(batch, channel="seed")).accepted
            progress.advance(task, len(batch))
    return accepted
