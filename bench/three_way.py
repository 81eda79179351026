"""Three-way benchmark: this gateway, PostGraphile 5.1.5 and the floor answering the same usage question.

    python -m bench.three_way --keep-db       # as `make bench` runs it (about 10 minutes after the data set)
    python -m bench.three_way --rounds 1 --seconds 5 --single-seconds 5   # a smoke run

The question (the dashboard's main one): the data set's largest org, 30 days of HOURLY usage by model ending at
the rollup watermark (``rollup_state.materialized_through``), i.e. 720 hours x the org's models rows:

    gateway       usage(orgId, range, granularity: HOUR, groupBy: [MODEL]) { series { start group { model }
                  requests inputTokens cachedInputTokens outputTokens } }, through ``python -m gateway.cli serve
                  --role api`` with every other setting at its default (log level, workers, pool), the API role
                  being the one that answers it
    postgraphile  PostGraphile 5.1.5 (amber preset, pg adaptor, NODE_ENV=production, its CLI and defaults) over
                  bench/peer/schema.sql: only the ``peer`` schema, a view over ``usage_hourly_model`` and the SETOF
                  function ``usage_since(org, since)``; field ``usageSince { nodes { ... } }`` with the same columns
    floor         ``SELECT hour, model, requests, ... FROM usage_hourly_model WHERE org_id = $1 AND hour >= $2 AND
                  hour < $3 ORDER BY hour, model`` through an asyncpg pool of 16, rows to orjson, behind a bare ASGI
                  app on uvicorn (bench/api/floor.py)
    dashboard     the gateway's full dashboard query (totals, spend, series with spend, unpricedModels, freshness),
                  reported beside

Before measuring, each answers once and the rows are compared row by row (hour, model and the four counts); a
difference stops the run. Then, interleaved, ``--rounds`` times: for each of the four, a warm-up, wrk -t1 -c16 for
``--seconds`` (req/s, p50, p99 from wrk's histogram), a warm-up and wrk -t1 -c1 for ``--single-seconds``. CPU per
request = (the server's process tree + PostgreSQL's processes) CPU seconds from /proc over the window / requests
(bench/harness/cpu.py; PostgreSQL's group holds its server processes and the backends of the bench database,
other databases' backends count as foreign work). All three reach PostgreSQL over its Unix socket.

Data: ``bench_graphql_3000000`` (bench/api/dataset.py: 3M events, 1,000 orgs), built when missing, kept with
``--keep-db``. PostGraphile's packages are installed by ``npm ci`` into bench/peer/node_modules from
bench/peer/package-lock.json (when the lock changed since the last install). Results:
``bench/results/three_way.json``; ``python -m bench.report`` renders them into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import hashlib
import json
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson

from bench.api.dataset import Dataset, prepare_dataset
from bench.api.floor import FLOOR_POOL_ENV, FLOOR_URL_ENV, PLAIN_SQL, floor_path, serve_floor
from bench.api.queries import iso, token_for
from bench.api.results import environment
from bench.api.server import READY_TIMEOUT_S, gateway_env
from bench.harness.cpu import CpuWindow, wait_quiet
from bench.harness.entry import run_cancellable
from bench.harness.output import say
from bench.harness.runinfo import ROOT, git_commit, shown, tool_version
from bench.harness.servers import Server, child_env, free_port, launch, log_problems, start_server, stop_server
from bench.harness.services import ADMIN_URL, REDIS_URL, admin
from bench.harness.wrk import HttpTarget, graphql_target, run_wrk
from bench.postgres import connection_facts

EVENTS = 3_000_000
PEER_DIR = ROOT / "bench" / "peer"
PEER_VERSION = "5.1.5"
RESULTS_FILE = ROOT / "bench" / "results" / "three_way.json"
STAMP = ".bench-lock-sha256"  # in node_modules: the package-lock.json that ``npm ci`` installed
SYSTEMS = ("gateway", "postgraphile", "floor", "dashboard")
LABELS = {
    "gateway": "this gateway",
    "postgraphile": f"PostGraphile {PEER_VERSION}",
    "floor": "floor",
    "dashboard": "this gateway, full dashboard query",
}
SERVER_GROUP = "server"

GATEWAY_QUESTION = (
    "query Usage($orgId: ID!, $range: TimeRange!) { usage(orgId: $orgId, range: $range, granularity: HOUR, "
    "groupBy: [MODEL]) { series { start group { model } requests inputTokens cachedInputTokens outputTokens } } }"
)
DASHBOARD_QUERY = (
    "query Dashboard($orgId: ID!, $range: TimeRange!) { usage(orgId: $orgId, range: $range, granularity: HOUR, "
    "groupBy: [MODEL]) { totals { requests inputTokens cachedInputTokens outputTokens totalTokens spend } "
    "series { start end group { model } requests inputTokens cachedInputTokens outputTokens totalTokens spend } "
    "unpricedModels freshness { orgId lastEventAt lastIngestedAt materializedThrough } } }"
)
PEER_QUESTION = (
    "query Usage($org: String!, $since: Datetime!) { usageSince(org: $org, since: $since) { nodes { hour model "
    "requests inputTokens cachedInputTokens outputTokens } } }"
)
GATEWAY_COMMAND = [sys.executable, "-m", "gateway.cli", "serve", "--role", "api"]
PEER_COMMAND = [
    "node", "--require", "./polyfill.cjs", "node_modules/postgraphile/dist/cli-run.js",
    "--config", "./graphile.config.mjs", "--host", "127.0.0.1", "--port",
]  # fmt: skip

Row = tuple[dt.datetime, str, int, int, int, int]  # hour, model, requests, input, cached input, output tokens


class AnswerMismatch(RuntimeError):
    """The systems do not answer the question with the same rows."""


# --- the question and its answers ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Question:
    """``org_id``'s hourly usage by model in [start, end)."""

    org_id: str
    start: dt.datetime
    end: dt.datetime

    @classmethod
    def ending_at(cls, org_id: str, watermark: dt.datetime, days: int = 30) -> Question:
        return cls(org_id, watermark - dt.timedelta(days=days), watermark)

    def gateway_variables(self) -> dict[str, Any]:
        return {"orgId": self.org_id, "range": {"from": iso(self.start), "to": iso(self.end)}}

    def peer_variables(self) -> dict[str, Any]:
        return {"org": self.org_id, "since": iso(self.start)}


