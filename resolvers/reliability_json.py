"""The reliability series as JSON text, written from the report's columns (``reliability.report.Series``).

The executor would project every bucket into a dict and orjson would encode it (schema/execution.py): for a 30-day
HOUR series per model, thousands of dicts and nested percentile lists. Here each selected field becomes a column of
JSON fragments in one pass, mostly in C (orjson encodes a whole column of numbers or datetimes and the text is
split), and a selection is a *piece*: its constant texts with a column between each two. The items are the
pieces' texts and columns interleaved and joined once (C loops: no per-item formatting). When every bucket has its
percentiles, their list is part of the piece too (a column per percentile); otherwise each bucket's list is written
on its own. The text is what the projector and orjson would write for the same selection (same keys in the same
order, ``OPT_UTC_Z`` datetimes, orjson's floats and integers); the executor splices it in (``RenderedList``) and
reports denied fields as it would for projected items. A selection this module cannot write exactly (a field it
does not know, a non-null denied field, a value that is not finite) answers None, and the resolver hands the
executor the buckets instead.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import itertools
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import orjson

from reliability.report import Series
from schema.execution import FieldPlan, ObjectPlan, RenderedList
from schema.json import OPTIONS

Column = list[str]


@dataclass
class Piece:
    """JSON text with holes: ``texts[0] + columns[0][i] + texts[1] + … + columns[-1][i] + texts[-1]`` is item i's."""

    texts: list[str] = dataclasses.field(default_factory=lambda: [""])
    columns: list[Column] = dataclasses.field(default_factory=list)

    def add(self, text: str) -> None:
        self.texts[-1] += text

    def extend(self, other: Piece) -> None:
        self.texts[-1] += other.texts[0]
        self.texts += other.texts[1:]
        self.columns += other.columns

    def joined(self, count: int, separator: str = ",") -> str:
        """``count`` items, separated: the texts (each repeated) and columns interleaved, joined once. The
        fragments are laid out in one list by strided slice assignment (C loops, no tuple per item)."""
        if not count:
            return ""
        first, *texts = self.texts
        stride = 2 * len(self.columns) + 1  # an item's fragments: its first text, then each column and text
        out = [separator + first] * (count * stride)  # the separator before every item but the first
        out[0] = first
        for n, (column, text) in enumerate(zip(self.columns, texts, strict=True)):
            if len(column) != count:
                raise ValueError(f"a column of {len(column)} entries for {count} items")
            out[2 * n + 1 :: stride] = column
            out[2 * n + 2 :: stride] = [text] * count
        return "".join(out)

    def filled(self, values: Sequence[str]) -> str:
        """One item, each column's entry given."""
        return "".join(itertools.chain.from_iterable(zip(self.texts, [*values, ""], strict=True)))


def render_series(plan: ObjectPlan, series: Series, percentiles: Sequence[float]) -> RenderedList | None:
    """``series`` as the JSON text of ``plan`` (a ``[ReliabilityBucket]`` selection), or None (see the module)."""
    if plan.type_name != "ReliabilityBucket" or not len(series):
        return None
    instants: dict[dt.datetime, str] = {}  # written once for both columns (a bucket's end is the next's start)
    columns: dict[str, Callable[[FieldPlan], Piece | None]] = {
        "start": lambda f: _one(f, lambda: _datetimes(series.starts, instants)),
        "end": lambda f: _one(f, lambda: _datetimes(series.ends, instants)),
        "model": lambda f: _one(f, lambda: _strings(series.models)),
        "requests": lambda f: _one(f, lambda: _integers(series.requests)),
        "errors": lambda f: _one(f, lambda: _integers(series.errors)),
        "client_errors": lambda f: _one(f, lambda: _integers(series.client_errors)),
        "error_rate": lambda f: _one(f, lambda: _floats(series.error_rates)),
        "latency": lambda f: _latency(f, percentiles, series.latency),
    }
    piece = _object(plan, columns)
    return None if piece is None else RenderedList(piece.joined(len(series)), plan.signature)


def _object(plan: ObjectPlan, columns: dict[str, Callable[[FieldPlan], Piece | None]]) -> Piece | None:
    """One item's JSON object for ``plan`` as a piece: constants written in, each selected column's piece in its
    place. None when a field cannot be written exactly."""
    piece = Piece(["{"])
    for index, field in enumerate(plan.fields):
        piece.add(("," if index else "") + orjson.dumps(field.key).decode() + ":")
        if field.attribute is None:  # __typename
            piece.add(orjson.dumps(field.typename).decode())
            continue
        if field.denied:  # null, with the executor's FORBIDDEN error; a non-null one nulls the whole item
            if field.non_null:
                return None
            piece.add("null")
            continue
        make = columns.get(field.attribute)
        value = make(field) if make is not None else None
        if value is None:
            return None
        piece.extend(value)
    piece.add("}")
    return piece


def _one(field: FieldPlan, make: Callable[[], Column | None]) -> Piece | None:
    """A scalar field's column: one hole."""
    column = make() if _plain(field) else None
    return None if column is None else Piece(["", ""], [column])


