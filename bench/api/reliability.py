"""The reliability query's benchmark: the gateway (wrk, one client) against the floor of the same SQL (asyncpg,
orjson), where the time goes inside ``build_report`` (each statement's time, client-side and as PostgreSQL
executes it), and a py-spy profile of the API under the query."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import time
import zoneinfo
from collections.abc import AsyncIterator, Collection, Sequence
from typing import Any

import asyncpg
import httpx
import orjson
from sqlalchemy.ext.asyncio import AsyncConnection

from bench.api.dataset import Dataset
from bench.api.floor import FLOOR_SESSION
from bench.api.profile import SECTIONS, summarize_profile
from bench.api.queries import iso
from bench.api.run import Run
from bench.harness.output import say
from bench.harness.runinfo import shown
from bench.harness.stats import latency_summary_ms
from bench.harness.wrk import graphql_target, run_wrk
from bench.profiles import profile_text, py_spy, start_py_spy
from db.engine import create_engine
from db.reliability import errors_statement, series_statement
from db.rollup import watermarks
from db.usage import UsageQuery, driver_connection
from gateway.allocator import tune_allocator
from kernel.hours import floor_hour
from kernel.settings import Settings
from reliability.report import BREAKDOWN_ROWS, SEASON, _grid, _history, _parts, build_report, ranked_series
from reliability.spikes import lookback

PERCENTILES = (0.5, 0.95, 0.99)
RELIABILITY_QUERY = """
query Reliability(
  $orgId: ID!, $range: TimeRange!, $granularity: Granularity!, $groupByModel: Boolean!, $percentiles: [Float!]!
) {
  reliability(orgId: $orgId, range: $range, granularity: $granularity, groupByModel: $groupByModel,
              percentiles: $percentiles) {
    totals { requests errors clientErrors errorRate latency { percentile ms } }
    series { start end model requests errors clientErrors errorRate latency { percentile ms } }
    spikes {
      start end metric observed baseline severity model
      topContributors { model statusCode errorType errors share }
    }
    breakdown { model statusCode errorType errors share }
    freshness { materializedThrough }
  }
}
""".strip()


@dataclasses.dataclass(frozen=True)
class Shape:
    """A reliability question of the benchmark: one granularity over one range, three percentiles."""

    key: str
    granularity: str
    start: dt.datetime
    end: dt.datetime
    by_model: bool

    def variables(self, org_id: str) -> dict[str, Any]:
        return {
            "orgId": org_id,
            "granularity": self.granularity,
            "range": {"from": iso(self.start), "to": iso(self.end)},
            "groupByModel": self.by_model,
            "percentiles": list(PERCENTILES),
        }

    def usage_query(self, org_id: str) -> UsageQuery:
        return UsageQuery(
            org_id=org_id, start=self.start, end=self.end, granularity=self.granularity, time_zone="UTC",
            group_by=frozenset({"model"}) if self.by_model else frozenset(),
        )  # fmt: skip


def shapes(now: dt.datetime) -> list[Shape]:
    """HOUR over the last 30 days in whole hours (720 buckets a model), per model; MINUTE over the last 24 h in
    whole minutes, one overall series (per model, this selection's estimated cost is over the gateway's budget:
    QUERY_TOO_COMPLEX)."""
    next_hour = floor_hour(now) + dt.timedelta(hours=1)
    next_minute = now.replace(second=0, microsecond=0) + dt.timedelta(minutes=1)
    return [
        Shape("hour_30d", "HOUR", next_hour - dt.timedelta(days=30), next_hour, by_model=True),
        Shape("minute_24h", "MINUTE", next_minute - dt.timedelta(hours=24), next_minute, by_model=False),
    ]


def last_hour(hour: Shape) -> Shape:
    """``hour`` over its last hour only: the statements, the history before it and the breakdown still run, over a
    few rows (what an answer costs whatever its size)."""
    return dataclasses.replace(hour, key="hour_1h", start=hour.end - dt.timedelta(hours=1))


@dataclasses.dataclass
class Statement:
    label: str
    sql: str
    args: tuple[object, ...]


@dataclasses.dataclass
class Floor:
    """The statements ``build_report`` runs before any spike is explained (the range's series, in its parts when
    the range is long; the history's series; the breakdown), run at once on bare asyncpg connections (one each, as
    build_report does), rows encoded with orjson; then, when given (``then``), the statements that explain the
    spikes it found, at once too (as build_report sends them, after the first ones: they depend on what those
    found)."""

    statements: list[Statement]
    then: list[Statement] = dataclasses.field(default_factory=list)

    @property
    def range_series(self) -> list[Statement]:
        """The range's series statements (one, or its parts)."""
        return [s for s in self.statements if s.label.split()[0] == "series"]

    async def once(self, connections: Sequence[asyncpg.Connection]) -> tuple[int, int]:
        async def one(connection: asyncpg.Connection, statement: Statement) -> tuple[int, int]:
            records = await connection.fetch(statement.sql, *statement.args)
            return len(records), len(orjson.dumps([dict(r) for r in records], default=_encode))

        done = await asyncio.gather(*map(one, connections, self.statements))
        if self.then:
            done += await asyncio.gather(*map(one, connections, self.then))
        return sum(rows for rows, _ in done), sum(size for _, size in done)

    async def run(self, url: str, seconds: float, warmup: float) -> dict[str, Any]:
        """A warm-up then a window of sequential runs, each statement on its own connection (their prepared
        statements settle first)."""
        count = max(len(self.statements), len(self.then))
        connections = [await asyncpg.connect(url, server_settings=FLOOR_SESSION) for _ in range(count)]
        try:
            latencies: list[float] = []
            for window, keep in ((warmup, False), (seconds, True)):
                until = time.perf_counter() + window
                while (started := time.perf_counter()) < until:
                    await self.once(connections)
                    if keep:
                        latencies.append(time.perf_counter() - started)
        finally:
            for connection in connections:
                await connection.close()
        return {
            "tool": "asyncpg, one connection a statement, the statements at once; rows to dicts, orjson "
            "(packed sketches as hex)",
            "statements": [s.label for s in self.statements],
            "then": [s.label for s in self.then],
            "requests": len(latencies),
            "seconds": round(seconds, 2),
            "rps": round(len(latencies) / seconds, 1),
            "latency_ms": latency_summary_ms(latencies),
        }


