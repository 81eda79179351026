"""The GraphQL schema: root types assembled from the domain modules."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

import strawberry
from graphql import GraphQLError
from strawberry.extensions import (
    AddValidationRules,
    MaxAliasesLimiter,
    MaxTokensLimiter,
    ParserCache,
    QueryDepthLimiter,
    ValidationCache,
)
from strawberry.schema.config import StrawberryConfig
from strawberry.types import ExecutionContext

from gateway.scopes import Scope
from resolvers.exports import resolve_export_job
from resolvers.freshness import resolve_freshness, subscribe_freshness
from resolvers.prices import resolve_model_prices, resolve_upsert_model_price
from resolvers.spend import resolve_spend_by_org
from resolvers.usage import resolve_usage
from resolvers.viewer import resolve_viewer
from schema.audit import AuditOperations
from schema.enums import ALL_ENUMS
from schema.errors import apply_contract, log_errors
from schema.execution import FastExecutionContext
from schema.exports import ExportJob
from schema.inputs import ALL_INPUTS
from schema.permissions import requires
from schema.scalars import SCALAR_MAP
from schema.types import Viewer
from schema.usage import Freshness, ModelPrice, OrgSpendConnection, UsageReport

MAX_DEPTH = 10
MAX_ALIASES = 50
MAX_TOKENS = 5000
CACHE_SIZE = 1000
# The limiters' validation rules, built once: the validation cache is keyed by the
# rule classes, so rules made afresh for every request would never hit it.
LIMIT_RULES = (
    *QueryDepthLimiter(max_depth=MAX_DEPTH).validation_rules,
    *MaxAliasesLimiter(max_alias_count=MAX_ALIASES).validation_rules,
)


@strawberry.type
class Query:
    viewer: Viewer = strawberry.field(resolver=resolve_viewer)
    usage: UsageReport = strawberry.field(resolver=resolve_usage, extensions=requires(Scope.USAGE_READ))
    spend_by_org: OrgSpendConnection = strawberry.field(
        resolver=resolve_spend_by_org,
        extensions=requires(Scope.SPEND_READ),
        description="Platform finance: orgs ranked by spend in the range, largest first.",
    )
    freshness: Freshness = strawberry.field(resolver=resolve_freshness, extensions=requires(Scope.USAGE_READ))
    export_job: ExportJob | None = strawberry.field(
        resolver=resolve_export_job, extensions=requires(Scope.EXPORTS_READ)
    )
    model_prices: list[ModelPrice] = strawberry.field(resolver=resolve_model_prices)


@strawberry.type
class Mutation:
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


class GatewaySchema(strawberry.Schema):
    """Logs unexpected errors, then gives every error its contract code (for every transport)."""

    def process_errors(self, errors: list[GraphQLError], execution_context: ExecutionContext | None = None) -> None:
        log_errors(errors)
        for error in errors:
            apply_contract(error)


def build_schema(**overrides: Any) -> strawberry.Schema:
    """The schema the app serves (``overrides`` for tests' extra root types)."""
    options: dict[str, Any] = {
        "query": Query,
        "mutation": Mutation,
        "subscription": Subscription,
        "types": [*ALL_INPUTS, *ALL_ENUMS],
        "config": StrawberryConfig(scalar_map=SCALAR_MAP),
        "execution_context_class": FastExecutionContext,
        # Factories: a fresh extension per request (the caches are shared).
        "extensions": [
            lambda: AddValidationRules(list(LIMIT_RULES)),
            lambda: MaxTokensLimiter(max_token_count=MAX_TOKENS),
            lambda: ParserCache(maxsize=CACHE_SIZE),
            lambda: ValidationCache(maxsize=CACHE_SIZE),
            AuditOperations,
        ],
    }
    return GatewaySchema(**(options | overrides))
