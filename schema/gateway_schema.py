"""The schema class the gateway serves: budgets, per-caller limits, error contract, audit, fast execution.

The root types are assembled in ``resolvers/root.py``."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable
from contextlib import aclosing
from typing import Any

import strawberry
from graphql import GraphQLError, get_operation_ast
from graphql import OperationType as OperationTypeNode
from graphql.validation import NoSchemaIntrospectionCustomRule
from strawberry.extensions import AddValidationRules, MaxAliasesLimiter, MaxTokensLimiter, QueryDepthLimiter
from strawberry.schema.config import StrawberryConfig
from strawberry.types import ExecutionContext, ExecutionResult
from strawberry.types.execution import PreExecutionError
from strawberry.types.graphql import OperationType

from kernel.errors import ErrorCode, RateLimited
from kernel.ratelimit import ADMITTED, CallerLimiter, caller_key
from kernel.settings import Settings
from schema.enums import ALL_ENUMS
from schema.errors import apply_contract, log_errors
from schema.execution import FastExecutionContext
from schema.inputs import ALL_INPUTS
from schema.limits import BoundedCost, Budgets, PreparedDocuments, document_too_large
from schema.operation_audit import AuditOperations, record_refusal
from schema.scalars import SCALAR_MAP

MAX_DEPTH = 10
MAX_ALIASES = 50
MAX_TOKENS = 5000
# The limiters' validation rules, built once: the validation cache is keyed by the
# rule classes, so rules made afresh for every request would never hit it.
LIMIT_RULES = (
    *QueryDepthLimiter(max_depth=MAX_DEPTH).validation_rules,
    *MaxAliasesLimiter(max_alias_count=MAX_ALIASES).validation_rules,
)


class GatewaySchema(strawberry.Schema):
    """Logs unexpected errors, then gives every error its contract code (for every transport); refuses a
    document over the size budget before anything parses it, over HTTP and over the WebSocket alike."""

    documents: PreparedDocuments
    limiter: CallerLimiter

    async def execute(
        self,
        query: str | None,
        variable_values: dict[str, Any] | None = None,
        context_value: Any | None = None,
        root_value: Any | None = None,
        operation_name: str | None = None,
        allowed_operation_types: Iterable[OperationType] | None = None,
        operation_extensions: dict[str, Any] | None = None,
    ) -> ExecutionResult:
        refusal = document_too_large(query, self.documents.budgets.max_document_bytes)
        if refusal is not None:
            self.process_errors([refusal])
            _record_refusal(context_value, refusal)
            return ExecutionResult(data=None, errors=[refusal])
        return await super().execute(
            query, variable_values, context_value, root_value, operation_name, allowed_operation_types,
            operation_extensions,
        )  # fmt: skip

    async def stream(
        self,
        query: str | None,
        variable_values: dict[str, Any] | None = None,
        context_value: Any | None = None,
        root_value: Any | None = None,
        operation_name: str | None = None,
        operation_extensions: dict[str, Any] | None = None,
        allowed_operation_types: Iterable[OperationType] | None = None,
    ) -> AsyncGenerator[ExecutionResult, None]:
        """The WebSocket transport's way in (every operation, subscriptions and queries alike): the document
        size and the caller's limits apply here, as the HTTP middleware applies them to ``POST /graphql``."""
        refusal = document_too_large(query, self.documents.budgets.max_document_bytes)
        if refusal is not None:
            _record_refusal(context_value, refusal)
            return self._refused(refusal)

        async def start() -> AsyncGenerator[ExecutionResult, None]:
            return await super(GatewaySchema, self).stream(  # type: ignore[return-value]
                query, variable_values, context_value, root_value, operation_name, operation_extensions,
                allowed_operation_types,
            )  # fmt: skip

        caller = getattr(context_value, "caller", None)
        if caller is None or ADMITTED.get():
            return await start()
        redis = getattr(getattr(context_value, "resources", None), "redis", None)
        return self._limited(caller_key(caller), redis, self._holds_slot(query, operation_name), start)

    async def _limited(
        self,
        key: str,
        redis: Any,
        holds_slot: bool,
        start: Callable[[], Awaitable[AsyncGenerator[ExecutionResult, None]]],
    ) -> AsyncGenerator[ExecutionResult, None]:
        """The operation's results under its caller's rate and, unless it is a subscription (which waits on
        pushes, not on work), one of its concurrency slots. All inside the generator, so a slot is held only
        while the operation runs."""
        try:
            await self.limiter.check_rate(redis, key)
            if holds_slot:
                self.limiter.acquire(key)
        except RateLimited as exc:
            async for refused in self._refused(GraphQLError(exc.message, original_error=exc)):
                yield refused
            return
        try:
            async with aclosing(await start()) as results:
                async for result in results:
                    yield result
        finally:
            if holds_slot:
                self.limiter.release(key)

    def _holds_slot(self, query: str | None, operation_name: str | None) -> bool:
        try:
            document = self.documents.parse(query or "", {"max_tokens": MAX_TOKENS}).document
        except GraphQLError:
            return False  # refused at parsing, holding nothing
        operation = get_operation_ast(document, operation_name)
        return operation is not None and operation.operation is not OperationTypeNode.SUBSCRIPTION

    async def _refused(self, error: GraphQLError) -> AsyncGenerator[ExecutionResult, None]:
        self.process_errors([error])
        yield PreExecutionError(data=None, errors=[error])

    def process_errors(self, errors: list[GraphQLError], execution_context: ExecutionContext | None = None) -> None:
        log_errors(errors)
        for error in errors:
            apply_contract(error)


def _record_refusal(context: Any, refusal: GraphQLError) -> None:
    trail = getattr(getattr(context, "resources", None), "audit", None)
    record_refusal(trail, getattr(context, "caller", None), ErrorCode.QUERY_TOO_COMPLEX, refusal.message)


def gateway_schema(settings: Settings | None, limiter: CallerLimiter | None, **root_types: Any) -> GatewaySchema:
    """A schema of ``root_types`` (query, mutation, subscription, and tests' extra types) with the request
    budgets and switches of ``settings`` (their defaults when none, as for the SDL export) and the per-caller
    ``limiter`` it shares with the HTTP middleware."""
    settings = settings or Settings.model_construct()  # the defaults, without reading the environment
    documents = PreparedDocuments(Budgets.from_settings(settings))
    rules = [*LIMIT_RULES]
    if not settings.introspection_enabled:
        rules.append(NoSchemaIntrospectionCustomRule)
    options: dict[str, Any] = {
        "types": [*ALL_INPUTS, *ALL_ENUMS],
        "config": StrawberryConfig(scalar_map=SCALAR_MAP),
        "execution_context_class": FastExecutionContext,
        # Factories: a fresh extension per request (the caches are shared).
        "extensions": [
            lambda: AddValidationRules(rules),
            lambda: MaxTokensLimiter(max_token_count=MAX_TOKENS),
            lambda: BoundedCost(documents),
            AuditOperations,
        ],
    }
    schema = GatewaySchema(**(options | root_types))
    schema.documents = documents
    schema.limiter = limiter or CallerLimiter.from_settings(settings)
    return schema