def _encode(value: object) -> str:
    """What orjson leaves to the floor: packed sketches (bytes) as hex, a C loop as cheap as the JSON text of a
    sketch; anything else (Decimal) as its string."""
    return value.hex() if isinstance(value, bytes) else str(value)


def make_floor(org_id: str, shape: Shape, materialized_through: dt.datetime | None) -> Floor:
    """The statements of ``reliability.report.build_report`` for ``shape``, with its history and breakdown."""
    query = shape.usage_query(org_id)
    zone = zoneinfo.ZoneInfo(query.time_zone)
    grid = _grid(query, zone)
    history = _history(grid[0], shape.granularity, zone, lookback(SEASON[shape.granularity]))
    per_model, ranked = shape.by_model, ranked_series(query, PERCENTILES)  # as build_report asks
    parts = _parts(query, grid)  # a long range in parts, read at once (as build_report reads it)
    statements = [
        Statement("series" if len(parts) == 1 else f"series {i + 1}/{len(parts)}",
                  *series_statement(part, materialized_through, per_model=per_model, ranked=ranked, totals=ranked))
        for i, part in enumerate(parts)
    ]  # fmt: skip
    if history:
        earlier = dataclasses.replace(query, start=history[0], end=grid[0])
        statements.append(
            Statement("history series", *series_statement(earlier, materialized_through, per_model=per_model,
                                                          ranked=ranked))
        )  # fmt: skip
    unbucketed = dataclasses.replace(query, granularity=None, time_zone="UTC")  # as build_report's breakdown
    statements.append(Statement("breakdown", *errors_statement(unbucketed, materialized_through, limit=BREAKDOWN_ROWS)))
    return Floor(statements)


