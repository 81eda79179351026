"""Checks of arguments shared by the analytics resolvers (BAD_USER_INPUT on failure)."""

from __future__ import annotations

import datetime as dt
import zoneinfo

from gateway.errors import BadUserInput

MAX_RANGE = {
    "MINUTE": dt.timedelta(hours=24),
    "HOUR": dt.timedelta(days=93),
    "DAY": dt.timedelta(days=400),
    "MONTH": dt.timedelta(days=1830),
}
MAX_SPEND_RANGE = dt.timedelta(days=400)


def check_range(start: dt.datetime, end: dt.datetime, limit: dt.timedelta, what: str) -> None:
    if start >= end:
        raise BadUserInput("range.from must be before range.to")
    if end - start > limit:
        raise BadUserInput(f"range is {_span(end - start)}; {what} allows at most {_span(limit)}")


def check_time_zone(name: str) -> zoneinfo.ZoneInfo:
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise BadUserInput(f"timeZone {name!r} is not an IANA time zone (e.g. Europe/Berlin)") from None


def check_page_size(first: int, maximum: int) -> None:
    if not 1 <= first <= maximum:
        raise BadUserInput(f"first must be between 1 and {maximum}")


def _span(delta: dt.timedelta) -> str:
    hours = delta.total_seconds() / 3600
    return f"{hours:g} hours" if hours <= 48 else f"{hours / 24:g} days"