def _instant(text: str) -> dt.datetime:
    moment = dt.datetime.fromisoformat(text)
    if moment.tzinfo is None:
        raise ValueError(f"instant without a time zone: {text!r}")
    return moment.astimezone(dt.UTC)


def _data(payload: Any) -> dict[str, Any]:
    if not isinstance(payload, dict) or payload.get("errors") or not isinstance(payload.get("data"), dict):
        raise AnswerMismatch(f"not an answer: {str(payload)[:500]}")
    data: dict[str, Any] = payload["data"]
    return data


def gateway_rows(payload: Any) -> list[Row]:
    """The rows of the gateway's ``usage.series`` (the question's or the dashboard's)."""
    return [
        (_instant(b["start"]), b["group"]["model"], int(b["requests"]), int(b["inputTokens"]),
         int(b["cachedInputTokens"]), int(b["outputTokens"]))
        for b in _data(payload)["usage"]["series"]
    ]  # fmt: skip


def peer_rows(payload: Any) -> list[Row]:
    """The rows of PostGraphile's ``usageSince.nodes`` (its BigInts are strings)."""
    return [
        (_instant(n["hour"]), n["model"], int(n["requests"]), int(n["inputTokens"]), int(n["cachedInputTokens"]),
         int(n["outputTokens"]))
        for n in _data(payload)["usageSince"]["nodes"]
    ]  # fmt: skip


def floor_rows(payload: Any) -> list[Row]:
    """The rows of the floor's JSON array (usage_hourly_model's columns)."""
    if not isinstance(payload, list):
        raise AnswerMismatch(f"not an answer: {str(payload)[:500]}")
    return [
        (_instant(r["hour"]), r["model"], int(r["requests"]), int(r["input_tokens"]), int(r["cached_input_tokens"]),
         int(r["output_tokens"]))
        for r in payload
    ]  # fmt: skip


def check_same(answers: Mapping[str, Sequence[Row]]) -> int:
    """The number of rows when every answer holds the same rows in the same order; otherwise AnswerMismatch naming
    the first difference."""
    (first, reference), *others = answers.items()
    if not reference:
        raise AnswerMismatch(f"{first} answered no rows")
    for name, rows in others:
        for index, (a, b) in enumerate(zip(reference, rows, strict=False)):
            if a != b:
                raise AnswerMismatch(f"{name} differs from {first} at row {index}: {b} != {a}")
        if len(rows) != len(reference):
            raise AnswerMismatch(f"{name} answered {len(rows):,} rows, {first} {len(reference):,}")
    return len(reference)