async def with_attribution(floor: Floor, dataset: Dataset, shape: Shape) -> Floor:
    """The floor with the statements that explain the spikes, as ``build_report`` runs them on this data set: one
    report in this process, every statement it runs logged with its arguments, those not of the floor kept."""
    engine = create_engine(dataset.url, pool_size=len(floor.statements) + 4)
    logged: list[tuple[str, tuple[object, ...]]] = []

    @contextlib.asynccontextmanager
    async def connect() -> AsyncIterator[AsyncConnection]:
        async with engine.connect() as connection:
            raw = await driver_connection(connection)

            def log(query: Any) -> None:
                logged.append((query.query, tuple(query.args)))

            raw.add_query_logger(log)
            try:
                yield connection
            finally:
                raw.remove_query_logger(log)

    own = {s.sql for s in floor.statements}
    try:
        await build_report(connect, shape.usage_query(dataset.largest_org), PERCENTILES, await materialized(dataset),
                           meanwhile=lambda _: None)  # fmt: skip
        await asyncio.sleep(0)  # query loggers are called with call_soon
    finally:
        await engine.dispose()
    windows = [(sql, args) for sql, args in logged if sql not in own and sql.startswith(COMPOSITIONS_START)]
    then = [Statement(f"attribution {i + 1}", sql, args) for i, (sql, args) in enumerate(windows)]
    return dataclasses.replace(floor, then=then)


# How the windows' statements begin (``db.reliability.compositions``: each window a subquery tagged with its
# position; tests/unit/test_bench_reliability.py holds the two together). The rest of what the driver logs is the
# floor's own statements, transaction control and type introspection.
COMPOSITIONS_START = "SELECT 0 AS position"


async def materialized(dataset: Dataset) -> dt.datetime | None:
    """The rollup watermark the gateway reads (its freshness loader takes it from ``rollup_state``)."""
    engine = create_engine(dataset.url, pool_size=1)
    try:
        async with engine.connect() as connection:
            return (await watermarks(connection)).materialized_through
    finally:
        await engine.dispose()


async def scenario_single(run: Run, shape: Shape, token: str) -> dict[str, Any]:
    """One client, sequential: the gateway under wrk -c1, then the floor; the ratio of their percentiles."""
    say(f"== reliability {shape.key}: single client")
    floor = make_floor(run.dataset.largest_org, shape, await materialized(run.dataset))
    check = await check_answer(run, shape, token, floor)
    say(f"   {check['buckets']:,} buckets, {check['spikes']} spikes, response {check['response_bytes']:,} bytes, "
        f"floor {check['floor_rows']:,} rows")  # fmt: skip
    entry: dict[str, Any] = {"query": check}
    target = graphql_target(RELIABILITY_QUERY, shape.variables(run.dataset.largest_org), token)
    entry["gateway"] = await run.wrk(f"gateway {shape.key} c1", target, 1)
    entry["floor"] = await run.window(f"floor {shape.key}", lambda: floor.run(run.dataset.url, run.seconds, run.warmup))
    gw, fl = entry["gateway"]["latency_ms"], entry["floor"]["latency_ms"]
    entry["ratio_gateway_to_floor"] = {k: round(gw[k] / fl[k], 2) for k in ("p50", "p90", "p99") if fl.get(k)}
    # With spikes, the gateway runs more SQL than the floor's: the statements that explain them. The floor of all of
    # its SQL runs them too, after the first round, as the gateway does.
    full = await with_attribution(floor, run.dataset, shape)
    if check["spikes"] and not full.then:
        raise RuntimeError(f"{check['spikes']} spikes, but no attribution statement was logged: see with_attribution")
    if full.then:
        say(f"   the floor with the {len(full.then)} attribution statements of the {check['spikes']} spikes")
        entry["floor_with_attribution"] = await run.window(
            f"floor+attribution {shape.key}", lambda: full.run(run.dataset.url, run.seconds, run.warmup)
        )
        fa = entry["floor_with_attribution"]["latency_ms"]
        entry["ratio_gateway_to_floor_with_attribution"] = {
            k: round(gw[k] / fa[k], 2) for k in ("p50", "p90", "p99") if fa.get(k)
        }
    return entry


