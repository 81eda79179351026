"""``modelPrices`` and ``upsertModelPrice``."""

from __future__ import annotations

import datetime as dt
from typing import Any

import strawberry

from db.audit import record
from db.prices import Price, list_prices, upsert_price
from kernel.errors import BadUserInput
from kernel.hours import EARLIEST, LATEST, is_whole_hour
from resolvers.validation import check_model
from schema.context import Context
from schema.inputs import ModelPriceInput
from schema.usage import ModelPrice


def to_model_price(price: Price) -> ModelPrice:
    return ModelPrice(
        model=price.model,
        effective_from=price.effective_from,
        input_per_million=price.input_per_million,
        output_per_million=price.output_per_million,
        cached_input_per_million=price.cached_input_per_million,
        currency=price.currency,
    )


async def resolve_model_prices(info: strawberry.Info[Context, Any], model: str | None = None) -> list[ModelPrice]:
    info.context.require_caller()
    if model is not None:
        check_model(model, "model")
    async with info.context.resources.query_engine.connect() as connection:
        return [to_model_price(p) for p in await list_prices(connection, model)]


def validated_price(data: ModelPriceInput) -> Price:
    check_model(data.model, "model")
    if not EARLIEST <= data.effective_from <= LATEST:  # (compared before any conversion, which could overflow)
        # Year 1 at 00:00 UTC would be stored as -infinity by the driver; year 9999 late in a zone west of UTC
        # does not fit a Python datetime once in UTC.
        raise BadUserInput(
            f"effectiveFrom must lie between {EARLIEST.date().isoformat()} and {LATEST.date().isoformat()} (UTC)"
        )
    start = data.effective_from.astimezone(dt.UTC)
    if not is_whole_hour(start):
        raise BadUserInput("effectiveFrom must fall on a whole UTC hour")
    cached = data.cached_input_per_million if data.cached_input_per_million is not None else data.input_per_million
    for name, value in (("inputPerMillion", data.input_per_million), ("outputPerMillion", data.output_per_million),
                        ("cachedInputPerMillion", cached)):  # fmt: skip
        if value < 0:
            raise BadUserInput(f"{name} must not be negative")
    return Price(data.model, start, data.input_per_million, data.output_per_million, cached)


async def resolve_upsert_model_price(info: strawberry.Info[Context, Any], input: ModelPriceInput) -> ModelPrice:
    """Insert or correct a price version; every attempt is audited."""
    caller = info.context.require_caller()
    engine = info.context.resources.query_engine
    detail = {"model": input.model, "effective_from": input.effective_from.isoformat()}
    try:
        price = validated_price(input)
    except BadUserInput as exc:
        async with engine.begin() as connection:
            await record(connection, actor=caller.subject, action="upsertModelPrice", target=input.model,
                         outcome=f"rejected: {exc.message}", detail=detail)  # fmt: skip
        raise
    detail |= {
        "input_per_million": str(price.input_per_million),
        "output_per_million": str(price.output_per_million),
        "cached_input_per_million": str(price.cached_input_per_million),
    }
    async with engine.begin() as connection:
        saved = await upsert_price(connection, price, caller.subject)
        await record(
            connection, actor=caller.subject, action="upsertModelPrice", target=price.model, outcome="ok", detail=detail
        )
    return to_model_price(saved)
