"""Freshness: how current an org's answers are, as a query and a subscription."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncGenerator
from typing import Any

import strawberry

from db.freshness import FreshnessRow
from ingest import freshness
from kernel.settings import Settings
from resolvers.validation import org_argument
from schema.context import Context
from schema.enums import FreshnessStatus
from schema.loaders import freshness_rows
from schema.usage import Freshness


def to_freshness(row: FreshnessRow, settings: Settings, now: dt.datetime) -> Freshness:
    """The GraphQL type of an org's freshness (``ingest/freshness.py`` says what the lag is)."""
    lag, status = freshness.assess(row, settings, now)
    return Freshness(
        org_id=strawberry.ID(row.org_id),
        last_event_at=row.last_event_at,
        last_ingested_at=row.last_ingested_at,
        materialized_through=row.materialized_through,
        lag_seconds=lag,
        status=FreshnessStatus[status.name],
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
    async with freshness.subscribe(resources.pubsub, org_id) as notifications:
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
