"""The reliability series as JSON text, written from the report's columns (``reliability.report.Series``).

The executor would project every bucket into a dict and orjson would encode it (schema/execution.py): for a 30-day
HOUR series per model, thousands of dicts and nested percentile lists. Here each selected field becomes a column of
JSON fragments in one pass, mostly in C (orjson encodes a whole column of floats or datetimes and the text is
split), and one ``%`` template per selection joins a bucket's fragments. When every bucket has its percentiles,
their list is part of the template too (a column per percentile); otherwise each bucket's list is written on its
own. The text is what the projector and orjson would write for the same
selection (same keys in the same order, ``OPT_UTC_Z`` datetimes, orjson's floats); the executor splices it in
(``RenderedList``) and reports denied fields as it would for projected items. A selection this module cannot
write exactly (a field it does not know, a non-null denied field, a value that is not finite) answers None, and
the resolver hands the executor the buckets instead.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence

import orjson

from reliability.report import Series
from schema.execution import FieldPlan, ObjectPlan, RenderedList
from schema.json import OPTIONS

Column = list[str]
Piece = tuple[str, list[Column]]  # a template fragment (JSON text, ``%`` escaped) with a column per ``%s`` in it


def render_series(
    plan: ObjectPlan, series: Series, error_rates: Sequence[float], percentiles: Sequence[float]
) -> RenderedList | None:
    """``series`` as the JSON text of ``plan`` (a ``[ReliabilityBucket]`` selection), or None (see the module)."""
    if plan.type_name != "ReliabilityBucket" or not len(series):
        return None
    columns: dict[str, Callable[[FieldPlan], Piece | None]] = {
        "start": lambda f: _one(f, lambda: _datetimes(series.starts)),
        "end": lambda f: _one(f, lambda: _datetimes(series.ends)),
        "model": lambda f: _one(f, lambda: _strings(series.models)),
        "requests": lambda f: _one(f, lambda: _integers(series.requests)),
        "errors": lambda f: _one(f, lambda: _integers(series.errors)),
        "client_errors": lambda f: _one(f, lambda: _integers(series.client_errors)),
        "error_rate": lambda f: _one(f, lambda: _floats(error_rates)),
        "latency": lambda f: _latency(f, percentiles, series.latency),
    }
    piece = _object(plan, columns)
    if piece is None:
        return None
    template, values = piece
    if not values:
        return RenderedList(",".join([template.replace("%%", "%")] * len(series)), plan.signature)
    return RenderedList(",".join([template % row for row in zip(*values, strict=True)]), plan.signature)


def _object(plan: ObjectPlan, columns: dict[str, Callable[[FieldPlan], Piece | None]]) -> Piece | None:
    """One item's JSON object for ``plan`` as a piece: constants written in, each selected column's piece in its
    place. None when a field cannot be written exactly."""
    parts: list[str] = []
    values: list[Column] = []
    for field in plan.fields:
        key = _escaped(orjson.dumps(field.key).decode())
        if field.attribute is None:  # __typename
            parts.append(f"{key}:" + _escaped(orjson.dumps(field.typename).decode()))
            continue
        if field.denied:  # null, with the executor's FORBIDDEN error; a non-null one nulls the whole item
            if field.non_null:
                return None
            parts.append(f"{key}:null")
            continue
        make = columns.get(field.attribute)
        piece = make(field) if make is not None else None
        if piece is None:
            return None
        parts.append(f"{key}:{piece[0]}")
        values += piece[1]
    return "{" + ",".join(parts) + "}", values


def _escaped(text: str) -> str:
    return text.replace("%", "%%")


def _one(field: FieldPlan, make: Callable[[], Column | None]) -> Piece | None:
    """A scalar field's column: one ``%s``."""
    column = make() if _plain(field) else None
    return None if column is None else ("%s", [column])


def _datetimes(values: Sequence[dt.datetime]) -> Column:
    """Each as orjson writes the DateTime scalar's value (the instant in UTC, with "Z"); distinct ones once."""
    distinct = list(dict.fromkeys(values))
    utc = [v if v.tzinfo is dt.UTC else v.astimezone(dt.UTC) for v in distinct]  # schema.scalars.serialize_datetime
    text = dict(zip(distinct, orjson.dumps(utc, option=OPTIONS).decode()[1:-1].split(","), strict=True))
    return [text[v] for v in values]


def _strings(values: Sequence[str | None]) -> Column:
    text = {v: orjson.dumps(v).decode() for v in set(values)}
    return [text[v] for v in values]


def _integers(values: Sequence[int]) -> Column:
    return list(map(str, values))


def _floats(values: Sequence[float]) -> Column | None:
    """orjson's text of each float; None if one is not finite (the Float scalar refuses it: the executor's case)."""
    if not values:
        return []
    text = orjson.dumps(list(values)).decode()[1:-1].split(",")
    return None if "null" in text else text


def _latency(field: FieldPlan, percentiles: Sequence[float], lists: Sequence[list[float]]) -> Piece | None:
    """The buckets' ``[LatencyPercentile!]``: each bucket's values paired with the requested percentiles in order
    (as ``resolvers.reliability`` pairs them). The list of n values is a template with a ``%s`` per selected
    ``ms`` of each item: when every bucket has n values, it is the whole column's piece (a column of the j-th
    values for each ``%s`` of item j); else each bucket's list is written with its size's template."""
    plan = field.nested
    if plan is None or not field.object_list or plan.type_name != "LatencyPercentile":
        return None
    texts = _floats([value for values in lists for value in values])
    sizes = {len(values) for values in lists}
    if texts is None or max(sizes) > len(percentiles):
        return None
    templates: dict[int, tuple[str, list[int]]] = {}
    for size in sizes:
        made = _latency_list(plan, percentiles[:size])
        if made is None:
            return None
        templates[size] = made
    if len(sizes) == 1:  # every bucket has n values
        [(size, (text, value_of))] = templates.items()
        return text, [texts[j::size] for j in value_of]
    out: Column = []  # each bucket's list, its template filled (a value for the ``%s`` of the bucket's piece)
    at = 0
    for values in lists:
        text, value_of = templates[len(values)]
        out.append(text % tuple(texts[at + j] for j in value_of))
        at += len(values)
    return "%s", [out]


_VALUE: Column = []  # marks an ``ms`` in a LatencyPercentile item's piece


def _latency_list(plan: ObjectPlan, percentiles: Sequence[float]) -> tuple[str, list[int]] | None:
    """The template of a list of ``len(percentiles)`` LatencyPercentile items, and for each of its ``%s`` the
    index of the value it stands for (an item may select ``ms`` under several keys, or not at all)."""
    items: list[str] = []
    value_of: list[int] = []
    for j, percentile in enumerate(percentiles):
        piece = _object(plan, {"percentile": _constant(percentile),
                               "ms": lambda f: ("%s", [_VALUE]) if _plain(f) else None})  # fmt: skip
        if piece is None:
            return None
        items.append(piece[0])
        value_of += [j] * len(piece[1])
    return "[" + ",".join(items) + "]", value_of


def _constant(value: float) -> Callable[[FieldPlan], Piece | None]:
    text = _floats([value])
    return lambda field: (_escaped(text[0]), []) if text is not None and _plain(field) else None


def _plain(field: FieldPlan) -> bool:
    """A scalar field, as a column writes it (not a list, no nested selection)."""
    return field.nested is None and not field.leaf_list and not field.object_list