# --- figures --------------------------------------------------------------------------------------------------


def cpu_per_request(cpu: Mapping[str, Any], requests: int) -> dict[str, float]:
    """Milliseconds of CPU per request of the server's process tree and of PostgreSQL over a window, from a
    :class:`CpuWindow` result (cores = CPU seconds / wall seconds)."""
    per = 1000 * float(cpu["wall_s"]) / max(requests, 1)
    cores = cpu["cores_used"]
    server = float(cores.get(SERVER_GROUP, 0.0)) * per
    postgres = float(cores.get("postgres", 0.0)) * per
    return {"server_ms": round(server, 2), "postgres_ms": round(postgres, 2), "total_ms": round(server + postgres, 2)}


MEDIAN_FIELDS = {
    "rps": ("concurrent", "rps"),
    "p50_ms": ("concurrent", "latency_ms", "p50"),
    "p99_ms": ("concurrent", "latency_ms", "p99"),
    "server_cpu_ms": ("concurrent", "cpu_ms_per_request", "server_ms"),
    "postgres_cpu_ms": ("concurrent", "cpu_ms_per_request", "postgres_ms"),
    "cpu_ms": ("concurrent", "cpu_ms_per_request", "total_ms"),
    "server_cores": ("concurrent", "cpu", "cores_used", SERVER_GROUP),
    "postgres_cores": ("concurrent", "cpu", "cores_used", "postgres"),
    "foreign_cores": ("concurrent", "cpu", "foreign_cores"),
    "single_p50_ms": ("single", "latency_ms", "p50"),
    "single_p99_ms": ("single", "latency_ms", "p99"),
    "single_cpu_ms": ("single", "cpu_ms_per_request", "total_ms"),
}


def _pick(entry: Mapping[str, Any], path: Sequence[str]) -> float | None:
    value: Any = entry
    for key in path:
        if not isinstance(value, Mapping) or key not in value:
            return None
        value = value[key]
    return float(value) if isinstance(value, int | float) else None


