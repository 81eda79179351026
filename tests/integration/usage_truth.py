"""Expected usage answers computed independently from generated events (Decimal, zoneinfo)."""

from __future__ import annotations

import datetime as dt
import decimal
import zoneinfo
from collections.abc import Iterable
from dataclasses import dataclass

from schema.scalars import serialize_decimal

MILLION = decimal.Decimal(1_000_000)


@dataclass(frozen=True)
class PriceVersion:
    model: str
    effective_from: dt.datetime
    input: decimal.Decimal
    output: decimal.Decimal
    cached: decimal.Decimal


def parse_time(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(dt.UTC)


def distinct(events: Iterable[dict[str, object]]) -> list[dict[str, object]]:
    seen: set[tuple[object, object]] = set()
    result = []
    for event in events:
        if (event["source"], event["id"]) not in seen:
            seen.add((event["source"], event["id"]))
            result.append(event)
    return result


def bucket_of(moment: dt.datetime, granularity: str, zone: str) -> tuple[dt.datetime, dt.datetime]:
    if granularity == "MINUTE":
        start = moment.replace(second=0, microsecond=0)
        return start, start + dt.timedelta(minutes=1)
    if granularity == "HOUR":
        start = moment.replace(minute=0, second=0, microsecond=0)
        return start, start + dt.timedelta(hours=1)
    tz = zoneinfo.ZoneInfo(zone)
    local = moment.astimezone(tz)
    if granularity == "DAY":
        first = local.date()
        following = first + dt.timedelta(days=1)
    else:
        first = local.date().replace(day=1)
        following = (first + dt.timedelta(days=32)).replace(day=1)
    start = dt.datetime.combine(first, dt.time(), tzinfo=tz).astimezone(dt.UTC)
    end = dt.datetime.combine(following, dt.time(), tzinfo=tz).astimezone(dt.UTC)
    return start, end


def price_at(prices: list[PriceVersion], model: str, moment: dt.datetime) -> PriceVersion | None:
    candidates = [p for p in prices if p.model == model and p.effective_from <= moment]
    return max(candidates, key=lambda p: p.effective_from) if candidates else None


def event_spend(data: dict[str, int], price: PriceVersion | None) -> decimal.Decimal:
    if price is None:
        return decimal.Decimal(0)
    cached, inp, out = data["cached_input_tokens"], data["input_tokens"], data["output_tokens"]
    return ((inp - cached) * price.input + cached * price.cached + out * price.output) / MILLION


def expected_usage(
    events: list[dict[str, object]],
    prices: list[PriceVersion],
    *,
    org_id: str,
    start: dt.datetime,
    end: dt.datetime,
    granularity: str,
    zone: str,
    group_by: list[str],
    models: list[str] | None = None,
) -> dict[str, object]:
    """The ``usage`` answer (series, totals, unpricedModels) as the API must give it."""
    series: dict[tuple[object, ...], dict[str, object]] = {}
    totals = {"requests": 0, "inputTokens": 0, "cachedInputTokens": 0, "outputTokens": 0, "spend": decimal.Decimal(0)}
    unpriced: set[str] = set()
    with decimal.localcontext() as context:
        context.prec = 80
        for event in events:
            data = event["data"]
            assert isinstance(data, dict)
            moment = parse_time(str(event["time"]))
            if data["org_id"] != org_id or not start <= moment < end:
                continue
            if models is not None and data["model"] not in models:
                continue
            price = price_at(prices, data["model"], moment)
            if price is None:
                unpriced.add(data["model"])
            spend = event_spend(data, price)
            bucket_start, bucket_end = bucket_of(moment, granularity, zone)
            group = {
                "model": data["model"] if "MODEL" in group_by else None,
                "projectId": data["project_id"] if "PROJECT" in group_by else None,
                "apiKeyId": data["api_key_id"] if "API_KEY" in group_by else None,
            }
            key = (bucket_start, *[(v is not None, v or "") for v in group.values()])
            bucket = series.setdefault(key, {
                "start": bucket_start, "end": bucket_end, "group": group, "requests": 0, "inputTokens": 0,
                "cachedInputTokens": 0, "outputTokens": 0, "spend": decimal.Decimal(0),
            })  # fmt: skip
            for target in (bucket, totals):
                target["requests"] += 1  # type: ignore[operator]
                target["inputTokens"] += data["input_tokens"]  # type: ignore[operator]
                target["cachedInputTokens"] += data["cached_input_tokens"]  # type: ignore[operator]
                target["outputTokens"] += data["output_tokens"]  # type: ignore[operator]
                target["spend"] += spend  # type: ignore[operator]
    ordered = [series[key] for key in sorted(series)]
    return {"series": ordered, "totals": totals, "unpricedModels": sorted(unpriced)}


def as_api(expected: dict[str, object]) -> dict[str, object]:
    """The expected answer in the API's JSON form (UTC Z times, Decimal strings, totalTokens)."""

    def time(value: dt.datetime) -> str:
        return value.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")

    def amounts(values: dict[str, object]) -> dict[str, object]:
        out = dict(values)
        out["totalTokens"] = int(values["inputTokens"]) + int(values["outputTokens"])  # type: ignore[call-overload]
        out["spend"] = serialize_decimal(values["spend"])  # type: ignore[arg-type]
        return out

    series = [amounts(b) | {"start": time(b["start"]), "end": time(b["end"])} for b in expected["series"]]  # type: ignore[attr-defined,index]
    return {"series": series, "totals": amounts(expected["totals"]), "unpricedModels": expected["unpricedModels"]}  # type: ignore[arg-type]
