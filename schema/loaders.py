"""Per-request DataLoaders: each kind of shared input is loaded once per operation.

Prices need none: the usage statement reads them in its own snapshot (db/usage.py)."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

from strawberry.dataloader import DataLoader

from db.freshness import FreshnessRow
from ingest import freshness
from schema.services import Services


class Loaders:
    """Created for every request (and every subscription push) in the context."""

    def __init__(self, services: Services) -> None:
        # a partial, not a bound method: the loader must not refer back to this object (a reference cycle
        # per request, left to the cyclic garbage collector)
        self.freshness: DataLoader[str, FreshnessRow] = DataLoader(load_fn=partial(freshness_rows, services))


async def freshness_rows(services: Services, org_ids: Sequence[str]) -> list[FreshnessRow]:
    """Freshness per org (``ingest/freshness.py``), through the GraphQL connection pool."""
    return await freshness.read(services.query_engine, services.cache, services.settings, org_ids)