def medians(rounds: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """Per system, the median over the rounds of each figure of :data:`MEDIAN_FIELDS`."""
    out: dict[str, dict[str, float]] = {}
    for system in SYSTEMS:
        entries = [r[system] for r in rounds if system in r]
        figures = {}
        for name, path in MEDIAN_FIELDS.items():
            values = [v for e in entries if (v := _pick(e, path)) is not None]
            if values:
                figures[name] = round(statistics.median(values), 2)
        if figures:
            out[system] = figures
    return out


def ratios(meds: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """The gateway against PostGraphile (throughput, CPU) and against the floor."""
    gw, pg, fl = meds.get("gateway", {}), meds.get("postgraphile", {}), meds.get("floor", {})
    out = {}
    if gw.get("rps") and pg.get("rps"):
        out["gateway_rps_over_postgraphile"] = round(gw["rps"] / pg["rps"], 2)
    if gw.get("cpu_ms") and pg.get("cpu_ms"):
        out["gateway_cpu_over_postgraphile"] = round(gw["cpu_ms"] / pg["cpu_ms"], 2)
    if gw.get("rps") and fl.get("rps"):
        out["gateway_rps_share_of_floor"] = round(gw["rps"] / fl["rps"], 3)
    return out


# --- the servers ------------------------------------------------------------------------------------------------


def install_peer() -> str:
    """``npm ci`` into bench/peer when node_modules does not hold this package-lock.json; the node version."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        raise SystemExit(
            "error: node and npm are needed for the PostGraphile peer (bench/peer): install Node.js 20 or later "
            "(e.g. apt-get install -y nodejs npm) and rerun"
        )
    lock = hashlib.sha256((PEER_DIR / "package-lock.json").read_bytes()).hexdigest()
    stamp = PEER_DIR / "node_modules" / STAMP
    if not stamp.exists() or stamp.read_text().strip() != lock:
        say("installing PostGraphile into bench/peer/node_modules (npm ci)")
        done = subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=PEER_DIR,
                              capture_output=True, text=True, check=False)  # fmt: skip
        if done.returncode != 0:
            raise SystemExit(f"error: npm ci failed in bench/peer:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
        stamp.write_text(lock + "\n")
    return tool_version([node, "--version"])


async def apply_peer_schema(dataset: Dataset) -> None:
    connection = await asyncpg.connect(dataset.url)
    try:
        await connection.execute((PEER_DIR / "schema.sql").read_text())
    finally:
        await connection.close()


async def watermark(dataset: Dataset) -> dt.datetime:
    connection = await asyncpg.connect(dataset.url)
    try:
        moment = await connection.fetchval("SELECT materialized_through FROM rollup_state")
    finally:
        await connection.close()
    if moment is None:
        raise RuntimeError(f"{dataset.name} has no rollup watermark")
    return moment.astimezone(dt.UTC)  # type: ignore[no-any-return]


async def start_gateway(dataset: Dataset, secret: str, redis_prefix: str, work: Path) -> Server:
    port = free_port()
    env = gateway_env(
        ANALYTICS_DATABASE_URL=dataset.url, ANALYTICS_JWT_SECRET=secret, ANALYTICS_REDIS_URL=REDIS_URL,
        ANALYTICS_REDIS_PREFIX=redis_prefix, ANALYTICS_HOST="127.0.0.1", ANALYTICS_PORT=str(port),
    )  # fmt: skip
    return await start_server("gateway", GATEWAY_COMMAND, env, port, work, READY_TIMEOUT_S)


async def start_peer(dataset: Dataset, work: Path) -> Server:
    """PostGraphile through its CLI; ready once it answers ``{ __typename }``."""
    port = free_port()
    env = child_env(NODE_ENV="production", PEER_DATABASE_URL=dataset.url)
    server = await launch("postgraphile", [*PEER_COMMAND, str(port)], env, port, work / "postgraphile.log", PEER_DIR)
    try:
        await _answers_graphql(server, READY_TIMEOUT_S)
    except BaseException:
        await stop_server(server)
        raise
    say(f"postgraphile ready on :{port} (pid {server.pid})")
    return server


async def _answers_graphql(server: Server, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(base_url=server.base_url, timeout=5) as http:
        while time.monotonic() < deadline:
            if server.process.returncode is not None:
                raise RuntimeError(f"{server.name} exited with {server.process.returncode}: {server.log_tail()}")
            try:
                response = await http.post("/graphql", json={"query": "{ __typename }"})
                if response.status_code == 200:
                    server.ready_at = time.time()
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.2)  # a process that is starting: there is nothing to await
    raise RuntimeError(f"{server.name} not ready after {timeout_s} s; see {server.log_path}")


async def start_floor(dataset: Dataset, work: Path, pool: int) -> Server:
    port = free_port()
    env = child_env(**{FLOOR_URL_ENV: dataset.url, FLOOR_POOL_ENV: str(pool)})
    command = [sys.executable, "-m", "bench.three_way", "--serve-floor", str(port)]
    return await start_server("floor", command, env, port, work, READY_TIMEOUT_S)


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (the gateway's workers, if any)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                text = (entry / "stat").read_text()
            except OSError:
                continue
            children.setdefault(int(text[text.rfind(")") + 2 :].split()[1]), []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(current := todo.pop())
        todo += children.get(current, [])
    return tree


def targets(question: Question, token: str) -> dict[str, HttpTarget]:
    peer_body = orjson.dumps({"query": PEER_QUESTION, "variables": question.peer_variables()})
    return {
        "gateway": graphql_target(GATEWAY_QUESTION, question.gateway_variables(), token),
        "postgraphile": HttpTarget("/graphql", "POST", peer_body),
        "floor": HttpTarget(floor_path(question.org_id, question.start, question.end)),
        "dashboard": graphql_target(DASHBOARD_QUERY, question.gateway_variables(), token),
    }


async def fetch(server: Server, target: HttpTarget) -> tuple[Any, int]:
    """One request as wrk sends it: the decoded answer and its size in bytes."""
    headers = {"Content-Type": "application/json"}
    if target.token:
        headers["Authorization"] = f"Bearer {target.token}"
    async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as http:
        response = await http.request(target.method, target.path, content=target.body, headers=headers)
    if response.status_code != 200:
        raise AnswerMismatch(f"{server.name} answered {response.status_code}: {response.text[:500]}")
    return response.json(), len(response.content)


async def check_answers(servers: Mapping[str, Server], wanted: Mapping[str, HttpTarget]) -> dict[str, Any]:
    """Each system's answer once, compared row by row; the row count, sizes, the dashboard's totals."""
    payloads = {name: await fetch(servers[name], wanted[name]) for name in SYSTEMS}
    parse = {"gateway": gateway_rows, "postgraphile": peer_rows, "floor": floor_rows, "dashboard": gateway_rows}
    answers = {name: parse[name](payloads[name][0]) for name in SYSTEMS}
    rows = check_same(answers)
    totals = _data(payloads["dashboard"][0])["usage"]["totals"]
    if int(totals["requests"]) != sum(r[2] for r in answers["floor"]):
        raise AnswerMismatch(f"dashboard totals {totals['requests']} != the rows' sum of requests")
    return {
        "rows": rows,
        "hours": len({r[0] for r in answers["floor"]}),
        "models": sorted({r[1] for r in answers["floor"]}),
        "requests": sum(r[2] for r in answers["floor"]),
        "response_bytes": {name: payloads[name][1] for name in SYSTEMS},
        "identical": True,
    }


# --- measuring ------------------------------------------------------------------------------------------------


async def window(server: Server, target: HttpTarget, connections: int, seconds: float, warmup: float,
                 database: str, work: Path) -> dict[str, Any]:  # fmt: skip
    """A warm-up, then wrk -t1 -c``connections`` for ``seconds`` with CPU accounting of the server's process
    tree and PostgreSQL."""
    if warmup > 0:
        await run_wrk(server.base_url, target, connections=connections, seconds=warmup, work=work)
    cpu = CpuWindow(dict.fromkeys(process_tree(server.pid), SERVER_GROUP), database)
    cpu.start()
    try:
        result = await run_wrk(server.base_url, target, connections=connections, seconds=seconds, work=work)
    finally:
        usage = await cpu.stop()
    result.pop("wrk_latency_distribution", None)
    result["cpu"] = usage
    result["cpu_ms_per_request"] = cpu_per_request(usage, int(result["requests"]))
    if result["error_count"]:
        say(f"!! {server.name}: wrk counted errors {result['errors']}")
    return result


def _line(label: str, entry: Mapping[str, Any]) -> str:
    lat, cpu, cores = entry["latency_ms"], entry["cpu_ms_per_request"], entry["cpu"]
    return (f"   {label}: {entry['rps']:,.1f}/s  p50 {lat['p50']} ms  p99 {lat['p99']} ms  CPU/request "
            f"{cpu['server_ms']} + {cpu['postgres_ms']} = {cpu['total_ms']} ms  (machine busy "
            f"{cores['machine_busy_cores']:.2f} cores, foreign {cores['foreign_cores']:.2f})")  # fmt: skip


async def measure_rounds(args: argparse.Namespace, servers: Mapping[str, Server], wanted: Mapping[str, HttpTarget],
                         database: str, work: Path, results: dict[str, Any], out: Path) -> None:  # fmt: skip
    for number in range(1, args.rounds + 1):
        entry: dict[str, Any] = {}
        for system in SYSTEMS:
            server, target = servers[system], wanted[system]
            concurrent = await window(server, target, args.connections, args.seconds, args.warmup, database, work)
            say(_line(f"round {number}/{args.rounds} {system} c{args.connections}", concurrent))
            single = await window(server, target, 1, args.single_seconds, args.warmup, database, work)
            say(_line(f"round {number}/{args.rounds} {system} c1", single))
            entry[system] = {"concurrent": concurrent, "single": single}
        results["rounds"].append(entry)
        results["medians"] = medians(results["rounds"])
        results["ratios"] = ratios(results["medians"])
        save(results, out)


def save(results: Mapping[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, default=str) + "\n")


def new_results(args: argparse.Namespace, dataset: Dataset, question: Question, node: str) -> dict[str, Any]:
    return {
        "benchmark": "three_way",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "git": git_commit(),
        "command": "python -m bench.three_way " + " ".join(sys.argv[1:]),
        "postgres_connection": connection_facts(ADMIN_URL),
        "environment": environment() | {"node": node, "postgraphile": PEER_VERSION},
        "dataset": {"database": dataset.name} | dataset.info,
        "question": {
            "org": question.org_id,
            "from": iso(question.start),
            "to": iso(question.end),
            "granularity": "HOUR",
            "group_by": ["MODEL"],
            "gateway": GATEWAY_QUESTION,
            "postgraphile": PEER_QUESTION,
            "floor": PLAIN_SQL,
            "dashboard": DASHBOARD_QUERY,
        },
        "settings": {
            "rounds": args.rounds,
            "connections": args.connections,
            "window_s": args.seconds,
            "single_window_s": args.single_seconds,
            "warmup_s": args.warmup,
            "floor_pool": args.connections,
            "gateway": " ".join(["python", *GATEWAY_COMMAND[1:]]),
            "postgraphile": "NODE_ENV=production " + " ".join(PEER_COMMAND) + " <port>",
            "floor": "asyncpg pool, rows to orjson, bare ASGI app on uvicorn (bench/api/floor.py)",
            "cpu": "utime+stime from /proc over each window: the server's process tree ('server') and "
            "PostgreSQL's processes and bench-database backends ('postgres'), divided by wrk's requests",
        },
        "rounds": [],
    }


async def main_async(args: argparse.Namespace) -> int:
    if shutil.which("wrk") is None:
        say("error: wrk is not installed (apt-get install -y wrk)")
        return 2
    node = install_peer()
    out = Path(args.out) if args.out else RESULTS_FILE
    dataset = await prepare_dataset(args.events, fresh=args.fresh, writers=2, before_load=_nothing)
    await apply_peer_schema(dataset)
    question = Question.ending_at(dataset.largest_org, await watermark(dataset))
    say(f"question: {question.org_id}, HOUR by model, {iso(question.start)} .. {iso(question.end)}")
    results = new_results(args, dataset, question, node)
    work = Path(tempfile.mkdtemp(prefix="three_way_"))
    secret = secrets.token_urlsafe(48)
    servers: dict[str, Server] = {}
    try:
        servers["gateway"] = await start_gateway(dataset, secret, f"bench:three:{secrets.token_hex(3)}:", work)
        servers["postgraphile"] = await start_peer(dataset, work)
        servers["floor"] = await start_floor(dataset, work, args.connections)
        servers["dashboard"] = servers["gateway"]
        wanted = targets(question, token_for(secret, question.org_id))
        results["answers"] = await check_answers(servers, wanted)
        say(f"same answer from all: {results['answers']['rows']:,} rows "
            f"({results['answers']['hours']} hours x {len(results['answers']['models'])} models)")  # fmt: skip
        results["quiet"] = await wait_quiet(args.quiet_wait, args.quiet_threshold)
        await measure_rounds(args, servers, wanted, dataset.name, work, results, out)
    finally:
        for name in ("floor", "postgraphile", "gateway"):
            if name in servers:
                results.setdefault("exit_codes", {})[name] = await stop_server(servers[name])
        if "gateway" in servers:
            results["gateway_log_problems"] = log_problems(servers["gateway"].log_path)
        results["finished"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        save(results, out)
        shutil.rmtree(work, ignore_errors=True)
        if not args.keep_db:
            say(f"dropping {dataset.name} (--keep-db keeps it for the next run)")
            await admin(f'DROP DATABASE IF EXISTS "{dataset.name}" WITH (FORCE)')
    say(f"results: {shown(out)}")
    for system, figures in results.get("medians", {}).items():
        say(f"   {LABELS[system]}: {figures.get('rps')}/s  p50 {figures.get('p50_ms')} ms  p99 "
            f"{figures.get('p99_ms')} ms  CPU {figures.get('server_cpu_ms')} + {figures.get('postgres_cpu_ms')} ms"
            f"  single p50 {figures.get('single_p50_ms')} / p99 {figures.get('single_p99_ms')} ms")  # fmt: skip
    return 0


async def _nothing() -> None:
    return None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.three_way", description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=EVENTS, help="events of the data set (default 3,000,000)")
    parser.add_argument("--keep-db", action="store_true", help="keep the bench database for the next run")
    parser.add_argument("--fresh", action="store_true", help="rebuild the bench database even if complete")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--connections", type=int, default=16, help="wrk connections of the concurrent window")
    parser.add_argument("--seconds", type=float, default=15, help="concurrent window (default 15 s)")
    parser.add_argument("--single-seconds", type=float, default=15, help="single-connection window (default 15 s)")
    parser.add_argument("--warmup", type=float, default=3, help="warm-up before each window (default 3 s)")
    parser.add_argument("--quiet-threshold", type=float, default=0.3, help="busy cores that count as quiet")
    parser.add_argument("--quiet-wait", type=float, default=60, help="max seconds to wait for a quiet machine")
    parser.add_argument("--out", default=None, help="results file (default bench/results/three_way.json)")
    parser.add_argument("--serve-floor", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_floor is not None:
        serve_floor(args.serve_floor)
        return 0
    return run_cancellable(main_async(args))


if __name__ == "__main__":
    raise SystemExit(main())
