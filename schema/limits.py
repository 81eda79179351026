"""The bounded cost of every GraphQL request, checked before any resolver runs.

Three budgets, each cheaper than what it protects:

1. **Document size** (``graphql_max_document_bytes``), before parsing: a 10 MiB string literal is never parsed
   nor cached (``GatewaySchema`` checks it for every transport, the WebSocket included).
2. **Fields after fragment expansion** (``graphql_max_fields``), before validation (``schema/field_count.py``).
3. **Estimated cost** (``graphql_max_cost``), after validation (``schema/cost.py``).

Documents are parsed, counted and validated once per distinct text: :class:`PreparedDocuments` is an LRU bounded
in entries *and* in bytes of text (an AST takes about 90 bytes a byte of text, so entries alone do not bound it).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from graphql import (
    DocumentNode,
    GraphQLError,
    GraphQLSchema,
    parse,
)
from graphql.validation import ASTValidationRule, validate
from strawberry.extensions import SchemaExtension

from kernel.errors import QueryTooComplex
from kernel.settings import Settings
from schema.cost import estimate_cost
from schema.field_count import count_fields

CACHE_ENTRIES = 1000
CACHE_TEXT_BYTES = 512 * 1024  # about 50 MB of syntax trees at most


@dataclass(frozen=True)
class Budgets:
    """The limits of one schema, from the settings (their defaults when there are none)."""

    max_document_bytes: int
    max_fields: int
    max_cost: int

    @classmethod
    def from_settings(cls, settings: Settings) -> Budgets:
        return cls(settings.graphql_max_document_bytes, settings.graphql_max_fields, settings.graphql_max_cost)


def too_complex(message: str) -> GraphQLError:
    """A ``QUERY_TOO_COMPLEX`` error, as the transports report it."""
    exc = QueryTooComplex(message)
    return GraphQLError(message, original_error=exc, extensions=dict(exc.extensions))


def document_too_large(query: str | None, limit: int) -> GraphQLError | None:
    """The refusal of a document over ``limit`` bytes (UTF-8), without encoding short ones."""
    if query is None or len(query) * 4 <= limit:
        return None
    size = len(query.encode("utf-8", "surrogatepass"))
    if size <= limit:
        return None
    return too_complex(f"the document is {size} bytes, over the limit of {limit} bytes")


# --- fields after fragment expansion ---------------------------------------------------------------------------


@dataclass
class Prepared:
    """A parsed document and, once validated, its validation errors (including a field-count refusal)."""

    document: DocumentNode
    errors: list[GraphQLError] | None = None


class PreparedDocuments:
    """Parsed and validated documents by text: an LRU bounded in entries and in bytes of text."""

    def __init__(self, budgets: Budgets, entries: int = CACHE_ENTRIES, text_bytes: int = CACHE_TEXT_BYTES) -> None:
        self.budgets = budgets
        self._entries = entries
        self._text_bytes = text_bytes
        self._held = 0
        self._cache: OrderedDict[str, Prepared] = OrderedDict()
        self._rules: tuple[type[ASTValidationRule], ...] | None = None

    def parse(self, query: str, options: Mapping[str, Any]) -> Prepared:
        """The document of ``query`` (GraphQLError on a syntax error, which is not cached)."""
        prepared = self._cache.get(query)
        if prepared is not None:
            self._cache.move_to_end(query)
            return prepared
        prepared = Prepared(parse(query, **options))
        self._remember(query, prepared)
        return prepared

    def validate(
        self, schema: GraphQLSchema, prepared: Prepared, rules: Iterable[type[ASTValidationRule]]
    ) -> list[GraphQLError]:
        """Validation errors of a parsed document; a document over the field budget is refused unvalidated."""
        rules = tuple(rules)
        if self._rules != rules:  # the cached results hold for one set of rules
            self._rules = rules
            for entry in self._cache.values():
                entry.errors = None
        if prepared.errors is None:
            fields = count_fields(prepared.document, cap=self.budgets.max_fields + 1)
            if fields > self.budgets.max_fields:
                prepared.errors = [too_complex(
                    f"the document selects more than {self.budgets.max_fields} fields once its fragments are "
                    "expanded (the limit)"
                )]  # fmt: skip
            else:
                prepared.errors = validate(schema, prepared.document, rules)
        return prepared.errors

    def largest_bytes(self) -> int:
        """The longest document text held (for tests and diagnostics)."""
        return max((len(text) for text in self._cache), default=0)

    def _remember(self, query: str, prepared: Prepared) -> None:
        if len(query) > self._text_bytes:
            return
        self._cache[query] = prepared
        self._held += len(query)
        while len(self._cache) > self._entries or self._held > self._text_bytes:
            text, _ = self._cache.popitem(last=False)
            self._held -= len(text)


class BoundedCost(SchemaExtension):
    """Parses and validates through :class:`PreparedDocuments` (in place of Strawberry's parser and validation
    caches), refusing documents over the field budget before validation and operations over the cost budget
    before execution. Refusals are set as pre-execution errors, never raised, so every transport (HTTP and the
    WebSocket's ``Schema.stream``) answers them as GraphQL errors."""

    def __init__(self, documents: PreparedDocuments) -> None:
        super().__init__()
        self.documents = documents
        self.prepared: Prepared | None = None

    def on_parse(self) -> Iterator[None]:
        context = self.execution_context
        if context.graphql_document is None and context.query:
            try:
                self.prepared = self.documents.parse(context.query, context.parse_options)
                context.graphql_document = self.prepared.document
            except GraphQLError:
                pass  # Strawberry parses it again and reports the syntax error its usual way
        yield

    def on_validate(self) -> Iterator[None]:
        context = self.execution_context
        if context.pre_execution_errors is None and self.prepared is not None:
            errors = self.documents.validate(context.schema._schema, self.prepared, context.validation_rules)
            context.pre_execution_errors = errors or self._over_budget()
        yield

    def _over_budget(self) -> list[GraphQLError]:
        context = self.execution_context
        assert context.graphql_document is not None
        cost = estimate_cost(
            context.schema._schema, context.graphql_document, context.operation_name, context.variables or {}
        )
        budget = self.documents.budgets.max_cost
        if cost <= budget:
            return []
        return [too_complex(
            f"the query's estimated cost is {cost:,}, over the budget of {budget:,} (about the values it would "
            "answer: buckets × groups × fields of each list, summed over aliases); narrow the range, use a "
            "coarser granularity, group by fewer dimensions or split the query"
        )]  # fmt: skip
