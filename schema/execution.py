"""The fast execution path: lists of plain-data objects completed by compiled projectors.

graphql-core completes a list of objects field by field: for every item and
every field it builds a resolve info, calls a resolver, checks nullability and
serializes, several microseconds a field. An analytics answer (thousands of
buckets of a dozen fields) spends most of its time there.

For a list whose items are *plain data* (every selected field is a plain
attribute: no resolver, no arguments, at most a ``@requires`` scope check),
the selection set collected by graphql-core (aliases, fragments, ``@include``
and ``@skip`` already applied) is turned once into a Python function that
builds each item's dict directly, e.g.::

    def project(item):
        return {"start": s0(item.start), "n": s1(item.requests), "group": p0(item.group)}

Functions are cached by the shape of the selection, so each is compiled once per
process. Semantics stay those of graphql-core: anything the projector cannot
complete exactly as the ordinary executor would (a null in a non-null field, a
serializer error, a field with a resolver, @defer) makes the whole list fall
back to the ordinary executor. A field the caller may not see (``@requires``)
is null in every item with one FORBIDDEN error at the first item's path, as
the contract describes.

A resolver may answer such a list with its JSON text instead (``RenderedList``,
e.g. written by PostgreSQL: ``resolvers/usage.py``). It learns the selection
with :func:`list_plan` (the plan that the executor computes for that field)
and must write exactly what the projector would; the executor splices the text
in with ``orjson.Fragment`` and adds the FORBIDDEN errors of denied fields.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import orjson
from graphql import (
    GraphQLBoolean,
    GraphQLError,
    GraphQLFloat,
    GraphQLList,
    GraphQLObjectType,
    GraphQLOutputType,
    GraphQLString,
    get_nullable_type,
    is_leaf_type,
    is_list_type,
    is_non_null_type,
    is_object_type,
)
from graphql.execution.collect_fields import FieldDetails, FieldDetailsList
from graphql.pyutils import Path
from graphql.type.definition import GraphQLResolveInfo, GraphQLResolveInfoHelpers
from strawberry.permission import PermissionExtension
from strawberry.schema.schema import StrawberryGraphQLCoreExecutionContext
from strawberry.schema.schema_converter import GraphQLCoreConverter

from kernel.errors import ErrorCode
from schema.permissions import RequireScope
from schema.scalars import serialize_bigint, serialize_datetime

MAX_COMPILED = 512

# Values that a serializer returns unchanged, recognised inline by the compiled code
# ({v}: the value), which then skips the call; every other value is serialized.
UNCHANGED_WHEN: dict[Callable[[Any], Any], str] = {
    serialize_bigint: "{v}.__class__ is int",
    serialize_datetime: "{v}.__class__ is _datetime and {v}.tzinfo is _UTC",
    GraphQLString.serialize: "{v}.__class__ is str",
    GraphQLBoolean.serialize: "{v}.__class__ is bool",
    GraphQLFloat.serialize: "{v}.__class__ is float and {v} - {v} == 0.0",  # finite (inf - inf and NaN are NaN)
}


class _Fallback(Exception):
    """The projector met something only the ordinary executor handles."""


@dataclass(frozen=True)
class FieldPlan:
    """How one response key of an item is produced."""

    key: str
    attribute: str | None  # None: __typename
    typename: str | None = None
    serialize: Callable[[Any], Any] | None = None
    nested: ObjectPlan | None = None
    leaf_list: bool = False
    object_list: bool = False  # [Object!]: each item projected by ``nested``
    non_null: bool = False
    denied: bool = False
    scope: object = None
    details: FieldDetailsList | None = None
    field_type: GraphQLOutputType | None = None

    @property
    def signature(self) -> tuple[object, ...]:
        """What the compiled projector depends on. The serializer itself, not its id: an enum's is a bound
        method, a new object at each access (equal to the others, but with its own id), so an id made every
        request's plan new and compiled its projector again."""
        nested = self.nested.signature if self.nested else None
        return (self.key, self.attribute, self.typename, self.serialize, nested, self.leaf_list,
                self.object_list, self.non_null, self.denied)  # fmt: skip


