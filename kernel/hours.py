"""Whole UTC hours: the grain of rollups, of price versions and of the rollup watermark."""

from __future__ import annotations

import datetime as dt

HOUR = dt.timedelta(hours=1)
# The instants the API accepts: a year inside datetime's own limits (years 1 and 9999), so that bucket starts and
# ends computed in any time zone (up to a day away) and rounded to a month stay representable.
EARLIEST = dt.datetime(2, 1, 1, tzinfo=dt.UTC)
LATEST = dt.datetime(9999, 1, 1, tzinfo=dt.UTC)


def floor_hour(moment: dt.datetime) -> dt.datetime:
    """The start of the UTC hour holding ``moment`` (an aware datetime)."""
    return moment.astimezone(dt.UTC).replace(minute=0, second=0, microsecond=0)


def is_whole_hour(moment: dt.datetime) -> bool:
    return floor_hour(moment) == moment
