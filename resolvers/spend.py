"""``Query.spendByOrg``: every org ranked by spend, for platform finance."""

from __future__ import annotations

import base64
import decimal
from typing import Any

import orjson
import strawberry

from db.usage import UsageQuery, UsageRow, usage_rows
from ingest import freshness
from kernel.auth import ensure_org_access
from kernel.errors import BadUserInput
from resolvers.validation import MAX_SPEND_RANGE, check_id, check_page_size, check_range
from schema.context import Context
from schema.inputs import TimeRange
from schema.scalars import BigInt, parse_decimal
from schema.usage import OrgSpend, OrgSpendConnection, OrgSpendEdge, PageInfo

MAX_PAGE = 500
MAX_CURSOR = 512  # characters; the cursors we hand out are ~60


async def resolve_spend_by_org(
    info: strawberry.Info[Context, Any], range: TimeRange, first: int = 50, after: str | None = None
) -> OrgSpendConnection:
    context = info.context
    ensure_org_access(context.require_caller(), None)
    check_range(range.from_, range.to, MAX_SPEND_RANGE, "spendByOrg")
    check_page_size(first, MAX_PAGE)
    query = UsageQuery(org_id=None, start=range.from_, end=range.to, granularity=None)
    async with context.resources.query_engine.connect() as connection:
        rows = await usage_rows(connection, query, await freshness.rollup_watermark(connection))
    ranked = _ranked(rows)
    start = _position_after(ranked, after)
    page = ranked[start : start + first]
    edges = [OrgSpendEdge(cursor=_cursor(node), node=node) for node in page]
    return OrgSpendConnection(
        edges=edges,
        page_info=PageInfo(has_next_page=start + first < len(ranked), end_cursor=edges[-1].cursor if edges else None),
        total_spend=sum((node.spend for node in ranked), decimal.Decimal(0)),
    )


def _ranked(rows: list[UsageRow]) -> list[OrgSpend]:
    sums: dict[str, list[Any]] = {}
    for row in rows:
        entry = sums.setdefault(row.org_id, [0, 0, decimal.Decimal(0)])
        entry[0] += row.requests
        entry[1] += row.input_tokens + row.output_tokens
        entry[2] += row.spend
    nodes = [OrgSpend(org_id=strawberry.ID(org), requests=BigInt(r), total_tokens=BigInt(t), spend=s)
             for org, (r, t, s) in sums.items()]  # fmt: skip
    return sorted(nodes, key=lambda n: (-n.spend, n.org_id))


def _cursor(node: OrgSpend) -> str:
    return base64.urlsafe_b64encode(orjson.dumps([str(node.spend), node.org_id])).decode()


def _position_after(ranked: list[OrgSpend], after: str | None) -> int:
    if after is None:
        return 0
    spend, org_id = _decode_cursor(after)
    key = (-spend, org_id)
    return next((i for i, n in enumerate(ranked) if (-n.spend, n.org_id) > key), len(ranked))


def _decode_cursor(after: str) -> tuple[decimal.Decimal, str]:
    """A cursor we issued: [spend, org id]. Anything else (NaN, 1e999999999, a NUL in the id: values that the
    comparison or the id rule cannot take) is refused with the one message."""
    try:
        if len(after) > MAX_CURSOR:
            raise ValueError("too long")
        spend_text, org_id = orjson.loads(base64.urlsafe_b64decode(after.encode()))
        if not isinstance(spend_text, str) or not isinstance(org_id, str):
            raise TypeError("not [str, str]")
        spend = parse_decimal(spend_text)  # finite and bounded, as any Decimal argument
        check_id(org_id, "org id")
    except (ValueError, TypeError, BadUserInput):
        raise BadUserInput("after is not a cursor returned by spendByOrg") from None
    return spend, org_id
