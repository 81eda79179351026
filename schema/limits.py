"""The bounded cost of every GraphQL request, checked before any resolver runs (issue 10, finding 4).

Three budgets, each cheaper than what it protects:

1. **Document size** (``graphql_max_document_bytes``), before parsing: a 10 MiB string literal is never parsed
   nor cached (``GatewaySchema`` checks it for every transport, the WebSocket included).
2. **Fields after fragment expansion** (``graphql_max_fields``), before validation: validation is superlinear in
   the expanded selection (a 26 KB document of a 2,490-field fragment spread 1,240 times took 2.7 s of the event
   loop). The count is linear in the document: each definition is scanned once and each fragment's total is
   memoized, so a chain of fragments that doubles at every step is counted, capped, in microseconds.
3. **Estimated cost** (``graphql_max_cost``), after validation: about the number of values the answer holds. A
   field costs 1 plus its selections; a list multiplies its items' cost by its expected length, which comes from
   the arguments where the schema has them (see :data:`LIST_SIZES`). ``usage.series`` has
   ``buckets × groups`` items: buckets from ``range`` and ``granularity``, groups a bound per ``groupBy``
   dimension (the filter's list when it is shorter). Aliases add up. This is what the answer's size, the rows
   read and the memory held all grow with, so one budget bounds all three; depth and alias counts alone do not.

Documents are parsed, counted and validated once per distinct text: :class:`PreparedDocuments` is an LRU bounded
in entries *and* in bytes of text (an AST takes about 90 bytes a byte of text, so entries alone do not bound it).
"""

from __future__ import annotations

import datetime as dt
import math
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from graphql import (
    DocumentNode,
    FieldNode,
    FragmentDefinitionNode,
    FragmentSpreadNode,
    GraphQLError,
    GraphQLField,
    GraphQLList,
    GraphQLNamedType,
    GraphQLSchema,
    InlineFragmentNode,
    NamedTypeNode,
    OperationDefinitionNode,
    SelectionSetNode,
    get_named_type,
    get_nullable_type,
    get_operation_ast,
    parse,
    value_from_ast_untyped,
)
from graphql.type import SchemaMetaFieldDef, TypeMetaFieldDef, TypeNameMetaFieldDef
from graphql.validation import ASTValidationRule, validate
from strawberry.extensions import SchemaExtension

from kernel.errors import QueryTooComplex
from kernel.settings import Settings

# The longest range of one request, per granularity (resolvers refuse longer ones; the cost estimate uses them).
MAX_RANGE = {
    "MINUTE": dt.timedelta(hours=24),
    "HOUR": dt.timedelta(days=93),
    "DAY": dt.timedelta(days=400),
    "MONTH": dt.timedelta(days=1830),
}
CACHE_ENTRIES = 1000
CACHE_TEXT_BYTES = 512 * 1024  # about 50 MB of syntax trees at most
GROUPS_PER_DIMENSION = 10  # expected distinct values of one groupBy dimension in a range (models, projects, keys)
DEFAULT_LIST_SIZE = 100  # a list field with no rule below
BUCKET_SECONDS = {"MINUTE": 60, "HOUR": 3600, "DAY": 86400, "MONTH": 28 * 86400}
USAGE_DIMENSION_FILTERS = {"MODEL": "models", "PROJECT": "projectIds", "API_KEY": "apiKeyIds"}


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


def count_fields(document: DocumentNode, cap: int) -> int:
    """Fields every operation (and every fragment no operation uses) selects once fragments are expanded, at
    most ``cap``. Linear in the document: each selection set is scanned once, without recursion."""
    own: dict[str, tuple[int, Counter[str]]] = {}
    operations = []
    for definition in document.definitions:
        if isinstance(definition, FragmentDefinitionNode):
            own.setdefault(definition.name.value, _scan(definition.selection_set))
        elif isinstance(definition, OperationDefinitionNode):
            operations.append(_scan(definition.selection_set))
    totals: dict[str, int] = {}
    for name in own:
        _fragment_total(name, own, totals, cap)
    used = {name for _, spreads in operations for name in spreads}
    used.update(name for _, spreads in own.values() for name in spreads)
    total = sum(_expanded(fields, spreads, totals, cap) for fields, spreads in operations)
    total += sum(totals[name] for name in own if name not in used)  # validation visits unused fragments too
    return min(total, cap)


def _scan(selection_set: SelectionSetNode) -> tuple[int, Counter[str]]:
    """Fields of a selection set, nested ones included, and how often it spreads each fragment."""
    fields, spreads = 0, Counter[str]()
    stack = [selection_set]
    while stack:
        for selection in stack.pop().selections:
            if isinstance(selection, FragmentSpreadNode):
                spreads[selection.name.value] += 1
                continue
            if isinstance(selection, FieldNode):
                fields += 1
            if selection.selection_set is not None:  # type: ignore[attr-defined]
                stack.append(selection.selection_set)  # type: ignore[attr-defined]
    return fields, spreads


