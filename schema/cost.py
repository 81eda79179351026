"""The estimated cost of an operation (``graphql_max_cost``): about the number of values the answer holds.

A field costs 1 plus its selections; a list multiplies its items' cost by its expected length, which comes from
the arguments where the schema has them (see :data:`LIST_SIZES`). ``usage.series`` has ``buckets × groups``
items: buckets from ``range`` and ``granularity``, groups a bound per ``groupBy`` dimension (the filter's list
when it is shorter). Aliases add up. This is what the answer's size, the rows read and the memory held all grow
with, so one budget bounds all three; depth and alias counts alone do not.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from graphql import (
    DocumentNode,
    FieldNode,
    FragmentDefinitionNode,
    FragmentSpreadNode,
    GraphQLField,
    GraphQLList,
    GraphQLNamedType,
    GraphQLSchema,
    InlineFragmentNode,
    NamedTypeNode,
    SelectionSetNode,
    get_named_type,
    get_nullable_type,
    get_operation_ast,
    value_from_ast_untyped,
)
from graphql.type import SchemaMetaFieldDef, TypeMetaFieldDef, TypeNameMetaFieldDef

from reliability.report import BREAKDOWN_ROWS, CONTRIBUTORS, MAX_SPIKES

# The longest range of one request, per granularity (resolvers refuse longer ones; the cost estimate uses them).
MAX_RANGE = {
    "MINUTE": dt.timedelta(hours=24),
    "HOUR": dt.timedelta(days=93),
    "DAY": dt.timedelta(days=400),
    "MONTH": dt.timedelta(days=1830),
}

GROUPS_PER_DIMENSION = 10  # expected distinct values of one groupBy dimension in a range (models, projects, keys)
DEFAULT_LIST_SIZE = 100  # a list field with no rule below
BUCKET_SECONDS = {"MINUTE": 60, "HOUR": 3600, "DAY": 86400, "MONTH": 28 * 86400}
USAGE_DIMENSION_FILTERS = {"MODEL": "models", "PROJECT": "projectIds", "API_KEY": "apiKeyIds"}


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


def _reliability_frame(args: Arguments, frame: Frame) -> Frame:
    by_model = args.get("groupByModel") is True
    usage = _usage_frame({**args, "granularity": args.get("granularity") or "HOUR",
                          "groupBy": ["MODEL"] if by_model else []}, frame)  # fmt: skip
    given = args.get("percentiles")
    percentiles = len(given) if isinstance(given, list) else 3
    return Frame(rows=usage.rows, groups=max(1, min(percentiles, 10)))


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
    ("Query", "reliability"): _reliability_frame,
}
LIST_SIZES: dict[tuple[str, str], ListSize] = {
    ("UsageReport", "series"): lambda args, frame: frame.rows,
    ("UsageReport", "unpricedModels"): lambda args, frame: frame.groups,
    ("ReliabilityReport", "series"): lambda args, frame: frame.rows,
    ("ReliabilityReport", "spikes"): lambda args, frame: MAX_SPIKES,
    ("ReliabilityReport", "breakdown"): lambda args, frame: BREAKDOWN_ROWS,
    ("Spike", "topContributors"): lambda args, frame: CONTRIBUTORS,
    ("ReliabilityBucket", "latency"): lambda args, frame: frame.groups,  # the percentiles asked for
    ("ReliabilityTotals", "latency"): lambda args, frame: frame.groups,
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
