"""Scenarios (a), (b) and (c): the usage query through the gateway (wrk) against the floor (asyncpg)."""

from __future__ import annotations

from typing import Any

import asyncpg
import httpx

from bench.api.floor import Floor, FloorClient, make_floor
from bench.api.queries import USAGE_QUERY, Shape, iso
from bench.api.run import Run
from bench.harness.output import say
from bench.harness.wrk import graphql_target


async def scenario_single(run: Run, shape: Shape, token: str) -> dict[str, Any]:
    """(a) and (b): one client, sequential, the gateway and the floor."""
    say(f"== usage {shape.key}: single client")
    floor = await make_floor(run.dataset, shape)
    check = await check_usage(run, shape, token, floor)
    say(f"   {check['buckets']:,} buckets, response {check['response_bytes']:,} bytes, "
        f"floor {check['floor_rows']:,} rows")  # fmt: skip
    entry: dict[str, Any] = {"query": check}
    entry |= await _gateway_and_floor(run, shape, token, floor, 1)
    gw, fl = entry["gateway"]["latency_ms"], entry["floor"]["latency_ms"]
    entry["ratio_gateway_to_floor"] = {k: round(gw[k] / fl[k], 2) for k in ("p50", "p90", "p99") if fl.get(k)}
    return entry


async def scenario_concurrent(run: Run, shape: Shape, token: str, clients: int) -> dict[str, Any]:
    """(c): ``clients`` concurrent clients, the gateway's requests/s against the floor's queries/s."""
    say(f"== usage {shape.key}: {clients} concurrent clients")
    floor = await make_floor(run.dataset, shape)
    entry: dict[str, Any] = {"query": shape.key, "clients": clients}
    entry |= await _gateway_and_floor(run, shape, token, floor, clients)
    entry["throughput_share_of_floor"] = round(entry["gateway"]["rps"] / entry["floor"]["rps"], 3)
    return entry


async def _gateway_and_floor(run: Run, shape: Shape, token: str, floor: Floor, clients: int) -> dict[str, Any]:
    """A window of the gateway under wrk -c``clients``, then one of the floor with as many connections."""
    target = graphql_target(USAGE_QUERY, shape.variables(run.dataset.largest_org), token)
    gateway = await run.wrk(f"gateway {shape.key} c{clients}", target, clients)
    async with FloorClient(run.dataset.url, floor, clients) as client:
        measured = await run.window(
            f"floor {shape.key} c{clients}", lambda: client.run(run.seconds), warm=lambda: client.run(run.warmup)
        )
    return {"gateway": gateway, "floor": measured}


async def check_usage(run: Run, shape: Shape, token: str, floor: Floor) -> dict[str, Any]:
    """One request through the API, checked against the floor's rows; sizes and bucket count."""
    body = {"query": USAGE_QUERY, "variables": shape.variables(run.dataset.largest_org)}
    async with httpx.AsyncClient(base_url=run.api.base_url, timeout=60) as http:
        response = await http.post("/graphql", json=body, headers={"Authorization": f"Bearer {token}"})
    payload = response.json()
    if response.status_code != 200 or payload.get("errors"):
        raise RuntimeError(f"usage query failed: {response.status_code} {response.text[:1000]}")
    usage = payload["data"]["usage"]
    connection = await asyncpg.connect(run.dataset.url, server_settings={"TimeZone": "UTC"})
    try:
        records = await connection.fetch(floor.sql, *floor.args)
    finally:
        await connection.close()
    floor_requests = sum(int(r["requests"]) for r in records)
    if floor_requests != int(usage["totals"]["requests"]):
        raise RuntimeError(f"gateway totals {usage['totals']['requests']} != floor rows {floor_requests}")
    return {
        "range": {"from": iso(shape.start), "to": iso(shape.end)},
        "granularity": shape.granularity,
        "group_by": ["MODEL"],
        "buckets": len(usage["series"]),
        "distinct_bucket_starts": len({b["start"] for b in usage["series"]}),
        "response_bytes": len(response.content),
        "requests_in_range": int(usage["totals"]["requests"]),
        "unpriced_models": usage["unpricedModels"],
        "floor_rows": len(records),
        "floor_json_bytes": len(Floor.encode(records)),
        "rollup_hours_in_plan": round((floor.args[4] - floor.args[3]).total_seconds() / 3600),  # type: ignore[operator]
    }