def _expanded(fields: int, spreads: Counter[str], totals: dict[str, int], cap: int) -> int:
    """Fields of a selection set with its spreads expanded (fragments not in ``totals`` count 0: a cycle)."""
    return min(cap, fields + sum(n * totals.get(name, 0) for name, n in spreads.items()))


def _fragment_total(name: str, own: dict[str, tuple[int, Counter[str]]], totals: dict[str, int], cap: int) -> int:
    """The expanded field count of fragment ``name``, memoized in ``totals``; depth-first without recursion. A
    fragment in a cycle (which validation refuses) counts its own fields only."""
    if name in totals or name not in own:
        return totals.get(name, 0)
    in_progress = {name}
    stack = [name]
    while stack:
        current = stack[-1]
        pending = [s for s in own[current][1] if s in own and s not in totals and s not in in_progress]
        if pending:
            in_progress.update(pending)
            stack.extend(pending)
            continue
        stack.pop()
        if current not in totals:
            fields, spreads = own[current]
            totals[current] = _expanded(fields, spreads, totals, cap)
    return totals[name]


# --- estimated cost --------------------------------------------------------------------------------------------

Arguments = Mapping[str, Any]
ListSize = Callable[[Arguments, "Frame"], int]


@dataclass(frozen=True)
class Frame:
    """What a field's arguments tell the lists below it (e.g. ``usage``'s rows for ``series``)."""

    rows: int = 1
    groups: int = 1


def _usage_frame(args: Arguments, frame: Frame) -> Frame:
    granularity = str(args.get("granularity") or "DAY")
    step = BUCKET_SECONDS.get(granularity, BUCKET_SECONDS["MINUTE"])
    longest = MAX_RANGE.get(granularity, MAX_RANGE["MINUTE"])
    span = _span(args.get("range"), longest)
    buckets = math.ceil(span.total_seconds() / step) + 1  # a range off the bucket grid touches one more
    given = args.get("filter")
    filters: dict[str, Any] = given if isinstance(given, dict) else {}
    group_by = args.get("groupBy")
    dimensions = {str(d) for d in group_by} if isinstance(group_by, list) else set()
    groups = 1
    for dimension in dimensions:
        groups *= _dimension_bound(filters.get(USAGE_DIMENSION_FILTERS.get(dimension, "")))
    models = _dimension_bound(filters.get("models"))
    return Frame(rows=buckets * groups, groups=models)


def _dimension_bound(values: object) -> int:
    if isinstance(values, list):
        return max(1, min(len(values), GROUPS_PER_DIMENSION))
    return GROUPS_PER_DIMENSION


def _span(time_range: object, longest: dt.timedelta) -> dt.timedelta:
    """The range's length, within what the resolver accepts (it refuses longer ones itself, more clearly)."""
    try:
        start = dt.datetime.fromisoformat(time_range["from"])  # type: ignore[index]
        end = dt.datetime.fromisoformat(time_range["to"])  # type: ignore[index]
        return max(dt.timedelta(0), min(end - start, longest))
    except (TypeError, ValueError, KeyError):
        return longest  # a variable not given, or a value the scalar will refuse: assume the worst


def _page(args: Arguments, frame: Frame) -> Frame:
    first = args.get("first", 50)
    return Frame(rows=max(1, min(first if isinstance(first, int) else 500, 500)))


# Fields whose arguments size the lists below them, and the sizes of list fields, by (type, field).
FRAMES: dict[tuple[str, str], Callable[[Arguments, Frame], Frame]] = {
    ("Query", "usage"): _usage_frame,
    ("Query", "spendByOrg"): _page,
}
LIST_SIZES: dict[tuple[str, str], ListSize] = {
    ("UsageReport", "series"): lambda args, frame: frame.rows,
    ("UsageReport", "unpricedModels"): lambda args, frame: frame.groups,
    ("OrgSpendConnection", "edges"): lambda args, frame: frame.rows,
    ("Viewer", "roles"): lambda args, frame: 10,
    ("Viewer", "scopes"): lambda args, frame: 10,
}