_TZINFO = operator.attrgetter("tzinfo")


def _datetimes(values: Sequence[dt.datetime], written: dict[dt.datetime, str]) -> Column:
    """Each as orjson writes the DateTime scalar's value (the instant in UTC, with "Z"); distinct ones once, and
    only those not in ``written`` (which gets them)."""
    new = [v for v in dict.fromkeys(values) if v not in written]
    utc = new  # schema.scalars.serialize_datetime
    if not all(map(operator.is_, map(_TZINFO, new), itertools.repeat(dt.UTC))):
        utc = [v if v.tzinfo is dt.UTC else v.astimezone(dt.UTC) for v in new]
    written.update(zip(new, _split(orjson.dumps(utc, option=OPTIONS)), strict=True))
    return list(map(written.__getitem__, values))


def _strings(values: Sequence[str | None]) -> Column:
    distinct = list(dict.fromkeys(values))
    text = {v: orjson.dumps(v).decode() for v in distinct}
    return list(map(text.__getitem__, values))


def _integers(values: Sequence[int]) -> Column:
    return _split(orjson.dumps(values if isinstance(values, list) else list(values)))


def _floats(values: Sequence[float], repeated: bool = False) -> Column | None:
    """orjson's text of each float; None if one is not finite (the Float scalar refuses it: the executor's case).
    ``repeated``: most values recur (a sketch reports one of a few hundred), so distinct ones are written once
    (found by numpy's unique, where -0.0 equals 0.0: a list with a -0.0, which is written "-0.0", is written value
    by value)."""
    if repeated and len(values):
        array = np.array(values, dtype=np.float64)
        zero = array == 0
        if not (zero.any() and np.signbit(array[zero]).any()):
            distinct, inverse = np.unique(array, return_inverse=True)
            text = orjson.dumps(distinct.tolist())
            return None if b"null" in text else np.array(_split(text), dtype=object)[inverse].tolist()
    text = orjson.dumps(values if isinstance(values, list) else list(values))
    return None if b"null" in text else _split(text)


def _split(array: bytes) -> Column:
    """The items of a JSON array of numbers or strings without commas (as orjson writes datetimes)."""
    return array.decode()[1:-1].split(",") if len(array) > 2 else []


def _latency(field: FieldPlan, percentiles: Sequence[float], lists: Sequence[list[float]]) -> Piece | None:
    """The buckets' ``[LatencyPercentile!]``: each bucket's values paired with the requested percentiles in order
    (as ``resolvers.reliability`` pairs them). The list of n values is a piece with a hole per selected ``ms`` of
    each item: when every bucket has n values, it is the whole column's piece (a column of the j-th values for each
    hole of item j); else each bucket's list is written with its size's piece, as one column."""
    plan = field.nested
    if plan is None or not field.object_list or plan.type_name != "LatencyPercentile":
        return None
    texts = _floats(list(itertools.chain.from_iterable(lists)), repeated=True)
    sizes = set(map(len, lists))
    if texts is None or max(sizes) > len(percentiles):
        return None
    pieces: dict[int, tuple[Piece, list[int]]] = {}
    for size in sizes:
        made = _latency_list(plan, percentiles[:size])
        if made is None:
            return None
        pieces[size] = made
    if len(sizes) == 1:  # every bucket has n values
        [(size, (piece, value_of))] = pieces.items()
        return Piece(piece.texts, [texts[j::size] for j in value_of])
    out: Column = []  # each bucket's list, written with its size's piece
    at = 0
    for values in lists:
        piece, value_of = pieces[len(values)]
        out.append(piece.filled([texts[at + j] for j in value_of]))
        at += len(values)
    return Piece(["", ""], [out])


_VALUE: Column = []  # marks an ``ms`` in a LatencyPercentile item's piece


def _latency_list(plan: ObjectPlan, percentiles: Sequence[float]) -> tuple[Piece, list[int]] | None:
    """The piece of a list of ``len(percentiles)`` LatencyPercentile items, and for each of its holes the index of
    the value it stands for (an item may select ``ms`` under several keys, or not at all)."""
    whole = Piece(["["])
    value_of: list[int] = []
    for j, percentile in enumerate(percentiles):
        piece = _object(plan, {"percentile": _constant(percentile),
                               "ms": lambda f: Piece(["", ""], [_VALUE]) if _plain(f) else None})  # fmt: skip
        if piece is None:
            return None
        if j:
            whole.add(",")
        whole.extend(piece)
        value_of += [j] * len(piece.columns)
    whole.add("]")
    return whole, value_of


def _constant(value: float) -> Callable[[FieldPlan], Piece | None]:
    text = _floats([value])
    return lambda field: Piece([text[0]]) if text is not None and _plain(field) else None


def _plain(field: FieldPlan) -> bool:
    """A scalar field, as a column writes it (not a list, no nested selection)."""
    return field.nested is None and not field.leaf_list and not field.object_list
