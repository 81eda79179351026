"""Schemathesis hooks for the GraphQL fuzz run (``SCHEMATHESIS_HOOKS=tests.fuzz.hooks``).

Teaches it the gateway's scalars, valid values and hostile ones alike, and adds the check that matters most
here: no answer is ``INTERNAL`` (a client's input must never look like a bug of ours).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import schemathesis
from hypothesis import strategies as st
from schemathesis.graphql import nodes

HOSTILE_TEXT = st.sampled_from(
    ["", "\x00", "x\x00", "\ud800", "9" * 400, "1e999999", "-1e999999", "NaN", "Infinity", "0001-01-01T00:00:00Z"]
)
DATETIMES = st.datetimes(
    min_value=dt.datetime(1, 1, 1), max_value=dt.datetime(9999, 12, 31), timezones=st.sampled_from([dt.UTC])
).map(lambda value: value.isoformat())
DECIMALS = st.decimals(allow_nan=False, allow_infinity=False, places=None).map(lambda value: format(value, "f"))

schemathesis.graphql.scalar("DateTime", st.one_of(DATETIMES, HOSTILE_TEXT).map(nodes.String))
schemathesis.graphql.scalar("Decimal", st.one_of(DECIMALS, HOSTILE_TEXT).map(nodes.String))
schemathesis.graphql.scalar("BigInt", st.integers(min_value=-(2**70), max_value=2**70).map(nodes.Int))


@schemathesis.check
def no_internal_error(ctx: Any, response: Any, case: Any) -> bool | None:
    """Every GraphQL error names a client's mistake or a refusal, never INTERNAL."""
    try:
        body = response.json()
    except ValueError:
        raise AssertionError(f"not JSON (status {response.status_code}): {response.text[:200]!r}") from None
    errors = body.get("errors") if isinstance(body, dict) else None
    for error in errors or ():
        code = (error.get("extensions") or {}).get("code")
        if code is None or code == "INTERNAL":
            raise AssertionError(f"error without a client code: {error}")
    return None