@dataclass(frozen=True)
class ObjectPlan:
    type_name: str
    fields: tuple[FieldPlan, ...]

    @property
    def signature(self) -> tuple[object, ...]:
        return (self.type_name, *(field.signature for field in self.fields))


@dataclass(frozen=True)
class RenderedList:
    """A list answered as JSON text by its resolver (e.g. by the database, see ``resolvers/usage.py``): the
    items' objects, comma-separated, written for the selection whose plan has ``signature``."""

    json: str
    signature: tuple[object, ...]


def _finished(*_args: Any) -> Any:
    raise RuntimeError("this GraphQL execution has finished")


# What an executor's ``async_helpers`` become once its response is built (see ``build_response``).
FINISHED_HELPERS = GraphQLResolveInfoHelpers(gather=_finished, track=_finished)


class FastExecutionContext(StrawberryGraphQLCoreExecutionContext):
    """graphql-core's executor, with lists of plain-data objects projected in one pass."""

    def execute_operation(self, serially: bool | None = None) -> Any:
        _executing.set(self)  # for list_plan, in this task and the tasks that it starts
        return super().execute_operation(serially)

    def build_response(self, data: dict[str, Any] | None) -> Any:
        """The response; then, if no work is left in the background, the executor lets go of itself.

        graphql-core's executor refers to itself through ``async_helpers`` (bound methods), so each request
        left a cycle of about a hundred objects (the executor, its collected fields, caches and errors) that
        only the cyclic garbage collector could free. With a high gen-0 threshold (gateway/gc_policy.py)
        that made rare but long collections, 20-80 ms each. Without the cycle, reference counting frees it
        all when the request ends.
        """
        response = super().build_response(data)
        if _executing.get() is self:
            _executing.set(None)
        if not (self.background_futures or self.pending_incremental_futures or self.async_work_finished_hook_task):
            self.async_helpers = FINISHED_HELPERS
        return response

    def complete_list_value(
        self,
        return_type: GraphQLList[GraphQLOutputType],
        field_details_list: FieldDetailsList,
        info: Any,
        path: Path,
        result: Any,
        position_context: Any,
    ) -> Any:
        item_type = return_type.of_type
        if isinstance(result, RenderedList):
            return self._rendered_list(get_nullable_type(item_type), field_details_list, path, result)
        if isinstance(result, list) and result and is_object_type(get_nullable_type(item_type)):
            plan = self._object_plan(get_nullable_type(item_type), field_details_list)  # type: ignore[arg-type]
            if plan is not None:
                try:
                    return self._project_list(plan, result, path)
                except _Fallback:
                    pass
        return super().complete_list_value(return_type, field_details_list, info, path, result, position_context)

    def _rendered_list(self, item_type: Any, details: FieldDetailsList, path: Path, result: RenderedList) -> Any:
        """The rendered text as the list (spliced into the response by orjson), with the errors the projector
        would report: one FORBIDDEN per denied field (rendered as null) at the first item."""
        plan = self._object_plan(item_type, details) if is_object_type(item_type) else None
        if plan is None or plan.signature != result.signature:
            raise RuntimeError("a rendered list does not match its selection")  # a bug of ours: INTERNAL
        if not result.json:
            return []
        for field in plan.fields:
            if field.denied:
                self._forbidden_once(field, path.add_key(0, None))
        return orjson.Fragment("[" + result.json + "]")

    def list_plan(self, info: GraphQLResolveInfo[Any], field_name: str) -> ObjectPlan | None:
        """The plan of list field ``field_name`` of the object that ``info``'s field returns, when exactly one
        response key selects it and its items are plain data; else None."""
        parent = get_nullable_type(info.return_type)
        if not is_object_type(parent) or field_name not in parent.fields:
            return None
        collected = self.collect_subfields(parent, [FieldDetails(node, None) for node in info.field_nodes])
        if collected.new_defer_usages or collected.forbidden_directive_instances:
            return None
        found = [d for d in collected.grouped_field_set.values() if d[0].node.name.value == field_name]
        list_type = get_nullable_type(parent.fields[field_name].type)
        if len(found) != 1 or not is_list_type(list_type):
            return None
        item_type = get_nullable_type(list_type.of_type)
        return self._object_plan(item_type, found[0]) if is_object_type(item_type) else None

    def _object_plan(self, object_type: GraphQLObjectType, details: FieldDetailsList) -> ObjectPlan | None:
        collected = self.collect_subfields(object_type, details)
        if collected.new_defer_usages or collected.forbidden_directive_instances:
            return None
        fields = []
        for key, field_details in collected.grouped_field_set.items():
            field = self._field_plan(object_type, key, field_details)
            if field is None:
                return None
            fields.append(field)
        return ObjectPlan(object_type.name, tuple(fields))

    def _field_plan(self, object_type: GraphQLObjectType, key: str, details: FieldDetailsList) -> FieldPlan | None:
        name = details[0].node.name.value
        if name == "__typename":
            return FieldPlan(key, None, typename=object_type.name)
        field_def = object_type.fields[name]
        definition = field_def.extensions.get(GraphQLCoreConverter.DEFINITION_BACKREF)
        if field_def.args or definition is None or definition.base_resolver is not None:
            return None
        scope = _required_scope(definition.extensions)
        if scope is False:
            return None
        field_type, non_null = field_def.type, is_non_null_type(field_def.type)
        denied = scope is not None and not self._caller_has(scope)
        base = FieldPlan(key, definition.python_name, non_null=non_null, denied=denied, scope=scope,
                         details=details, field_type=field_type)  # fmt: skip
        return self._shape(base, get_nullable_type(field_type), details)

    def _shape(self, base: FieldPlan, inner: Any, details: FieldDetailsList) -> FieldPlan | None:
        if is_leaf_type(inner):
            return _replace(base, serialize=inner.serialize)
        if is_object_type(inner):
            nested = self._object_plan(inner, details)
            return _replace(base, nested=nested) if nested is not None else None
        if is_list_type(inner) and is_non_null_type(inner.of_type) and is_leaf_type(inner.of_type.of_type):
            return _replace(base, serialize=inner.of_type.of_type.serialize, leaf_list=True)
        if is_list_type(inner) and is_non_null_type(inner.of_type) and is_object_type(inner.of_type.of_type):
            nested = self._object_plan(inner.of_type.of_type, details)  # e.g. ReliabilityBucket.latency
            return _replace(base, nested=nested, object_list=True) if nested is not None else None
        return None

    def _caller_has(self, scope: Any) -> bool:
        caller = getattr(self.context_value, "caller", None)
        return caller is not None and bool(caller.has_scope(scope))

    def _project_list(self, plan: ObjectPlan, items: list[Any], path: Path) -> list[Any]:
        for field in plan.fields:
            if field.denied:
                if field.non_null:
                    raise _Fallback  # the ordinary executor propagates the null
                self._forbidden_once(field, path.add_key(0, None))
        project = _compiled(plan)
        try:
            return [project(item) for item in items]
        except _Fallback:
            raise
        except Exception as exc:  # a serializer refused a value: let graphql-core report it
            raise _Fallback from exc

    def _forbidden_once(self, field: FieldPlan, item_path: Path) -> None:
        assert field.details is not None and field.field_type is not None
        error = GraphQLError(f"requires scope {field.scope}", extensions={"code": ErrorCode.FORBIDDEN.value})
        self.handle_field_error(error, field.field_type, field.details, item_path.add_key(field.key, None))


