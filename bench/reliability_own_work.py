"""The gateway's own work on a reliability answer: the whole app in this process, its SQL answered from memory.

    python -m bench.reliability_own_work [--shape h|m|o] [--requests 300]

Each statement ``build_report`` sends runs once against the benchmark's data set (``bench.api.dataset``, as
``bench.reliability_bench --keep-db`` leaves it); from then on its rows are replayed from memory, so what is timed
is the gateway alone: HTTP through the ASGI app (httpx's transport, no socket), the GraphQL stack, the report's
Python, the JSON, and the offload helper (``kernel/offload.py``) as configured. PostgreSQL, the rows' decoding and
the machine's other clients are out of it, so two versions of the code compare within a few percent where the
end-to-end benchmark's windows move by tens of percent. To compare with another commit, run it from a work tree of
that commit with ``PYTHONPATH=<work tree>``, the runs interleaved. Prints p50, p25 and the minimum (ms) and the
answer's size and SHA-256 (the same answer for the same data, whatever the code).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import hashlib
import os
import secrets
import statistics
import time
from typing import Any

import httpx
import orjson
from asgi_lifespan import LifespanManager

from bench.api import reliability as scenarios
from bench.api.dataset import prepare_dataset
from bench.api.queries import token_for
from bench.api.server import gateway_env
from bench.harness.output import say
from bench.harness.services import REDIS_URL


async def main_async(args: argparse.Namespace) -> int:
    import reliability.report as report

    async def nothing() -> None:
        return None

    dataset = await prepare_dataset(args.events, fresh=False, writers=2, before_load=nothing)  # loads it if missing
    secret = secrets.token_urlsafe(48)
    os.environ.update(gateway_env(
        ANALYTICS_DATABASE_URL=dataset.url, ANALYTICS_JWT_SECRET=secret, ANALYTICS_REDIS_URL=REDIS_URL,
        ANALYTICS_REDIS_PREFIX=f"bench:own:{secrets.token_hex(3)}:", ANALYTICS_LOG_LEVEL="WARNING",
    ))  # fmt: skip
    replayed: dict[tuple[str, str, str], Any] = {}
    fetch_once = report._with

    async def replay(connect: Any, fetch: Any, *fetch_args: Any, **kwargs: Any) -> Any:
        key = (fetch.__name__, repr(fetch_args), repr(sorted(kwargs.items())))
        if key not in replayed:
            replayed[key] = await fetch_once(connect, fetch, *fetch_args, **kwargs)
        return replayed[key]

    report._with = replay
    from gateway.app import create_app
    from gateway.logging import configure_logging
    from kernel.settings import ProcessRole, load_settings

    settings = load_settings()
    configure_logging(settings.log_level)
    app = create_app(settings, frozenset({ProcessRole.API}))
    hour, minute = scenarios.shapes(dt.datetime.now(dt.UTC))
    shape = {"h": hour, "m": minute, "o": scenarios.last_hour(hour)}[args.shape]
    body = orjson.dumps({"query": scenarios.RELIABILITY_QUERY, "variables": shape.variables(dataset.largest_org)})
    headers = {"authorization": f"Bearer {token_for(secret, dataset.largest_org)}", "content-type": "application/json"}
    times: list[float] = []
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
            first = await client.post("/graphql", content=body, headers=headers)
            if first.status_code != 200 or "errors" in first.json():
                say(f"error: {first.status_code} {first.text[:300]}")
                return 1
            for _ in range(20):  # warm-up: caches, the offload helper's start
                await client.post("/graphql", content=body, headers=headers)
            gc.collect()
            gc.freeze()
            for index in range(args.requests):
                started = time.perf_counter()
                answer = await client.post("/graphql", content=body, headers=headers)
                times.append(time.perf_counter() - started)
                if answer.content != first.content:
                    say("error: the answer changed between requests")
                    return 1
                if (index + 1) % 100 == 0:
                    say(f"   {index + 1}/{args.requests} requests")
    times.sort()
    say(f"{shape.key}: p50 {statistics.median(times) * 1000:.2f} ms, p25 {times[len(times) // 4] * 1000:.2f} ms, "
        f"min {times[0] * 1000:.2f} ms over {len(times)} requests; answer {len(first.content):,} bytes, "
        f"sha256 {hashlib.sha256(first.content).hexdigest()[:12]}")  # fmt: skip
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.reliability_own_work", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--shape", choices=("h", "m", "o"), default="h", help="h: HOUR 30 d, m: MINUTE 24 h, o: last hour"
    )
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--events", type=int, default=10_000_000, help="the data set (bench_graphql_<events>)")
    import uvloop  # the serving process's event loop (uvicorn's)

    return uvloop.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    raise SystemExit(main())