async def check_answer(run: Run, shape: Shape, token: str, floor: Floor) -> dict[str, Any]:
    """One request through the API, its totals checked against the floor's series rows; sizes and spikes."""
    body = {"query": RELIABILITY_QUERY, "variables": shape.variables(run.dataset.largest_org)}
    async with httpx.AsyncClient(base_url=run.api.base_url, timeout=120) as http:
        response = await http.post("/graphql", json=body, headers={"Authorization": f"Bearer {token}"})
    payload = response.json()
    if response.status_code != 200 or payload.get("errors"):
        raise RuntimeError(f"reliability query failed: {response.status_code} {response.text[:1000]}")
    report = payload["data"]["reliability"]
    connections = [await asyncpg.connect(run.dataset.url, server_settings=FLOOR_SESSION) for _ in floor.statements]
    try:
        rows = [r for s in floor.range_series for r in await connections[0].fetch(s.sql, *s.args)]
        rows_all, json_bytes = await floor.once(connections)
    finally:
        for connection in connections:
            await connection.close()
    if sum(int(r["requests"]) for r in rows) != int(report["totals"]["requests"]):
        raise RuntimeError(f"gateway totals {report['totals']['requests']} != the floor's series rows")
    spikes = report["spikes"]
    return {
        "range": {"from": iso(shape.start), "to": iso(shape.end)},
        "granularity": shape.granularity,
        "group_by_model": shape.by_model,
        "percentiles": list(PERCENTILES),
        "buckets": len(report["series"]),
        "models": len({b["model"] for b in report["series"]}),
        "requests_in_range": int(report["totals"]["requests"]),
        "errors_in_range": int(report["totals"]["errors"]),
        "breakdown_rows": len(report["breakdown"]),
        "spikes": len(spikes),
        "spike_list": [{k: s[k] for k in ("start", "end", "metric", "model", "severity")} for s in spikes],
        "response_bytes": len(response.content),
        "floor_rows": rows_all,
        "floor_json_bytes": json_bytes,
    }


async def decompose(dataset: Dataset, shape: Shape, runs: int) -> dict[str, Any]:
    """``build_report`` in this process on a gateway-configured connection, ``runs`` times after a warm-up of 3:
    its wall time, each statement's client-side time (asyncpg's query logger), and so the time of the spike
    attribution statements and of the Python work; then PostgreSQL's own time of the floor's statements."""
    tune_allocator(Settings().malloc_mmap_threshold_mb)  # as a serving process is (gateway/allocator.py)
    mt = await materialized(dataset)
    query = shape.usage_query(dataset.largest_org)
    floor = make_floor(dataset.largest_org, shape, mt)
    engine = create_engine(dataset.url, pool_size=len(floor.statements) + 1)
    walls: list[float] = []
    per_run: list[list[tuple[str, float, float]]] = []
    logged: list[tuple[str, float, float]] = []  # (statement, its start and end since the run's start, s)
    listening: set[int] = set()

    @contextlib.asynccontextmanager
    async def connect() -> AsyncIterator[AsyncConnection]:
        async with engine.connect() as connection:
            raw = await driver_connection(connection)
            if id(raw) not in listening:
                listening.add(id(raw))
                # Called when the statement has finished (soon after: call_soon): its end, and its start before it.
                raw.add_query_logger(
                    lambda q: logged.append((q.query, time.perf_counter() - started - q.elapsed,
                                             time.perf_counter() - started))
                )  # fmt: skip
            yield connection

    try:
        started = time.perf_counter()
        for index in range(runs + 3):
            logged.clear()
            started = time.perf_counter()
            report, _ = await build_report(connect, query, PERCENTILES, mt, meanwhile=lambda _: None)
            await asyncio.sleep(0)  # asyncpg calls query loggers with call_soon: let the last one run
            if index >= 3:
                walls.append(time.perf_counter() - started)
                per_run.append(list(logged))
    finally:
        await engine.dispose()
    series = {s.sql for s in floor.statements if s.label != "breakdown"}
    breakdown = {s.sql for s in floor.statements if s.label == "breakdown"}
    return phases(walls, per_run, series, breakdown, len(report.spikes))