def introspection_sizes(schema: GraphQLSchema) -> dict[tuple[str, str], ListSize]:
    """The introspection lists' lengths from the schema itself: exact for ``types`` and ``directives``, the
    mean per type (per field) for the lists of a type (of a field), so that ``types { fields }`` costs exactly
    what it answers."""
    types = list(schema.type_map.values())
    members = sum(len(getattr(t, "fields", None) or getattr(t, "values", None) or ()) for t in types)
    fields = [f for t in types for f in (getattr(t, "fields", None) or {}).values() if isinstance(f, GraphQLField)]
    arguments = sum(len(f.args) for f in fields)

    def constant(n: int) -> ListSize:
        return lambda args, frame: max(1, n)

    sizes: dict[tuple[str, str], ListSize] = {
        ("__Type", name): constant(math.ceil(members / len(types)))
        for name in ("fields", "inputFields", "enumValues", "interfaces", "possibleTypes")
    }
    sizes[("__Schema", "types")] = constant(len(types))
    sizes[("__Schema", "directives")] = constant(len(schema.directives))
    sizes[("__Field", "args")] = constant(math.ceil(arguments / max(1, len(fields))))
    sizes[("__Directive", "args")] = constant(max(len(d.args) for d in schema.directives))
    sizes[("__Directive", "locations")] = constant(20)
    return sizes


def estimate_cost(
    schema: GraphQLSchema, document: DocumentNode, operation_name: str | None, variables: Mapping[str, Any]
) -> int:
    """The estimated cost of the operation that would run (see the module's docstring). Call it on a valid
    document: it trusts validation for types, fragment cycles and depth."""
    operation = get_operation_ast(document, operation_name)
    if operation is None:
        return 0
    root = schema.get_root_type(operation.operation)
    if root is None:
        return 0
    fragments = {d.name.value: d for d in document.definitions if isinstance(d, FragmentDefinitionNode)}
    return _CostWalk(schema, fragments, variables).selections(operation.selection_set, root, Frame())


class _CostWalk:
    def __init__(
        self, schema: GraphQLSchema, fragments: dict[str, FragmentDefinitionNode], variables: Mapping[str, Any]
    ) -> None:
        self.schema = schema
        self.fragments = fragments
        self.variables = variables
        self.sizes = {**introspection_sizes_cached(schema), **LIST_SIZES}

    def selections(self, selection_set: SelectionSetNode, parent: GraphQLNamedType, frame: Frame) -> int:
        total = 0
        for selection in selection_set.selections:
            if isinstance(selection, FieldNode):
                total += self.field(selection, parent, frame)
                continue
            if isinstance(selection, FragmentSpreadNode):
                fragment = self.fragments.get(selection.name.value)
                if fragment is None:
                    continue
                condition: NamedTypeNode | None = fragment.type_condition
                selections = fragment.selection_set
            elif isinstance(selection, InlineFragmentNode):
                condition, selections = selection.type_condition, selection.selection_set
            else:  # pragma: no cover - no other kind of selection exists
                continue
            named = self.schema.get_type(condition.name.value) if condition else parent
            total += self.selections(selections, named or parent, frame)
        return total

    def field(self, node: FieldNode, parent: GraphQLNamedType, frame: Frame) -> int:
        name = node.name.value
        definition = _field_definition(self.schema, parent, name)
        if definition is None:
            return 1
        key = (parent.name, name)
        args = self._arguments(node) if node.arguments or key in FRAMES else {}
        if key in FRAMES:
            frame = FRAMES[key](args, frame)
        size = 1
        if isinstance(get_nullable_type(definition.type), GraphQLList):
            sizer = self.sizes.get(key)
            size = max(0, sizer(args, frame)) if sizer else DEFAULT_LIST_SIZE
        below = self.selections(node.selection_set, get_named_type(definition.type), frame) if node.selection_set else 0
        return size * (1 + below)

    def _arguments(self, node: FieldNode) -> dict[str, Any]:
        return {a.name.value: value_from_ast_untyped(a.value, dict(self.variables)) for a in node.arguments or ()}


def _field_definition(schema: GraphQLSchema, parent: GraphQLNamedType, name: str) -> GraphQLField | None:
    if name == "__typename":
        return TypeNameMetaFieldDef
    if parent is schema.query_type and name in ("__schema", "__type"):
        return SchemaMetaFieldDef if name == "__schema" else TypeMetaFieldDef
    fields = getattr(parent, "fields", None)
    return fields.get(name) if fields else None


_INTROSPECTION_SIZES: dict[int, tuple[GraphQLSchema, dict[tuple[str, str], ListSize]]] = {}


def introspection_sizes_cached(schema: GraphQLSchema) -> dict[tuple[str, str], ListSize]:
    known = _INTROSPECTION_SIZES.get(id(schema))
    if known is None or known[0] is not schema:
        known = _INTROSPECTION_SIZES[id(schema)] = (schema, introspection_sizes(schema))
    return known[1]


# --- one parse and one validation per distinct document ----------------------------------------------------------


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
