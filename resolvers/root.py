"""The root types (Query, Mutation, Subscription): every field with its resolver and its scope, assembled into
the schema the app serves."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

import strawberry

from kernel.ratelimit import CallerLimiter
from kernel.scopes import Scope
from kernel.settings import Settings
from resolvers.exports import (
    resolve_cancel_export_job,
    resolve_export_job,
    resolve_export_jobs,
    resolve_request_cost_export,
    resolve_request_incident_export,
    subscribe_export_job,
)
from resolvers.freshness import resolve_freshness, subscribe_freshness
from resolvers.prices import resolve_model_prices, resolve_upsert_model_price
from resolvers.reliability import resolve_reliability
from resolvers.spend import resolve_spend_by_org
from resolvers.usage import resolve_usage
from resolvers.viewer import resolve_viewer
from schema.exports import ExportJob, ExportJobConnection
from schema.gateway_schema import GatewaySchema, gateway_schema
from schema.permissions import requires
from schema.reliability import ReliabilityReport
from schema.types import Viewer
from schema.usage import Freshness, ModelPrice, OrgSpendConnection, UsageReport


@strawberry.type
class Query:
    viewer: Viewer = strawberry.field(resolver=resolve_viewer)
    usage: UsageReport = strawberry.field(resolver=resolve_usage, extensions=requires(Scope.USAGE_READ))
    spend_by_org: OrgSpendConnection = strawberry.field(
        resolver=resolve_spend_by_org,
        extensions=requires(Scope.SPEND_READ),
        description="Platform finance: orgs ranked by spend in the range, largest first.",
    )
    reliability: ReliabilityReport = strawberry.field(
        resolver=resolve_reliability, extensions=requires(Scope.RELIABILITY_READ)
    )
    freshness: Freshness = strawberry.field(resolver=resolve_freshness, extensions=requires(Scope.USAGE_READ))
    export_job: ExportJob | None = strawberry.field(
        resolver=resolve_export_job, extensions=requires(Scope.EXPORTS_READ)
    )
    export_jobs: ExportJobConnection = strawberry.field(
        resolver=resolve_export_jobs, extensions=requires(Scope.EXPORTS_READ)
    )
    model_prices: list[ModelPrice] = strawberry.field(resolver=resolve_model_prices)


@strawberry.type
class Mutation:
    request_cost_export: ExportJob = strawberry.mutation(
        resolver=resolve_request_cost_export, extensions=requires(Scope.COST_EXPORT_WRITE)
    )
    request_incident_export: ExportJob = strawberry.mutation(
        resolver=resolve_request_incident_export, extensions=requires(Scope.INCIDENT_EXPORT_WRITE)
    )
    cancel_export_job: ExportJob = strawberry.mutation(
        resolver=resolve_cancel_export_job, extensions=requires(Scope.EXPORTS_READ)
    )
    upsert_model_price: ModelPrice = strawberry.mutation(
        resolver=resolve_upsert_model_price, extensions=requires(Scope.PRICES_WRITE)
    )


@strawberry.type
class Subscription:
    freshness: AsyncGenerator[Freshness, None] = strawberry.subscription(
        resolver=subscribe_freshness,
        extensions=requires(Scope.USAGE_READ),
        description=(
            "Pushes the org's freshness each time new data for it becomes queryable (and at least every 30 s)."
        ),
    )
    export_job: AsyncGenerator[ExportJob, None] = strawberry.subscription(
        resolver=subscribe_export_job,
        extensions=requires(Scope.EXPORTS_READ),
        description="Pushes the job on every status change until it reaches a final status.",
    )


def build_schema(
    settings: Settings | None = None, limiter: CallerLimiter | None = None, **overrides: Any
) -> GatewaySchema:
    """The schema the app serves (``overrides`` for tests' extra root types)."""
    roots: dict[str, Any] = {"query": Query, "mutation": Mutation, "subscription": Subscription}
    return gateway_schema(settings, limiter, **(roots | overrides))
