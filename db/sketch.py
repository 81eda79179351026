"""A mergeable latency sketch: counts per logarithmic bucket (DDSketch-style).

A value v > 0 falls in bucket ``ceil(log_gamma(v))`` with
``gamma = (1 + a) / (1 - a)``; reporting a bucket by ``2 gamma^i / (gamma + 1)``
is within relative error ``a`` (1 %) of every value in it. Sketches merge by
adding counts, so percentiles over any range come from the hourly rollups.
"""

from __future__ import annotations

import math

RELATIVE_ACCURACY = 0.01
GAMMA = (1 + RELATIVE_ACCURACY) / (1 - RELATIVE_ACCURACY)
LN_GAMMA = math.log(GAMMA)
MIN_VALUE_MS = 0.001
ZERO_INDEX = -32768  # values under MIN_VALUE_MS

# A packed sketch (what the API reads: ``reliability_hourly_model.latency_sketch_packed``, migration 0008): entries
# of a 4-byte bucket index and an 8-byte count, big-endian, as ``int4send(index) || int8send(count)`` makes them;
# stored ones ascend by index, query-time ones (``packed_agg_sql``) come in any order.
PACKED_ENTRY_BYTES = 12

# The percentiles whose bucket indexes every hourly rollup row stores (``reliability_hourly_model.latency_ranks``,
# migration 0012, in this order): an HOUR bucket asking only for these reads no sketch.
RANKED_PERCENTILES = (0.5, 0.75, 0.9, 0.95, 0.99, 0.999)

# How a row's ranks travel to the API: PostgreSQL's binary array (``array_send``), so that the client reads a column
# of them with numpy as one block instead of decoding a Python list of ints per row (the int[] of a 30-day HOUR
# series per model cost the gateway 0.7 ms to decode and 0.8 ms to flatten). The layout of a one-dimensional int4[]
# without nulls: five big-endian int32 header words (dimensions 1, has-nulls 0, element type INT4_OID, length,
# lower bound 1), then a (length 4, value) pair of big-endian int32 per element.
INT4_OID = 23
RANKS_HEADER_WORDS = 5


def ranks_wire_sql(column: str) -> str:
    """``column`` (an int4[] of ranks) as the API reads it: its binary array (see above)."""
    return f"array_send({column})"


def index_sql(column: str) -> str:
    """The bucket index of ``column`` as a SQL expression: ``ceil(ln(v) / ln(GAMMA))``, or ZERO_INDEX below
    MIN_VALUE_MS (the value of bucket i is ``2 * GAMMA**i / (GAMMA + 1)``, within RELATIVE_ACCURACY of every value
    in it)."""
    return f"(CASE WHEN {column} < {MIN_VALUE_MS} THEN {ZERO_INDEX} ELSE ceil(ln({column}) / {LN_GAMMA!r})::int END)"


def packed_agg_sql(index: str, count: str, *, ordered: bool = False) -> str:
    """An aggregate that packs (index, count) rows into one packed sketch (PACKED_ENTRY_BYTES a row). Its entries
    come in no particular order (no sort per group at query time: readers sort, reliability/sketch.py) unless
    ``ordered`` (stored sketches, ascending by index as ``sketch_pack`` makes them)."""
    order = f" ORDER BY {index}" if ordered else ""
    return f"string_agg(int4send({index}) || int8send({count}), ''::bytea{order})"
