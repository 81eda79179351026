"""The reliability series as JSON text, written from the report's columns (``reliability.report.Series``).

The executor would project every bucket into a dict and orjson would encode it (schema/execution.py): for a 30-day
HOUR series per model, thousands of dicts and nested percentile lists. Here each selected field becomes a column of
JSON fragments in one pass, mostly in C, from the series' arrays (no Python value a bucket: orjson encodes a whole
column of numbers, or the distinct bucket bounds and percentile values once each, and the text is split; a bucket's
text is picked by its index), and a selection is a *piece*: its constant texts with a column between each two. The
items are the pieces' texts and columns interleaved and joined once (C loops: no per-item formatting). When every
bucket has its percentiles, their list is part of the piece too (a column per percentile); otherwise each bucket's
list is written on its own. The text is what the projector and orjson would write for the same selection (same keys
in the same order, ``OPT_UTC_Z`` datetimes, orjson's floats and integers); the executor splices it in
(``RenderedList``) and reports denied fields as it would for projected items. A selection this module cannot write
exactly (a field it does not know, a non-null denied field, a value that is not finite) answers None, and the
resolver hands the executor the buckets instead.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import itertools
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import orjson

from reliability.report import Floats, Ints, Series
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
    bounds: list[str] = []  # each bucket bound's text, written once for both columns (an end is the next's start)

    def instants(at: Ints) -> Column:
        if not bounds:
            bounds.extend(_datetimes(series.bounds))
        return list(map(bounds.__getitem__, at.tolist()))

    columns: dict[str, Callable[[FieldPlan], Piece | None]] = {
        "start": lambda f: _one(f, lambda: instants(series.start_at)),
        "end": lambda f: _one(f, lambda: instants(series.end_at)),
        "model": lambda f: _one(f, lambda: _coded(series.names, series.model_at)),
        "requests": lambda f: _one(f, lambda: _integers(series.request_counts)),
        "errors": lambda f: _one(f, lambda: _integers(series.error_counts)),
        "client_errors": lambda f: _one(f, lambda: _integers(series.client_error_counts)),
        "error_rate": lambda f: _one(f, lambda: _floats(series.error_rate_values.tolist())),
        "latency": lambda f: _latency(f, percentiles, series.latency_table),
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


def _datetimes(values: Sequence[dt.datetime]) -> Column:
    """Each as orjson writes the DateTime scalar's value (the instant in UTC, with "Z")."""
    utc = values  # schema.scalars.serialize_datetime
    if not all(map(operator.is_, map(_TZINFO, values), itertools.repeat(dt.UTC))):
        utc = [v if v.tzinfo is dt.UTC else v.astimezone(dt.UTC) for v in values]
    return _split(orjson.dumps(utc if isinstance(utc, list) else list(utc), option=OPTIONS))


def _coded(names: Sequence[str | None], codes: Ints) -> Column:
    """``names[code]`` of each code, as JSON strings (each name written once)."""
    texts = [orjson.dumps(name).decode() for name in names]
    return list(map(texts.__getitem__, codes.tolist()))


def _integers(values: Ints) -> Column:
    return _split(orjson.dumps(values.tolist()))


def _floats(values: list[float]) -> Column | None:
    """orjson's text of each float; None if one is not finite (the Float scalar refuses it: the executor's case)."""
    text = orjson.dumps(values)
    return None if b"null" in text else _split(text)


def _repeated_floats(values: Floats) -> npt.NDArray[np.object_] | None:
    """:func:`_floats` of an array whose values mostly recur (a sketch reports one of a few hundred), in its shape:
    distinct values are written once (found by numpy's unique, where -0.0 equals 0.0: an array with a -0.0, which
    is written "-0.0", is written value by value)."""
    flat = values.ravel()
    zero = flat == 0
    if zero.any() and np.signbit(flat[zero]).any():
        texts = _floats(flat.tolist())
        return None if texts is None else np.array(texts, dtype=object).reshape(values.shape)
    if not len(flat):
        return np.empty(values.shape, dtype=object)
    distinct, inverse = np.unique(flat, return_inverse=True)
    written = _floats(distinct.tolist())
    return None if written is None else np.array(written, dtype=object)[inverse].reshape(values.shape)


def _split(array: bytes) -> Column:
    """The items of a JSON array of numbers or strings without commas (as orjson writes datetimes)."""
    return array.decode()[1:-1].split(",") if len(array) > 2 else []


def _latency(field: FieldPlan, percentiles: Sequence[float], table: Floats) -> Piece | None:
    """The buckets' ``[LatencyPercentile!]``: each bucket's row of ``table`` (a row of NaN: an empty list) paired with
    the requested percentiles in order (as ``resolvers.reliability`` pairs them). A list of n values is a piece with
    a hole per selected ``ms`` of each item: when every bucket has its values, it is the whole column's piece (a
    column of the j-th values for each hole of item j); else each bucket's list is written on its own, as one
    column."""
    plan = field.nested
    if plan is None or not field.object_list or plan.type_name != "LatencyPercentile":
        return None
    count, width = table.shape
    made = _latency_list(plan, percentiles[:width]) if width <= len(percentiles) else None
    if made is None:
        return None
    piece, value_of = made
    present = ~np.isnan(table[:, 0]) if width else np.zeros(count, dtype=bool)
    texts = _repeated_floats(table[present])
    if texts is None:
        return None
    if present.all():
        return Piece(piece.texts, [texts[:, j].tolist() for j in value_of])
    out: Column = ["[]"] * count  # a bucket without latencies: no items
    for at, values in zip(np.flatnonzero(present).tolist(), texts.tolist(), strict=True):
        out[at] = piece.filled([values[j] for j in value_of])
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
