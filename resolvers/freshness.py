"""Freshness: how current an org's answers are, as a query and a subscription."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncGenerator
from typing import Any

import strawberry

from db.freshness import FreshnessRow, freshness_key
from gateway.context import Context
from gateway.settings import Settings
from resolvers.loaders import freshness_rows
from resolvers.validation import org_argument
from schema.enums import FreshnessStatus
from schema.usage import Freshness


def to_freshness(row: FreshnessRow, settings: Settings, now: dt.datetime) -> Freshness:
    """Lag is measured to the instant up to which ingested data is queryable:
    how far the live AMQP ingesters are caught up (their heartbeats); when none
    beats any more, their last beat (the pipeline stopped reporting); when no
    ingester ever beat, now (HTTP ingestion answers after its commit)."""
    if row.last_beat_at is None:
        queryable_through = now
    elif row.caught_up_through is not None:
        queryable_through = row.caught_up_through
    else:
        queryable_through = row.last_beat_at
    lag = max(0.0, (now - queryable_through).total_seconds())
    if lag < settings.freshness_fresh_s:
        status = FreshnessStatus.FRESH
    elif lag < settings.freshness_stale_s:
        status = FreshnessStatus.DELAYED
    else:
        status = FreshnessStatus.STALE
    return Freshness(
        org_id=strawberry.ID(row.org_id),
        last_event_at=row.last_event_at,
        last_ingested_at=row.last_ingested_at,
        materialized_through=row.materialized_through,
        lag_seconds=lag,
        status=status,
        as_of=now,
    )


async def load_freshness_type(context: Context, org_id: str) -> Freshness:
    row = await context.loaders.freshness.load(org_id)
    return to_freshness(row, context.resources.settings, dt.datetime.now(dt.UTC))


async def resolve_freshness(info: strawberry.Info[Context, Any], org_id: strawberry.ID) -> Freshness:
    org_argument(info.context.require_caller(), org_id)
    return await load_freshness_type(info.context, org_id)


async def subscribe_freshness(
    info: strawberry.Info[Context, Any], org_id: strawberry.ID
) -> AsyncGenerator[Freshness, None]:
    """Pushes now, within a second of each commit for the org, and at least every 30 s."""
    context = info.context
    org_argument(context.require_caller(), org_id)
    resources = context.resources
    async with resources.pubsub.subscribe([freshness_key(org_id)]) as notifications:
        # One pending read at a time: cancelling a read would close the stream.
        next_notification = asyncio.ensure_future(anext(notifications))
        try:
            while True:
                [row] = await freshness_rows(resources, [org_id])
                yield to_freshness(row, resources.settings, dt.datetime.now(dt.UTC))
                done, _ = await asyncio.wait({next_notification}, timeout=resources.settings.freshness_push_s)
                if done:
                    next_notification.result()
                    next_notification = asyncio.ensure_future(anext(notifications))
        finally:
            next_notification.cancel()