def phases(walls: Sequence[float], per_run: Sequence[Sequence[tuple[str, float, float]]], series_sql: Collection[str],
            breakdown_sql: Collection[str], spikes: int) -> dict[str, Any]:  # fmt: skip
    """Per run, from each statement's start and end: until the series statements (text in ``series_sql``: the
    range's parts and the history, which detection waits for) have all ended; the Python work from there until the
    attribution statements (any other text but the breakdown's) start (collect, percentiles, detection); their span,
    first start to last end (they run at once, and overlap the report's last Python steps); what follows. The
    breakdown runs beside all of this (awaited last): its end is reported too. Summarised in ms."""
    series_end, before, span, after, breakdown_end = [], [], [], [], []
    for wall, run in zip(walls, per_run, strict=True):
        done = max((end for sql, _, end in run if sql in series_sql), default=0.0)
        attribution = [(start, end) for sql, start, end in run if sql not in series_sql and sql not in breakdown_sql]
        series_end.append(done)
        breakdown_end.append(max((end for sql, _, end in run if sql in breakdown_sql), default=0.0))
        if attribution:
            first, last = min(s for s, _ in attribution), max(e for _, e in attribution)
            before.append(first - done)
            span.append(last - first)
            after.append(wall - last)
        else:
            before.append(wall - done)
            span.append(0.0)
            after.append(0.0)
    statements = [len(run) for run in per_run]
    known = max((sum(sql in series_sql or sql in breakdown_sql for sql, _, _ in run) for run in per_run), default=0)
    return {
        "runs": len(walls),
        "spikes": spikes,
        "statements_per_run": max(statements, default=0),
        "attribution_statements_per_run": max(statements, default=0) - known,
        "build_report_ms": latency_summary_ms(walls),
        "series_statements_end_ms": latency_summary_ms(series_end),
        "python_until_attribution_ms": latency_summary_ms(before),
        "attribution_span_ms": latency_summary_ms(span),
        "after_attribution_ms": latency_summary_ms(after),
        "breakdown_end_ms": latency_summary_ms(breakdown_end),
    }


