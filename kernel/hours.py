"""Whole UTC hours: the grain of rollups, of price versions and of the rollup watermark."""

from __future__ import annotations

import datetime as dt

HOUR = dt.timedelta(hours=1)


def floor_hour(moment: dt.datetime) -> dt.datetime:
    """The start of the UTC hour holding ``moment`` (an aware datetime)."""
    return moment.astimezone(dt.UTC).replace(minute=0, second=0, microsecond=0)


def is_whole_hour(moment: dt.datetime) -> bool:
    return floor_hour(moment) == moment