_executing: ContextVar[FastExecutionContext | None] = ContextVar("fast_execution", default=None)


def list_plan(info: GraphQLResolveInfo[Any], field_name: str) -> ObjectPlan | None:
    """:meth:`FastExecutionContext.list_plan` of the operation being executed (None outside one)."""
    execution = _executing.get()
    return execution.list_plan(info, field_name) if execution is not None else None


def _required_scope(extensions: list[Any]) -> Any:
    """The scope of a ``@requires`` field, None for none, False for other extensions."""
    scope = None
    for extension in extensions:
        if not isinstance(extension, PermissionExtension) or extension.fail_silently:
            return False
        for permission in extension.permissions:
            if not isinstance(permission, RequireScope):
                return False
            scope = permission.scope
    return scope


def _raise_fallback() -> None:
    raise _Fallback


def _replace(plan: FieldPlan, **changes: Any) -> FieldPlan:
    return FieldPlan(**{**plan.__dict__, **changes})


_compiled_cache: dict[tuple[object, ...], Callable[[Any], dict[str, Any]]] = {}
_compile_lock = threading.Lock()


def _compiled(plan: ObjectPlan) -> Callable[[Any], dict[str, Any]]:
    signature = plan.signature
    function = _compiled_cache.get(signature)
    if function is None:
        function = _compile(plan)
        with _compile_lock:
            if len(_compiled_cache) >= MAX_COMPILED:
                _compiled_cache.clear()
            _compiled_cache[signature] = function
    return function


