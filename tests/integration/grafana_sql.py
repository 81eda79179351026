"""What Grafana sends to PostgreSQL for a panel's raw SQL, without Grafana.

Two steps, in Grafana's order:

1. template variables (the browser does this): ``$name``, ``${name}``,
   ``${name:format}`` and ``[[name]]``; the built-in ``$__interval`` and
   ``$__interval_ms``. Values are formatted as the SQL data sources format
   them: a multi-value or include-All variable becomes a list of quoted
   literals (``'a','b'``), a single-value one its text with quotes doubled
   and *no* surrounding quotes (so SQL writes ``'$org'``).
2. macros (the data source plugin does this): ``$__time``, ``$__timeEpoch``,
   ``$__timeFilter``, ``$__timeFrom``, ``$__timeTo``, ``$__timeGroup`` and
   ``$__timeGroupAlias``, spelled as ``grafana-postgresql-datasource`` spells
   them. An argument holding parentheses (a function call) is refused: older
   Grafana ends the arguments at the first ``)``, newer ones match brackets
   but still split the arguments at every comma.

Anything left that starts with ``$`` is an error: Grafana would send it to
PostgreSQL as is, and the panel would fail there.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
# Grafana's template variable syntax (public/app/features/templating/template_srv: variableRegex).
VARIABLE = re.compile(r"\$(\w+)|\[\[(\w+?)(?::(\w+))?\]\]|\$\{(\w+)(?:\.([^:^}]+))?(?::([^}]+))?\}")
MACRO = re.compile(r"\$(__\w+)\(")


class UnexpandedError(ValueError):
    """The SQL still holds a ``$`` after expansion, or uses a macro this module does not know."""


@dataclass(frozen=True)
class Variable:
    """A dashboard variable's current value(s); ``multi`` if it is multi-value or includes All."""

    name: str
    values: Sequence[str]
    multi: bool = False


def quote_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def rfc3339(moment: dt.datetime) -> str:
    """Go's RFC3339Nano in UTC, as Grafana formats the range: no trailing zeros, ``Z``."""
    text = moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f").rstrip("0").rstrip(".")
    return text + "Z"


def interval_seconds(spec: str) -> float:
    """``1h``, ``'5m'``, ``30s``: Grafana's interval syntax, in seconds."""
    match = re.fullmatch(r"\s*'?(\d+(?:\.\d+)?)(ms|s|m|h|d|w)'?\s*", spec)
    if match is None:
        raise UnexpandedError(f"not an interval: {spec!r}")
    return float(match.group(1)) * UNITS[match.group(2)]


def _number(value: float) -> str:
    """Go's %v of a float64: 3600 rather than 3600.0."""
    return str(int(value)) if value == int(value) else repr(value)


def _format(variable: Variable, fmt: str | None) -> str:
    values = list(variable.values)
    if fmt in (None, "sqlstring") and (variable.multi or fmt == "sqlstring"):
        return ",".join(quote_literal(v) for v in values)
    if fmt is None:
        return values[0].replace("'", "''") if values else ""
    if fmt in ("raw", "csv"):
        return ",".join(values)
    if fmt == "singlequote":
        return ",".join("'" + v.replace("'", "\\'") + "'" for v in values)
    if fmt == "doublequote":
        return ",".join('"' + v.replace('"', '\\"') + '"' for v in values)
    raise UnexpandedError(f"format {fmt!r} of ${{{variable.name}}} is not supported here")


def interpolate(sql: str, variables: Mapping[str, Variable], interval: str) -> str:
    """Step 1: template variables; unknown names stay (Grafana leaves them, macros look like them)."""
    builtins = {
        "__interval": Variable("__interval", [interval]),
        "__interval_ms": Variable("__interval_ms", [_number(interval_seconds(interval) * 1000)]),
    }

    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2) or match.group(4)
        fmt = match.group(3) or match.group(6)
        if match.group(5):
            raise UnexpandedError(f"field paths are not supported: {match.group(0)}")
        variable = builtins.get(name) or variables.get(name)
        if variable is None:
            return match.group(0)
        return _format(variable, fmt)

    return VARIABLE.sub(replace, sql)


def expand_macros(sql: str, start: dt.datetime, end: dt.datetime) -> str:
    """Step 2: the PostgreSQL data source's macros over the range [start, end]."""
    frm, to = quote_literal(rfc3339(start)), quote_literal(rfc3339(end))

    def group(args: list[str]) -> str:
        if len(args) < 2:
            raise UnexpandedError(f"$__timeGroup needs a column and an interval: {args}")
        seconds = _number(interval_seconds(args[1]))
        return f"floor(extract(epoch from {args[0]})/{seconds})*{seconds}"

    def replace(name: str, args: list[str]) -> str:
        if name == "__time":
            return f'{args[0]} AS "time"'
        if name == "__timeEpoch":
            return f'extract(epoch from {args[0]}) AS "time"'
        if name == "__timeFilter":
            return f"{args[0]} BETWEEN {frm} AND {to}"
        if name == "__timeFrom":
            return frm
        if name == "__timeTo":
            return to
        if name == "__timeGroup":
            return group(args)
        if name == "__timeGroupAlias":
            return group(args) + ' AS "time"'
        raise UnexpandedError(f"macro ${name} is not supported here")

    parts: list[str] = []
    position = 0
    while (match := MACRO.search(sql, position)) is not None:
        close = sql.find(")", match.end())
        inside = sql[match.end() : close]
        if close < 0 or "(" in inside:
            raise UnexpandedError(f"arguments of ${match.group(1)} must be plain: {sql[match.start() : close + 1]}")
        args = [a.strip() for a in inside.split(",")] if inside.strip() else []
        parts += [sql[position : match.start()], replace(match.group(1), args)]
        position = close + 1
    return "".join([*parts, sql[position:]])


def expand(
    sql: str,
    *,
    start: dt.datetime,
    end: dt.datetime,
    variables: Mapping[str, Variable],
    interval: str = "1h",
) -> str:
    """The SQL Grafana would run for this range, variables and interval; raises if a ``$`` is left."""
    expanded = expand_macros(interpolate(sql, variables, interval), start, end)
    if (left := re.search(r"\$\{?\w*|\[\[\w+", expanded)) is not None:
        context = expanded[max(0, left.start() - 40) : left.end() + 40]
        raise UnexpandedError(f"unexpanded {left.group(0)!r} in …{context}…")
    return expanded
