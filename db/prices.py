"""The price catalog (``model_prices``) and exact spend."""

from __future__ import annotations

import datetime as dt
import decimal
from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

MILLION = decimal.Decimal(1_000_000)
# Wide enough that no sum of 64-bit token counts times a price ever rounds (and a rounding would raise).
EXACT = decimal.Context(prec=80, traps=[decimal.Inexact, decimal.InvalidOperation])


@dataclass(frozen=True)
class Price:
    model: str
    effective_from: dt.datetime
    input_per_million: decimal.Decimal
    output_per_million: decimal.Decimal
    cached_input_per_million: decimal.Decimal
    currency: str = "USD"


def spend(price: Price, input_tokens: int, cached_input_tokens: int, output_tokens: int) -> decimal.Decimal:
    """USD for these token sums at ``price`` (contracts section 1), exactly."""
    with decimal.localcontext(EXACT):
        uncached = decimal.Decimal(input_tokens - cached_input_tokens) * price.input_per_million
        cached = decimal.Decimal(cached_input_tokens) * price.cached_input_per_million
        output = decimal.Decimal(output_tokens) * price.output_per_million
        return (uncached + cached + output) / MILLION


async def list_prices(connection: AsyncConnection, model: str | None = None) -> list[Price]:
    """Every price version (of one model), ordered by model then effective_from."""
    result = await connection.execute(
        text(
            "SELECT model, effective_from, input_per_million, output_per_million, cached_input_per_million, currency "
            "FROM model_prices WHERE CAST(:model AS text) IS NULL OR model = :model ORDER BY model, effective_from"
        ),
        {"model": model},
    )
    return [Price(*row) for row in result]


async def upsert_price(connection: AsyncConnection, price: Price, created_by: str) -> Price:
    """Insert or correct the version of ``price.model`` effective from ``price.effective_from``."""
    result = await connection.execute(
        text(
            "INSERT INTO model_prices (model, effective_from, input_per_million, output_per_million, "
            "cached_input_per_million, currency, created_by) "
            "VALUES (:model, :effective_from, :input, :output, :cached, :currency, :by) "
            "ON CONFLICT (model, effective_from) DO UPDATE SET input_per_million = excluded.input_per_million, "
            "output_per_million = excluded.output_per_million, "
            "cached_input_per_million = excluded.cached_input_per_million, "
            "created_by = excluded.created_by, created_at = now() "
            "RETURNING model, effective_from, input_per_million, output_per_million, cached_input_per_million, currency"
        ),
        {
            "model": price.model, "effective_from": price.effective_from, "input": price.input_per_million,
            "output": price.output_per_million, "cached": price.cached_input_per_million,
            "currency": price.currency, "by": created_by,
        },
    )  # fmt: skip
    return Price(*result.one())
