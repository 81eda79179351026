"""The reliability series as JSON text, written from the report's columns (``reliability.report.Series``).

The executor would project every bucket into a dict and orjson would encode it (schema/execution.py): for a 30-day
HOUR series per model, thousands of dicts and nested percentile lists. Here each selected field becomes a column of
JSON fragments in one pass, mostly in C (orjson encodes a whole column of floats or datetimes and the text is
split; a bucket's percentile list is written once per distinct list of values), and one ``%`` template per
selection joins a bucket's fragments. The text is what the projector and orjson would write for the same
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
from schema.execution import ObjectPlan, RenderedList
from schema.json import OPTIONS

Column = list[str]


def render_series(
    plan: ObjectPlan, series: Series, error_rates: Sequence[float], percentiles: Sequence[float]
) -> RenderedList | None:
    """``series`` as the JSON text of ``plan`` (a ``[ReliabilityBucket]`` selection), or None (see the module)."""
    if plan.type_name != "ReliabilityBucket" or not len(series):
        return None
    columns: dict[str, Callable[[ObjectPlan | None], Column | None]] = {
        "start": lambda _: _datetimes(series.starts),
        "end": lambda _: _datetimes(series.ends),
        "model": lambda _: _strings(series.models),
        "requests": lambda _: _integers(series.requests),
        "errors": lambda _: _integers(series.errors),
        "client_errors": lambda _: _integers(series.client_errors),
        "error_rate": lambda _: _floats(error_rates),
        "latency": lambda nested: _latency(nested, percentiles, series.latency) if nested else None,
    }
    objects = _objects(plan, columns, len(series), nested={"latency"})
    return None if objects is None else RenderedList(",".join(objects), plan.signature)


def _objects(
    plan: ObjectPlan, columns: dict[str, Callable[[ObjectPlan | None], Column | None]], count: int, nested: set[str]
) -> list[str] | None:
    """Each of ``count`` items as its JSON object for ``plan``: a ``%`` template filled from the selected
    columns (``nested``: attributes that are lists of objects, rendered by their column for the nested plan)."""
    parts: list[str] = []
    values: list[Column] = []
    for field in plan.fields:
        key = orjson.dumps(field.key).decode().replace("%", "%%")
        if field.attribute is None:  # __typename
            parts.append(f"{key}:" + orjson.dumps(field.typename).decode().replace("%", "%%"))
            continue
        if field.denied:  # null, with the executor's FORBIDDEN error; a non-null one nulls the whole item
            if field.non_null:
                return None
            parts.append(f"{key}:null")
            continue
        plain = field.nested is None and not field.leaf_list and not field.object_list
        listed = field.attribute in nested and field.object_list and field.nested is not None
        make = columns.get(field.attribute)
        column = make(field.nested) if make is not None and (plain or listed) else None
        if column is None:
            return None
        parts.append(f"{key}:%s")
        values.append(column)
    template = "{" + ",".join(parts) + "}"
    if not values:
        return [template.replace("%%", "%")] * count
    return [template % row for row in zip(*values, strict=True)]


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


def _latency(plan: ObjectPlan, percentiles: Sequence[float], lists: Sequence[list[float]]) -> Column | None:
    """Each bucket's ``[LatencyPercentile!]``: its values paired with the requested percentiles in order (as
    ``resolvers.reliability`` pairs them). A list of n values is one ``str.format`` template of n items (the
    percentiles and typenames written in, ``{j}`` for value j), filled from one orjson pass over all values."""
    if plan.type_name != "LatencyPercentile":
        return None
    texts = _floats([value for values in lists for value in values])
    if texts is None:
        return None
    templates: dict[int, Callable[..., str]] = {}
    for size in {len(values) for values in lists}:
        template = _latency_template(plan, percentiles[:size]) if size <= len(percentiles) else None
        if template is None:
            return None
        templates[size] = template.format
    if len(templates) == 1:  # every list of one size (all buckets have latencies): no slicing
        [(size, fill)] = templates.items()
        rows = iter(texts)
        return [fill(*row) for row in zip(*[rows] * size, strict=True)] if size else [fill()] * len(lists)
    out: Column = []
    at = 0
    for values in lists:
        size = len(values)
        out.append(templates[size](*texts[at : at + size]))
        at += size
    return out


def _latency_template(plan: ObjectPlan, percentiles: Sequence[float]) -> str | None:
    """The ``str.format`` template of a list of ``len(percentiles)`` LatencyPercentile items, or None."""
    items = []
    for j, percentile in enumerate(percentiles):
        parts = []
        for field in plan.fields:
            key = orjson.dumps(field.key).decode()
            if field.attribute is None:
                parts.append(f"{key}:" + orjson.dumps(field.typename).decode())
            elif field.denied:
                if field.non_null:
                    return None
                parts.append(f"{key}:null")
            elif field.attribute == "percentile" and field.nested is None and not field.leaf_list:
                text = _floats([percentile])
                if text is None:
                    return None
                parts.append(f"{key}:{text[0]}")
            elif field.attribute == "ms" and field.nested is None and not field.leaf_list:
                parts.append(f"{key}:\0{j}\0")
            else:
                return None
        items.append("{" + ",".join(parts) + "}")
    return _placeholders(("[" + ",".join(items) + "]").replace("{", "{{").replace("}", "}}"))


def _placeholders(text: str) -> str:
    """``\0j\0`` marks (value j) as ``{j}`` in an already brace-escaped template."""
    pieces = text.split("\0")
    return "".join(piece if i % 2 == 0 else "{" + piece + "}" for i, piece in enumerate(pieces))
