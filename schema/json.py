"""The one JSON encoder of GraphQL responses (HTTP and WebSocket)."""

from __future__ import annotations

import orjson

# DateTime values reach the encoder as UTC datetimes (schema/scalars.py): orjson writes them in
# RFC 3339 with "Z", far faster than formatting each in Python.
OPTIONS = orjson.OPT_UTC_Z


def dumps(data: object) -> bytes:
    return orjson.dumps(data, option=OPTIONS)
