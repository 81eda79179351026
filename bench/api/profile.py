"""Scenario (f): py-spy of the API process under the usage query, then under the trivial query."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.api.queries import USAGE_QUERY, VIEWER_QUERY, Shape
from bench.api.run import Run
from bench.harness.output import say
from bench.harness.runinfo import shown
from bench.harness.wrk import HttpTarget, graphql_target, run_wrk
from bench.profiles import count_stacks, profile_text, py_spy, start_py_spy

AREAS = (
    ("schema/execution", "schema.execution (fast list projection)"),
    ("graphql/", "graphql-core (parse, validate, execute)"),
    ("strawberry/", "Strawberry (view, extensions, execution)"),
    ("resolvers/usage_report", "resolvers.usage_report (buckets, Decimal sums)"),
    ("resolvers/", "resolvers (other)"),
    ("schema/", "schema (scalars, audit, errors)"),
    ("db/usage", "db.usage (UsageRow per record)"),
    ("asyncpg", "asyncpg (protocol, row decoding)"),
    ("sqlalchemy", "SQLAlchemy (pool, connection checkout, pre-ping)"),
    ("redis", "redis client (freshness cache)"),
    ("opentelemetry", "OpenTelemetry (ASGI middleware, metrics)"),
    # py-spy shortens the paths of the opentelemetry namespace packages:
    ("metrics/_internal", "OpenTelemetry (ASGI middleware, metrics)"),
    ("attributes/", "OpenTelemetry (ASGI middleware, metrics)"),
    ("_semconv", "OpenTelemetry (ASGI middleware, metrics)"),
    ("instrumentation/", "OpenTelemetry (ASGI middleware, metrics)"),
    ("util/http", "OpenTelemetry (ASGI middleware, metrics)"),
    ("trace/", "OpenTelemetry (ASGI middleware, metrics)"),
    ("context/", "OpenTelemetry (ASGI middleware, metrics)"),
    ("asgi/__init__", "OpenTelemetry (ASGI middleware, metrics)"),  # after strawberry/: its asgi is Strawberry's
    ("gateway/middleware", "gateway.middleware (request id, access log)"),
    ("uuid.py", "uuid (request ids)"),
    ("contextlib.py", "contextlib (context managers: structlog, exit stacks)"),
    ("inspect.py", "inspect (Strawberry's awaitable checks)"),
    ("json/", "stdlib json (request bodies)"),
    ("starlette", "Starlette"),
    ("uvicorn", "uvicorn (HTTP)"),
    ("httptools", "uvicorn (HTTP)"),
    ("orjson", "orjson"),
    ("jwt/", "PyJWT (token verification)"),
    ("gateway/auth", "kernel.auth"),
    ("structlog", "structlog"),
    ("gateway/", "gateway (other)"),
    ("decimal", "decimal"),
    ("asyncio", "asyncio (Python side)"),
    ("collections/", "collections (namedtuple _make: UsageRow)"),
)
NOT_AREAS = ("<frozen runpy>", "bench/", "uvicorn/server.py", "uvicorn/main.py", "uvicorn/_compat.py")
SECTIONS = (
    ("self time by area", "by_area_self"), ("time by area, inclusive", "by_area_total"),
    ("self time by function", "top_self"), ("total (inclusive) time by function", "top_total"),
)  # fmt: skip


def area_of(file: str, func: str, areas: tuple[tuple[str, str], ...] = AREAS) -> str:
    """The area a frame belongs to: the first of ``areas`` whose needle is in its file."""
    if file == "<string>":  # code made with exec: dataclass __init__s, the compiled list projectors
        return "schema.execution (fast list projection)" if func == "project" else "dataclass __init__ (exec'd)"
    if file.endswith("asyncio/runners.py") or "uvloop" in file:
        return "event loop (uvloop, native: socket I/O, callbacks)"
    return next((name for needle, name in areas if needle in file), f"other ({file.split('/')[0]})")


def summarize_profile(
    collapsed: Path, duration_s: float, rate_hz: int, areas: tuple[tuple[str, str], ...] = AREAS
) -> dict[str, Any]:
    """Self and total samples per function, and self samples per area, from py-spy's collapsed stacks."""
    counts = count_stacks(collapsed, lambda file, func: area_of(file, func, areas), NOT_AREAS)
    return {
        "samples": counts.samples,
        "busy_share_of_one_core": counts.busy_share(duration_s, rate_hz),
        "by_area_self": counts.top(counts.area_self, 20),
        "by_area_total": counts.top(counts.area_total, 20),
        "top_self": counts.top(counts.self_samples, 25),
        "top_total": counts.top(counts.total_samples, 40),
    }


async def scenario_profile(run: Run, shape: Shape, token: str, clients: int) -> None:
    """(f): py-spy on the API process while ``clients`` clients run the usage query (the slowest path), then,
    shorter, under the trivial query (where GraphQL's own overhead shows)."""
    if py_spy() is None:
        say("!! py-spy not found (pip install py-spy): no profile")
        return
    usage = graphql_target(USAGE_QUERY, shape.variables(run.dataset.largest_org), token)
    seconds = max(5, round(run.args.profile_seconds))
    run.results["profile"] = await record_profile(
        run, usage, clients, seconds, "graphql_profile", f"{clients} clients of usage {shape.key}"
    )
    run.save()
    viewer = graphql_target(VIEWER_QUERY, None, token)
    run.results["profile_trivial"] = await record_profile(
        run, viewer, 32, max(5, seconds // 2), "graphql_profile_trivial", "32 connections of { viewer { subject } }"
    )
    run.save()


async def record_profile(run: Run, target: HttpTarget, connections: int, seconds: int, name: str,
                         under: str) -> dict[str, Any]:  # fmt: skip
    """py-spy (raw, 100 Hz) of the API while wrk runs ``target``; writes ``<name>.txt`` and ``<name>_raw.txt``
    beside the results file."""
    raw_path, text_path = run.out.parent / f"{name}_raw.txt", run.out.parent / f"{name}.txt"
    say(f"== profile: py-spy on the API (pid {run.api.pid}) for {seconds} s under {under}")
    await run_wrk(run.api.base_url, target, connections=connections, seconds=run.warmup, work=run.work)
    spy = await start_py_spy(run.api.pid, seconds, "raw", raw_path)
    load = await run_wrk(run.api.base_url, target, connections=connections, seconds=seconds + 2, work=run.work)
    _, err = await spy.communicate()
    if spy.returncode != 0 or not raw_path.exists():
        say(f"!! py-spy failed: {err.decode()[-500:]}")
        return {"error": err.decode()[-500:]}
    summary = summarize_profile(raw_path, seconds, 100)
    title = (
        f"py-spy record --rate 100 of the API process for {seconds} s while wrk ran {under}; "
        f"{load['rps']} req/s under the profiler"
    )
    text_path.write_text(profile_text(summary, SECTIONS, title))
    say("   top areas (self): " + ", ".join(f"{r['function']} {r['share']:.0%}" for r in summary["by_area_self"][:6]))
    return summary | {
        "under": under,
        "duration_s": seconds,
        "rate_hz": 100,
        "rps_under_profiler": load["rps"],
        "files": [shown(text_path), shown(raw_path)],
    }
