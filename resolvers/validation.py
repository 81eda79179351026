"""Checks of arguments shared by the resolvers (BAD_USER_INPUT on failure), in one place.

Every value that reaches the database or a cache key is checked here first, to exactly what can be stored
and looked up: ids and models by the event schema's patterns (so no NUL, no newline, at most 128
characters), ranges inside what Python's datetime can bucket in any time zone, bounded lists. A refusal
names the argument and the rule, and quotes at most a short prefix of the value.
"""

from __future__ import annotations

import datetime as dt
import re
import zoneinfo
from collections.abc import Sequence

from ingest.events import ID_PATTERN, MODEL_PATTERN
from kernel.auth import Caller, ensure_org_access
from kernel.errors import BadUserInput
from kernel.hours import EARLIEST, LATEST

MAX_SPEND_RANGE = dt.timedelta(days=400)
MAX_FILTER_VALUES = 100
_ZONE_NAME = re.compile(r"[A-Za-z0-9_+\-/]{1,64}")
_QUOTED = 40  # characters of a refused value quoted in the message


def check_id(value: str, name: str) -> str:
    """An org, project or API key id: the event schema's id rule (what ingestion stores)."""
    if not re.fullmatch(ID_PATTERN, value):
        raise BadUserInput(f"{name} {quote(value)} does not match {ID_PATTERN}")
    return value


def check_model(value: str, name: str) -> str:
    """A model name: the event schema's model rule."""
    if not re.fullmatch(MODEL_PATTERN, value):
        raise BadUserInput(f"{name} {quote(value)} does not match {MODEL_PATTERN}")
    return value


def check_ids(values: Sequence[str] | None, name: str, *, model: bool = False) -> list[str] | None:
    """A filter list: at most MAX_FILTER_VALUES values, each checked like an id (or a model)."""
    if values is None:
        return None
    if len(values) > MAX_FILTER_VALUES:
        raise BadUserInput(f"{name} has {len(values)} values; at most {MAX_FILTER_VALUES}")
    check = check_model if model else check_id
    return [check(value, f"{name}[{index}]") for index, value in enumerate(values)]


def org_argument(caller: Caller, org_id: str, name: str = "orgId") -> str:
    """The tenancy check of an org argument: a well-formed id, then one the caller may see (FORBIDDEN)."""
    check_id(org_id, name)
    ensure_org_access(caller, org_id)
    return org_id


def check_range(start: dt.datetime, end: dt.datetime, limit: dt.timedelta, what: str) -> None:
    if not (start >= EARLIEST and end <= LATEST):
        raise BadUserInput(
            f"range must lie between {EARLIEST.date().isoformat()} and {LATEST.date().isoformat()} (UTC)"
        )
    if start >= end:
        raise BadUserInput("range.from must be before range.to")
    if end - start > limit:
        raise BadUserInput(f"range is {_span(end - start)}; {what} allows at most {_span(limit)}")


def check_time_zone(name: str) -> zoneinfo.ZoneInfo:
    # The shape first: ZoneInfo opens a file named by the key (a long name: OSError, not a clean refusal).
    if _ZONE_NAME.fullmatch(name):
        try:
            return zoneinfo.ZoneInfo(name)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
            pass
    raise BadUserInput(f"timeZone {quote(name)} is not an IANA time zone (e.g. Europe/Berlin)")


def check_page_size(first: int, maximum: int) -> None:
    if not 1 <= first <= maximum:
        raise BadUserInput(f"first must be between 1 and {maximum}")


def quote(value: str) -> str:
    """``value`` for an error message: repr (so NUL and newlines show), at most _QUOTED characters of it."""
    if len(value) <= _QUOTED:
        return repr(value)
    return f"{value[:_QUOTED]!r}... ({len(value)} characters)"


def _span(delta: dt.timedelta) -> str:
    hours = delta.total_seconds() / 3600
    return f"{hours:g} hours" if hours <= 48 else f"{hours / 24:g} days"