async def server_times(dataset: Dataset, shape: Shape, repeats: int = 5) -> list[dict[str, Any]]:
    """PostgreSQL's own planning and execution time of each floor statement (EXPLAIN ANALYZE, median of
    ``repeats``), with the buffers it touched and the plan's top node."""
    floor = make_floor(dataset.largest_org, shape, await materialized(dataset))
    connection = await asyncpg.connect(dataset.url, server_settings=FLOOR_SESSION)
    out = []
    try:
        for statement in floor.statements:
            plans = []
            for _ in range(repeats):
                text = await connection.fetchval(
                    "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + statement.sql, *statement.args
                )
                plans.append(orjson.loads(text)[0])
            plans.sort(key=lambda p: p["Execution Time"])
            median = plans[len(plans) // 2]
            top = median["Plan"]
            out.append({
                "statement": statement.label,
                "planning_ms": round(median["Planning Time"], 2),
                "execution_ms": round(median["Execution Time"], 2),
                "rows": top.get("Actual Rows"),
                "shared_buffers_hit": top.get("Shared Hit Blocks"),
                "shared_buffers_read": top.get("Shared Read Blocks"),
            })  # fmt: skip
    finally:
        await connection.close()
    return out


AREAS = (
    ("reliability/report", "reliability.report (buckets, merges, grid)"),
    ("reliability/sketch", "reliability.sketch (batch of packed sketches)"),
    ("numpy/", "numpy (sketch batch: sort, cumsum, search)"),
    ("reliability/spikes", "reliability.spikes (detection)"),
    ("reliability/attribution", "reliability.attribution"),
    ("db/reliability", "db.reliability (records to columns)"),
    ("resolvers/reliability_json", "resolvers.reliability_json (the series written as JSON)"),  # before its prefix
    ("resolvers/reliability", "resolvers.reliability (resolver, Strawberry objects)"),
    ("schema/execution", "schema.execution (fast list projection)"),
    ("graphql/", "graphql-core (parse, validate, execute)"),
    ("strawberry/", "Strawberry (view, extensions, execution)"),
    ("schema/", "schema (scalars, JSON encoding, audit, errors)"),
    ("asyncpg", "asyncpg (protocol, row decoding)"),
    ("json/", "stdlib json (sketch text, request bodies)"),
    ("orjson", "orjson"),
    ("sqlalchemy", "SQLAlchemy (pool, connection checkout)"),
    ("opentelemetry", "OpenTelemetry"),
    ("metrics/_internal", "OpenTelemetry"),  # py-spy shortens the namespace packages' paths
    ("instrumentation/", "OpenTelemetry"),
    ("gateway/", "gateway (middleware, auth, app)"),
    ("starlette", "Starlette"),
    ("uvicorn", "uvicorn (HTTP)"),
    ("zoneinfo", "zoneinfo / datetime"),
    ("datetime", "zoneinfo / datetime"),
    ("asyncio", "asyncio (Python side)"),
)


async def scenario_profile(run: Run, shape: Shape, token: str, seconds: int) -> dict[str, Any]:
    """py-spy (raw, 100 Hz) of the API while one client sends ``shape``; writes reliability_profile.txt (top
    functions and areas) and reliability_profile_raw.txt (collapsed stacks) beside the results (named after them:
    reliability_incident.json's are reliability_profile_incident*.txt)."""
    if py_spy() is None:
        say("!! py-spy not found (pip install py-spy): no profile")
        return {"error": "py-spy not found"}
    stem = (
        run.out.stem.replace("reliability", "reliability_profile")
        if "reliability" in run.out.stem
        else "reliability_profile"
    )
    raw_path, text_path = run.out.parent / f"{stem}_raw.txt", run.out.parent / f"{stem}.txt"
    raw_path.parent.mkdir(parents=True, exist_ok=True)  # (py-spy does not make it)
    target = graphql_target(RELIABILITY_QUERY, shape.variables(run.dataset.largest_org), token)
    say(f"== profile: py-spy on the API (pid {run.api.pid}) for {seconds} s under 1 client of {shape.key}")
    await run_wrk(run.api.base_url, target, connections=1, seconds=run.warmup, work=run.work)
    spy = await start_py_spy(run.api.pid, seconds, "raw", raw_path)
    load = await run_wrk(run.api.base_url, target, connections=1, seconds=seconds + 2, work=run.work)
    _, err = await spy.communicate()
    if spy.returncode != 0 or not raw_path.exists():
        say(f"!! py-spy failed: {err.decode()[-500:]}")
        return {"error": err.decode()[-500:]}
    summary = summarize_profile(raw_path, seconds, 100, AREAS)
    title = (f"py-spy record --rate 100 of the API process for {seconds} s while wrk -c1 sent the reliability "
             f"query ({shape.key}); {load['rps']} req/s under the profiler")  # fmt: skip
    text_path.write_text(profile_text(summary, SECTIONS, title))
    top = summary["by_area_self"][:6]
    say("   top areas (self): " + ", ".join(f"{r['function']} {r['share']:.0%}" for r in top))
    return summary | {"under": shape.key, "duration_s": seconds, "rate_hz": 100, "rps_under_profiler": load["rps"],
                      "files": [shown(text_path), shown(raw_path)]}  # fmt: skip
