"""Per-request DataLoaders: each kind of shared input is loaded once per operation.

Prices need none: the usage statement reads them in its own snapshot (db/usage.py)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING

import orjson
from strawberry.dataloader import DataLoader

from db.freshness import FreshnessRow, freshness_key, load_freshness

if TYPE_CHECKING:
    from gateway.resources import Resources


class Loaders:
    """Created for every request (and every subscription push) in the context."""

    def __init__(self, resources: Resources) -> None:
        # a partial, not a bound method: the loader must not refer back to this object (a reference cycle
        # per request, left to the cyclic garbage collector)
        self.freshness: DataLoader[str, FreshnessRow] = DataLoader(load_fn=partial(freshness_rows, resources))


async def freshness_rows(resources: Resources, org_ids: Sequence[str]) -> list[FreshnessRow]:
    """Freshness per org from the cache, the misses from the database in one query."""
    cache, settings = resources.cache, resources.settings
    found: dict[str, FreshnessRow] = {}
    for org_id in org_ids:
        cached = await cache.get(freshness_key(org_id))
        if cached is not None:
            found[org_id] = _decode(cached)
    missing = [org_id for org_id in org_ids if org_id not in found]
    if missing:
        async with resources.query_engine.connect() as connection:
            rows = await load_freshness(connection, missing, live_s=settings.freshness_stale_s)
        for row in rows:
            found[row.org_id] = row
            await cache.set(freshness_key(row.org_id), orjson.dumps(row), settings.freshness_cache_ttl_s)
    return [found[org_id] for org_id in org_ids]


def _decode(data: bytes) -> FreshnessRow:
    raw: dict[str, str | None] = orjson.loads(data)

    def time(key: str) -> dt.datetime | None:
        value = raw[key]
        return dt.datetime.fromisoformat(value) if value is not None else None

    return FreshnessRow(
        org_id=str(raw["org_id"]),
        last_event_at=time("last_event_at"),
        last_ingested_at=time("last_ingested_at"),
        materialized_through=time("materialized_through"),
        caught_up_through=time("caught_up_through"),
        last_beat_at=time("last_beat_at"),
    )