def _compile(plan: ObjectPlan) -> Callable[[Any], dict[str, Any]]:
    """Generate ``project(item) -> dict`` for ``plan`` (nested objects get their own)."""
    namespace: dict[str, Any] = {"_Fallback": _Fallback, "_datetime": dt.datetime, "_UTC": dt.UTC}
    lines = ["def project(item):"]
    entries = []
    for index, field in enumerate(plan.fields):
        value = f"v{index}"
        entries.append(f"{field.key!r}: {value}")
        if field.attribute is None:
            lines.append(f"    {value} = {field.typename!r}")
        elif field.denied:
            lines.append(f"    {value} = None")
        else:
            lines.extend(_field_lines(field, value, namespace, index))
    lines.append("    return {" + ", ".join(entries) + "}")
    exec("\n".join(lines), namespace)  # noqa: S102 - source built above from field names only
    return namespace["project"]  # type: ignore[no-any-return]


def _field_lines(field: FieldPlan, value: str, namespace: dict[str, Any], index: int) -> list[str]:
    raw = f"item.{field.attribute}"
    if field.serialize is not None and not field.leaf_list:
        namespace[f"s{index}"] = field.serialize
        convert = f"s{index}({value})"
    elif field.leaf_list:  # [Leaf!]: a null item is the ordinary executor's to report
        namespace[f"s{index}"] = field.serialize
        convert = f"[s{index}(x) if x is not None else _fallback() for x in {value}]"
        namespace["_fallback"] = _raise_fallback
    elif field.object_list:  # [Object!]: likewise
        assert field.nested is not None
        namespace[f"p{index}"] = _compiled(field.nested)
        convert = f"[p{index}(x) if x is not None else _fallback() for x in {value}]"
        namespace["_fallback"] = _raise_fallback
    else:
        assert field.nested is not None
        namespace[f"p{index}"] = _compiled(field.nested)
        convert = f"p{index}({value})"
    missing = "raise _Fallback" if field.non_null else f"{value} = None"
    unchanged = UNCHANGED_WHEN.get(field.serialize) if not field.leaf_list else None  # type: ignore[arg-type]
    if unchanged is not None:  # the common case costs a type check, not a call
        return [
            f"    {value} = {raw}",
            f"    if not ({unchanged.format(v=value)}):",
            f"        if {value} is None:",
            f"            {missing}",
            "        else:",
            f"            {value} = {convert}",
        ]
    return [
        f"    {value} = {raw}",
        f"    if {value} is None:",
        f"        {missing}",
        "    else:",
        f"        {value} = {convert}",
    ]
