"""Write docs/benchmarks.md from the recorded results.

    python -m bench.report            # after python -m bench.ingest_bench and python -m bench.graphql_bench

The sections "Usage queries", "GraphQL" and "Publish-to-visible" are generated from
``bench/results/graphql.json``, "Three-way: gateway, PostGraphile, floor" from ``bench/results/three_way.json``
(``python -m bench.three_way``). Every other section of the page (the "Ingestion" write-up of
``bench/ingest_bench.py`` in particular) is kept as it is; when there is no "Ingestion" section yet, a short
one is generated from ``bench/results/ingest.json``.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DOC = ROOT / "docs" / "benchmarks.md"

TITLE = "# Benchmarks"
PREAMBLE = """\
# Benchmarks

What the gateway does on one small machine, measured by scripts in `bench/` whose raw results are in
`bench/results/`. Everything runs on the same machine: PostgreSQL, RabbitMQ, Redis, the gateway and the load
generators share its cores, so every figure includes that competition.

Rerun everything (installs wrk when missing, starts the services, about an hour):

```sh
make bench
```

or one part at a time:

```sh
.venv/bin/python -m bench.ingest_bench     # Ingestion        -> bench/results/ingest.json
.venv/bin/python -m bench.graphql_bench    # Usage queries, GraphQL, Publish-to-visible -> bench/results/graphql.json
.venv/bin/python -m bench.report           # this page from the results
```
"""
CONNECTION = "PostgreSQL over loopback TCP"
THREE_WAY = "Three-way: gateway, PostGraphile, floor"
OWN = ("Usage queries", THREE_WAY, CONNECTION, "GraphQL", "Publish-to-visible")
ORDER = ("Ingestion", *OWN)


# --- page assembly ------------------------------------------------------------------------------------------------


def split_sections(text: str) -> tuple[str, dict[str, str]]:
    """(preamble, {heading: section text including its "## " line}) in the page's order."""
    parts = re.split(r"(?m)^(?=## )", text)
    preamble = "" if not parts or parts[0].startswith("## ") else parts[0]
    sections = {part.splitlines()[0][3:].strip(): part.rstrip() + "\n" for part in parts if part.startswith("## ")}
    return preamble, sections


def assemble(existing: str, generated: dict[str, str]) -> str:
    preamble, sections = split_sections(existing)
    for heading, body in generated.items():
        if heading in OWN or heading not in sections:
            sections[heading] = body.rstrip() + "\n"
    ordered = [h for h in ORDER if h in sections] + [h for h in sections if h not in ORDER]
    head = preamble.rstrip() + "\n" if preamble.strip() else PREAMBLE
    return head + "\n" + "\n".join(sections[h] for h in ordered)


# --- formatting helpers -------------------------------------------------------------------------------------------


def table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def num(value: Any, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, int) or (isinstance(value, float) and value >= 100):
        return f"{value:,.0f}"
    return f"{value:,.{digits}f}"


def met(flag: bool | None) -> str:
    return "–" if flag is None else ("**met**" if flag else "**not met**")


def target_rows(results: dict[str, Any], names: tuple[str, ...]) -> list[list[Any]]:
    rows = []
    for row in results.get("summary", {}).get("targets", []):
        if any(row["what"].startswith(n) for n in names):
            sign = "≤" if row["better"] == "lower" else "≥"
            unit = "" if row["unit"] in ("share", "x") else f" {row['unit']}"
            value = f"{row['value']:.0%}" if row["unit"] == "share" else f"{row['value']}{unit}"
            target = f"{row['target']:.0%}" if row["unit"] == "share" else f"{row['target']}{unit}"
            if row["unit"] == "x":
                value, target = f"{row['value']}×", f"{row['target']}×"
            rows.append([row["what"], value, f"{sign} {target}", met(row["met"])])
    return rows


def header_facts(results: dict[str, Any]) -> str:
    env, git = results.get("environment", {}), results.get("git", {})
    dirty = f", {len(git.get('dirty_files', []))} files uncommitted" if git.get("dirty_files") else ""
    return (
        f"Measured {results.get('date', '?')} at commit `{str(git.get('commit', '?'))[:12]}`{dirty}; "
        f"{env.get('cpus')} cores ({env.get('cpu_model')}), {env.get('memory_gb')} GB, {env.get('postgres')}, "
        f"Python {env.get('python')}, {env.get('wrk')}; {connection_words(results)}. "
        "Raw figures: `bench/results/graphql.json`.\n"
    )


def connection_words(results: dict[str, Any]) -> str:
    facts = results.get("postgres_connection") or {}
    if not facts:
        return "PostgreSQL over TCP"
    if facts["transport"] == "unix socket":
        return "PostgreSQL over its Unix socket"
    return f"PostgreSQL over TCP (congestion control {facts.get('tcp_congestion_control')})"


def disturbed_note(entries: Sequence[dict[str, Any] | None]) -> str:
    bad = [e for e in entries if e and e.get("disturbed")]
    if not bad:
        return ""
    return (
        f"\n{len(bad)} window(s) were still disturbed by other work after the reruns (see `cpu.foreign_cores` in "
        "the results); their figures are less reliable.\n"
    )


# --- the generated sections ---------------------------------------------------------------------------------------


def usage_section(results: dict[str, Any]) -> str:
    single = results.get("usage_single", {})
    concurrent = results.get("usage_concurrent")
    out = ["## Usage queries\n\n"]
    out.append("```sh\n.venv/bin/python -m bench.graphql_bench [--events 10000000] [--keep-db] [--only a,b,c]\n```\n")
    out.append(header_facts(results))
    out.append(_data_paragraph(results.get("dataset", {})))
    out.append(_method_paragraph(results.get("settings", {})))
    out.append(USAGE_QUERY_BLOCK)
    out.append(_single_part(single))
    if concurrent:
        out.append(_concurrent_part(concurrent))
    rows = target_rows(results, ("usage", "gateway /", "16 clients"))
    if rows:
        out.append("\n**Targets:**\n\n" + table(["what", "measured", "target", ""], rows))
    entries = [e.get(k) for e in single.values() for k in ("gateway", "floor")]
    if concurrent:
        entries += [concurrent.get("gateway"), concurrent.get("floor")]
    out.append(disturbed_note([e for e in entries if e]))
    return "".join(out)


USAGE_QUERY_BLOCK = (
    "\n```graphql\nusage(orgId: $largest, range: $range, granularity: $g, groupBy: [MODEL]) {\n"
    "  totals { requests inputTokens cachedInputTokens outputTokens totalTokens spend }\n"
    "  series { start end group { model } requests inputTokens cachedInputTokens outputTokens totalTokens spend }\n"
    "  unpricedModels\n}\n```\n"
)
SINGLE_LABELS = {"hour_30d": "HOUR, last 30 days", "day_30d": "DAY, last 30 days", "day_365d": "DAY, last 365 days"}
SINGLE_HEADER = [
    "query", "buckets", "response", "gateway", "floor", "gateway ÷ floor (p50 / p99)", "gateway req/s",
    "floor queries/s", "DB transactions per request", "gateway GC: ms per request, longest pause",
]  # fmt: skip
CONCURRENT_HEADER = [
    "", "requests/s", "p50 ms", "p99 ms", "cores: gateway / postgres / client", "new DB sessions per request",
]  # fmt: skip


def _data_paragraph(data: dict[str, Any]) -> str:
    params = data.get("params", {})
    load = (
        f"loaded in {num(data.get('load_s'))} s ({num(data.get('load_events_per_s'))} events/s through "
        f"`EventWriter`), rolled up in {num(data.get('rollup_s'))} s, VACUUM ANALYZE {num(data.get('vacuum_s'))} s"
        if not data.get("reused")
        else f"reused from an earlier run (loaded {data.get('loaded_at')}: {num(data.get('load_s'))} s, "
        f"{num(data.get('load_events_per_s'))} events/s; rollup {num(data.get('rollup_s'))} s)"
    )
    return (
        f"\n**Data.** {num(data.get('events_loaded'))} events over the {params.get('days')} days before the load, "
        f"{num(params.get('orgs'))} orgs with Zipf volume (s = {params.get('zipf_s')}), {params.get('models')} models "
        f"(1–4 per org), demo prices (`gateway.seed.demo_prices`); {load}; database {data.get('database_size')}. "
        f"The measured org is the largest, `{data.get('largest_org')}`: {num(data.get('largest_org_events'))} events, "
        f"models {', '.join(data.get('largest_org_models', []))}.\n"
    )


def _method_paragraph(settings: dict[str, Any]) -> str:
    return (
        "\n**Method.** The gateway (`create_app(settings, roles={api})`, uvicorn with uvloop and httptools, one "
        "worker, log level WARNING, Redis freshness cache) runs in a child process; wrk sends the query (POST, a Lua "
        "script) with an `org_admin` token and reports its latency histogram. The *floor* is the same SQL with the "
        "same arguments (`db.usage.usage_statement`, same rollup watermark and prices) from an asyncpg client in the "
        f"benchmark's process, rows turned into dicts and encoded with orjson. Every window lasts "
        f"{settings.get('window_s')} s after a {settings.get('warmup_s')} s warm-up. The query:\n"
    )


def _single_row(label: str, entry: dict[str, Any]) -> list[Any]:
    q, gw, fl = entry["query"], entry["gateway"], entry["floor"]
    ratio = entry.get("ratio_gateway_to_floor", {})
    return [
        label, num(q["buckets"]), f"{q['response_bytes'] / 1024:,.0f} KiB",
        f"{num(gw['latency_ms']['p50'])} / {num(gw['latency_ms']['p90'])} / {num(gw['latency_ms']['p99'])}",
        f"{num(fl['latency_ms']['p50'])} / {num(fl['latency_ms']['p90'])} / {num(fl['latency_ms']['p99'])}",
        f"{ratio.get('p50', '–')}× / {ratio.get('p99', '–')}×", num(gw["rps"]), num(fl["rps"]),
        num(gw.get("database", {}).get("transactions_per_request"), 2), gc_cell(gw),
    ]  # fmt: skip


def _single_part(single: dict[str, Any]) -> str:
    rows = [_single_row(label, single[key]) for key, label in SINGLE_LABELS.items() if single.get(key)]
    if not rows:
        return ""
    out = "\n**One client, sequential** (latency in ms: p50 / p90 / p99):\n\n" + table(SINGLE_HEADER, rows)
    first = single.get("hour_30d", {}).get("query", {})
    if first:
        out += (
            f"\nThe HOUR answer covers {num(first.get('requests_in_range'))} requests; the floor returns "
            f"{num(first.get('floor_rows'))} rows ({first.get('floor_json_bytes', 0) / 1024:,.0f} KiB of JSON) of "
            f"which {first.get('rollup_hours_in_plan')} hours come from `usage_hourly`.\n"
        )
    return out


def _concurrent_part(concurrent: dict[str, Any]) -> str:
    gw, fl = concurrent["gateway"], concurrent["floor"]
    rows = [
        ["gateway (wrk)", num(gw["rps"]), num(gw["latency_ms"]["p50"]), num(gw["latency_ms"]["p99"]),
         _cores(gw, "api_gateway", "wrk"), num(gw.get("database", {}).get("new_sessions_per_request"), 2)],
        ["floor (asyncpg pool)", num(fl["rps"]), num(fl["latency_ms"]["p50"]), num(fl["latency_ms"]["p99"]),
         _cores(fl, None, "bench"), num(fl.get("database", {}).get("new_sessions_per_request"), 2)],
    ]  # fmt: skip
    return (
        f"\n**{concurrent['clients']} concurrent clients** (HOUR, last 30 days):\n\n"
        + table(CONCURRENT_HEADER, rows)
        + f"\nGateway throughput is {concurrent['throughput_share_of_floor']:.0%} of the floor's.\n"
    )


def gc_cell(entry: dict[str, Any]) -> str:
    gc = entry.get("api_gc") or {}
    if not gc:
        return "–"
    return f"{num(gc['ms_per_request'], 2)}, {num(max(gc['longest_ms']), 0)} ms"


def _cores(entry: dict[str, Any], server: str | None, client: str) -> str:
    cores = entry.get("cpu", {}).get("cores_used", {})
    first = num(cores.get(server), 2) if server else "–"
    return f"{first} / {num(cores.get('postgres'), 2)} / {num(cores.get(client), 2)}"


def graphql_section(results: dict[str, Any]) -> str:
    out = ["## GraphQL\n\n"]
    out.append("```sh\n.venv/bin/python -m bench.graphql_bench --keep-db --only d,f\n```\n")
    trivial = results.get("trivial")
    if trivial:
        out.append(_trivial_part(results, trivial))
    profile = results.get("profile")
    if profile and "error" not in profile:
        out.append(_profile_part(profile))
    trivial_profile = results.get("profile_trivial")
    if trivial_profile and "error" not in trivial_profile:
        areas = ", ".join(f"{r['function']} {r['share']:.0%}" for r in trivial_profile["by_area_self"][:8])
        inclusive = ", ".join(
            f"{r['function']} {r['share']:.0%}" for r in trivial_profile["by_area_total"][:10] if r["share"] < 0.97
        )
        out.append(
            f"\nUnder {trivial_profile['under']} ({trivial_profile['rps_under_profiler']} req/s under the profiler, "
            f"`bench/results/graphql_profile_trivial.txt`), self time by area: {areas}. Inclusive: {inclusive}.\n"
        )
    return "".join(out)


def _trivial_part(results: dict[str, Any], trivial: dict[str, Any]) -> str:
    out = [
        f"\n**Trivial query against a plain endpoint of the same process**, {trivial['connections']} "
        "connections (wrk). `/bench/plain` is a Starlette route added to the gateway's app, so it passes the "
        "gateway's middleware (request id and access log, OpenTelemetry); `/bench/bare` is the same handler "
        "outside that middleware.\n\n"
    ]
    rows = []
    for key, label in (("viewer", f"`{trivial['viewer_query']}`"), ("plain", "`/bench/plain`"),
                       ("bare", "`/bench/bare`")):  # fmt: skip
        entry = trivial[key]
        rows.append([label, num(entry["rps"]), num(entry["latency_ms"]["p50"]), num(entry["latency_ms"]["p99"]),
                     num(entry["cpu"]["cores_used"].get("api_gateway"), 2)])  # fmt: skip
    out.append(table(["endpoint", "requests/s", "p50 ms", "p99 ms", "gateway cores"], rows))
    out.append(
        f"\nThe trivial query runs at {trivial['viewer_share_of_plain']:.0%} of `/bench/plain`'s rate and "
        f"{trivial['viewer_share_of_bare']:.0%} of `/bench/bare`'s; the middleware alone leaves "
        f"`/bench/plain` at {trivial['plain_share_of_bare']:.0%} of `/bench/bare`.\n"
    )
    rows = target_rows(results, ("trivial",))
    if rows:
        out.append("\n**Target:**\n\n" + table(["what", "measured", "target", ""], rows))
    out.append(disturbed_note([trivial.get(k) for k in ("viewer", "plain", "bare")]))
    return "".join(out)


def _profile_part(profile: dict[str, Any]) -> str:
    return (
        f"\n**Profile.** py-spy (100 Hz, {profile['duration_s']} s) of the gateway process under "
        f"{profile['under']} ({profile['rps_under_profiler']} req/s under the profiler; the process was busy "
        f"{profile['busy_share_of_one_core']:.0%} of the time). Top functions: "
        f"`bench/results/graphql_profile.txt`; collapsed stacks: `bench/results/graphql_profile_raw.txt`.\n\n"
        + table(
            ["self time by area", "share"], [[r["function"], f"{r['share']:.0%}"] for r in profile["by_area_self"][:10]]
        )
        + "\n"
        + table(
            ["self time by function", "share"],
            [[f"`{r['function']}`", f"{r['share']:.0%}"] for r in profile["top_self"][:12]],
        )
        + "\nSelf time of the event loop's frame (`Runner.run`) is time in uvloop's native code: socket reads and "
        "writes, callbacks. `<string>` frames are code made with `exec`: dataclass `__init__`s and the compiled "
        "list projectors of `schema/execution.py`.\n"
    )


def visible_section(results: dict[str, Any]) -> str:
    entry = results.get("publish_to_visible")
    out = ["## Publish-to-visible\n\n"]
    out.append("```sh\n.venv/bin/python -m bench.graphql_bench --keep-db --only e\n```\n")
    if not entry:
        return "".join(out) + "\nNot measured yet.\n"
    publish = entry.get("publish", {})
    out.append(
        f"\n**Method.** An ingest gateway (`serve --role ingest,rollup`, default settings, its own AMQP prefix) "
        f"writes into the benchmark's database while {num(publish.get('events_per_s'))} events/s are published for "
        f"{num(publish.get('seconds'))} s: background events for 200 other orgs in "
        f"{publish.get('background_message_events')}-event messages, and every "
        f"{entry['probe_every_s'] * 1000:.0f} ms one single-event *probe* for a dedicated org (publisher confirms, "
        f"1,000 in flight). The API is asked every {entry['poll_every_s'] * 1000:.0f} ms for that org's `usage` "
        "(MINUTE, last hour) `totals.requests`. Probes commit in publish order, so probe *k* is visible once the "
        "count reaches *k*: lag = the arrival of that poll's response − the probe's publish time (wall clock). "
        "The previous poll's send time bounds it from below.\n\n"
    )
    rows = []
    for key, label in (("lag_s", "publish → visible in the API"), ("lag_s_after_5s", "the same, after the first 5 s"),
                       ("lag_lower_bound_s", "lower bound (previous poll sent)"),
                       ("publish_to_commit_s", "publish → commit (database)")):  # fmt: skip
        lag = entry.get(key, {})
        if lag.get("count"):
            rows.append([label, lag["count"], num(lag["p50"], 3), num(lag["p90"], 3), num(lag["p99"], 3),
                         num(lag["max"], 3)])  # fmt: skip
    out.append(table(["seconds", "probes", "p50", "p90", "p99", "max"], rows))
    poll = entry.get("poll_latency_ms", {})
    cores = entry.get("cpu", {}).get("cores_used", {})
    out.append(
        f"\nPolls: {num(entry.get('polls'))}, answered in p50 {num(poll.get('p50'))} ms / p99 {num(poll.get('p99'))} "
        f"ms. Cores during the window: ingest gateway {num(cores.get('ingest_gateway'), 2)}, API "
        f"{num(cores.get('api_gateway'), 2)}, PostgreSQL {num(cores.get('postgres'), 2)}, RabbitMQ "
        f"{num(cores.get('rabbitmq'), 2)}, publisher and poller {num(cores.get('bench'), 2)}.\n"
    )
    rows = target_rows(results, ("publish-to-visible",))
    if rows:
        out.append("\n**Target:**\n\n" + table(["what", "measured", "target", ""], rows))
    out.append(disturbed_note([entry]))
    out.append(CAVEATS)
    return "".join(out)


CAVEATS = """
### Caveats (usage, GraphQL, publish-to-visible)

- Two cores run everything: wrk or the asyncpg client, PostgreSQL, Redis, RabbitMQ and the gateway. Ratios
  are fairer than absolute figures, but the floor's client (Python) and the gateway's (wrk, C) do not cost
  the same: the floor includes asyncpg's decoding and orjson in Python, the gateway's figures include HTTP.
- wrk is a closed loop: latency under load is the time of requests that were sent, with no correction for
  coordinated omission.
- The data ends when it was loaded; a reused database (`--keep-db`) holds fewer events in "the last 30 days" as
  it ages (the results record when it was loaded). Zipf s = 1.1 over 1,000 orgs gives the largest org about 18%
  of all events.
- The freshness cache (Redis, 5 s TTL) is hit by most requests; a miss costs one more query.
- DB transactions and sessions per request come from `pg_stat_database`, which backends flush about once a
  second: they are approximate.
- Figures of the profiled window are not used for anything else (py-spy slows the process it samples).
- PostgreSQL is reached over its Unix socket; over loopback TCP see the section on it above.
"""


def ingest_section(ingest: dict[str, Any]) -> str:
    """A short stand-in built from bench/results/ingest.json, used only when the page has no Ingestion section."""
    summary = ingest.get("summary", {})
    rows = []
    for kind, label in (("batched", "100-event messages"), ("single", "single-event messages")):
        entry = summary.get(kind)
        if entry:
            best = ", ".join(f"{k} {num(v)}" for k, v in (entry.get("best_settings") or {}).items())
            rows.append([label, num(max(entry["at_defaults_events_per_s"] or [0])), met(entry["met_at_defaults"]),
                         f"{num(entry['best_events_per_s'])} ({best})", met(entry["met_at_best"]),
                         f"≥ {num(entry['target_events_per_s'])}"])  # fmt: skip
    out = [
        "## Ingestion\n\n",
        "```sh\n.venv/bin/python -m bench.ingest_bench\n```\n\n",
        "Summary generated by `bench/report.py` from `bench/results/ingest.json` (the ingestion benchmark's own "
        "write-up goes here). "
        f"Measured {ingest.get('date', '?')} at commit `{str(ingest.get('git', {}).get('commit', '?'))[:12]}`; "
        f"{connection_words(ingest)}.\n\n",
    ]
    if rows:
        headers = ["messages", "events/s at defaults", "", "best events/s (settings)", "", "target"]
        out.append(table(headers, rows))
    latency = summary.get("latency", {}).get("runs", {})
    if latency:
        out.append("\n")
        out.append(
            table(
                ["latency run", "events/s published", "p50 s", "p99 s", "max s", "target p99", ""],
                [
                    [
                        k,
                        num(v.get("publish_events_per_s")),
                        v["p50"],
                        v["p99"],
                        v["max"],
                        f"≤ {summary['latency']['target_p99_s']}",
                        met(v["met"]),
                    ]
                    for k, v in latency.items()
                ],
            )
        )
    return "".join(out)


def connection_section(main: dict[str, Any], others: dict[str, dict[str, Any]]) -> str:
    """The usage figures of the main run beside runs over loopback TCP (``bench/results/graphql_tcp*.json``)."""
    out = [f"## {CONNECTION}\n\n", CONNECTION_TEXT]
    rows = []
    for name, results in {"graphql.json": main, **others}.items():
        facts = results.get("postgres_connection") or {"transport": "tcp"}
        single = results.get("usage_single", {})
        hour = single.get("hour_30d", {})
        concurrent = results.get("usage_concurrent") or {}
        targets = results.get("summary", {}).get("targets", [])
        missed = [t["what"] for t in targets if not t["met"]]

        def ratio(key: str, entry: dict[str, Any]) -> str:
            value = entry.get("ratio_gateway_to_floor", {}).get(key)
            return "–" if value is None else f"{value}×"

        rows.append([
            f"`{name}`", facts["transport"], facts.get("tcp_congestion_control") or "–",
            f"`{str(results.get('git', {}).get('commit', '?'))[:7]}`",
            f"{num(hour.get('gateway', {}).get('latency_ms', {}).get('p50'))} / "
            f"{num(hour.get('gateway', {}).get('latency_ms', {}).get('p99'))}",
            f"{ratio('p50', hour)} / {ratio('p99', hour)}",
            " / ".join(ratio("p99", single.get(k, {})) for k in ("day_30d", "day_365d")),
            f"{concurrent['throughput_share_of_floor']:.0%}" if concurrent else "–",
            f"{len(targets) - len(missed)} of {len(targets)}" + (f" (missed: {'; '.join(missed)})" if missed else ""),
        ])  # fmt: skip
    out.append(
        "\n"
        + table(
            [
                "results",
                "transport",
                "congestion control",
                "commit",
                "HOUR 30 d p50 / p99 ms",
                "HOUR ÷ floor p50 / p99",
                "DAY 30 d / 365 d ÷ floor p99",
                "16 clients ÷ floor",
                "targets met",
            ],
            rows,
        )
    )
    return "".join(out)


CONNECTION_TEXT = """\
The main run reaches PostgreSQL over its Unix socket (`bench/postgres.py`; `ANALYTICS_BENCH_POSTGRES_URL`
chooses). Over loopback TCP on these machines, whose congestion control is BBR, a few requests in every 30 s
take 60–100 ms longer, and those set the TCP run's p99s. The cause is in the kernel: BBR paces PostgreSQL's
sending, and now and then it holds back the rest of a ~480 kB answer. With `perf record -e
sched:sched_switch,sched:sched_wakeup,irq:softirq_entry -a` the gateway sleeps on its socket and PostgreSQL
has finished writing. Both CPUs are mostly idle. After 64 ms an `HRTIMER` softirq (the pacing timer) delivers
the next segment, and the gateway wakes up.

A sequential client, on the same data and the same gateway process, counted requests over 45 ms:

- 7 to 10 in 20–30 s under `bbr`;
- none in three 30 s runs under `cubic` (`sysctl -w net.ipv4.tcp_congestion_control=cubic`, which new
  connections take);
- none over the socket.

Neither PostgreSQL nor asyncpg lets a client choose the server's congestion control, so the host decides. A
gateway on its database's host should use the socket, or loopback TCP with `cubic`, which answered the large
query about 1.5 ms sooner at p50 than the socket did (docs/configuration.md). A remote database is a real network
path, where pacing is what BBR is for. The TCP runs below use the same code and data, started as
`ANALYTICS_BENCH_POSTGRES_URL='postgresql://postgres@127.0.0.1:5432/postgres' .venv/bin/python -m
bench.graphql_bench --keep-db --only a,b,c,d,e --out bench/results/graphql_tcp_<congestion control>.json`.
For the cubic run the system setting was changed for the run and then put back.
"""


THREE_WAY_ROWS = (
    ("gateway", "this gateway, `usage(HOUR, groupBy: [MODEL]) { series { start group { model } requests inputTokens "
     "cachedInputTokens outputTokens } }`"),
    ("postgraphile", "PostGraphile {version} over a SETOF SQL function on `usage_hourly_model`"),
    ("floor", "floor: the plain `SELECT … FROM usage_hourly_model … ORDER BY hour, model` via asyncpg, rows to orjson"),
    ("dashboard", "this gateway, the full dashboard query (totals and series with spend, unpricedModels, freshness)"),
)  # fmt: skip


def three_way_section(results: dict[str, Any]) -> str:
    """The three-way table (medians of the interleaved rounds) from ``bench/results/three_way.json``."""
    env, git, question = results.get("environment", {}), results.get("git", {}), results.get("question", {})
    answers, settings, meds = results.get("answers", {}), results.get("settings", {}), results["medians"]
    dirty = f", {len(git.get('dirty_files', []))} files uncommitted" if git.get("dirty_files") else ""
    rounds = len(results.get("rounds", []))
    conns = settings.get("connections", 16)
    rows = []
    for key, label in THREE_WAY_ROWS:
        m = meds.get(key)
        if m is None:
            continue
        cpu = f"{num(m.get('server_cpu_ms'))} + {num(m.get('postgres_cpu_ms'))} = {num(m.get('cpu_ms'))}"
        single = f"{num(m.get('single_p50_ms'))} / {num(m.get('single_p99_ms'))}"
        cores = f"{num(m.get('server_cores'), 2)} + {num(m.get('postgres_cores'), 2)}"
        name = label.replace("{version}", str(env.get("postgraphile", "?")))
        rps = "–" if m.get("rps") is None else f"{m['rps']:,.1f}"
        rows.append([name, rps, num(m.get("p50_ms")), num(m.get("p99_ms")), cpu, cores, single])
    header = ["", "req/s", "p50 ms", "p99 ms", "CPU ms per request: server + PostgreSQL", "cores: server + PostgreSQL",
              "single connection p50 / p99 ms"]  # fmt: skip
    ratio = results.get("ratios", {})
    foreign = [m.get("foreign_cores") for m in meds.values() if m.get("foreign_cores") is not None]
    busy = max(foreign) if foreign else None
    parts = [
        f"## {THREE_WAY}\n",
        f"Measured {results.get('date', '?')} at commit `{str(git.get('commit', '?'))[:12]}`{dirty}; "
        f"{env.get('cpus')} cores ({env.get('cpu_model')}), {env.get('postgres')}, Python {env.get('python')}, "
        f"Node {env.get('node')}, {env.get('wrk')}; {connection_words(results)} for all three. "
        "Raw figures: `bench/results/three_way.json`.\n",
        f"**Question.** `{question.get('org')}`, 30 days of hourly usage by model ending at the rollup watermark "
        f"({question.get('from')} .. {question.get('to')}): {num(answers.get('rows'))} rows "
        f"({answers.get('hours')} hours × {len(answers.get('models', []))} models), checked identical row by row "
        f"from all four before measuring. Data: {num(results.get('dataset', {}).get('params', {}).get('events'))} "
        f"events, 1,000 orgs (`{results.get('dataset', {}).get('database')}`).\n",
        f"Medians of {rounds} interleaved rounds; in each, every system gets a warm-up and wrk -t1 -c{conns} for "
        f"{num(settings.get('window_s'))} s, then wrk -t1 -c1 for {num(settings.get('single_window_s'))} s. CPU per "
        "request is the server's process tree plus PostgreSQL's processes (utime + stime from /proc over the "
        "window) divided by the requests; cores are the same CPU over the window's wall time.\n",
        table(header, rows),
    ]
    if ratio:
        floor = ratio.get("gateway_rps_share_of_floor")
        parts.append(
            f"The gateway answers {ratio.get('gateway_rps_over_postgraphile', '–')}× PostGraphile's requests/s at "
            f"{ratio.get('gateway_cpu_over_postgraphile', '–')}× its CPU per request"
            + ("" if floor is None else f", and {floor:.0%} of the floor's requests/s")
            + ".\n"
        )
    parts.append(
        f"**Servers.** Gateway: `{settings.get('gateway')}`, every other setting at its default (log level, "
        f"workers, database pool). PostGraphile: `{settings.get('postgraphile')}` in bench/peer, the amber preset, "
        "the pg adaptor with pg's default pool (10 connections), only the `peer` schema of bench/peer/schema.sql (a "
        "view over `usage_hourly_model` and `usage_since(org, since)`), `Promise.withResolvers` polyfilled on Node "
        f"20. Floor: {settings.get('floor')}, a pool of {settings.get('floor_pool')}.\n"
    )
    parts.append(
        f"Other work on the machine used up to {num(busy, 2)} cores during the concurrent windows (median per "
        "system): the figures are indicative unless that is near 0. Rerun: "
        "`.venv/bin/python -m bench.three_way --keep-db`, then `.venv/bin/python -m bench.report`.\n"
    )
    return "\n".join(parts)


def generate(graphql: dict[str, Any] | None, ingest: dict[str, Any] | None,
             others: dict[str, dict[str, Any]] | None = None,
             three_way: dict[str, Any] | None = None) -> dict[str, str]:  # fmt: skip
    sections: dict[str, str] = {}
    if ingest:
        sections["Ingestion"] = ingest_section(ingest)
    if graphql:
        sections["Usage queries"] = usage_section(graphql)
        if others:
            sections[CONNECTION] = connection_section(graphql, others)
        sections["GraphQL"] = graphql_section(graphql)
        sections["Publish-to-visible"] = visible_section(graphql)
    if three_way and three_way.get("medians"):
        sections[THREE_WAY] = three_way_section(three_way)
    return sections


def _load(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n")[0])
    parser.add_argument("--graphql", default=str(RESULTS / "graphql.json"), help="GraphQL benchmark results")
    parser.add_argument("--ingest", default=str(RESULTS / "ingest.json"), help="ingestion benchmark results")
    parser.add_argument("--three-way", default=str(RESULTS / "three_way.json"), help="three-way benchmark results")
    parser.add_argument("--out", default=str(DOC), help="the page to write (its other sections are kept)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    existing = out.read_text() if out.exists() else ""
    graphql = Path(args.graphql)
    others = {p.name: json.loads(p.read_text()) for p in sorted(graphql.parent.glob("graphql_tcp*.json"))}
    generated = generate(_load(graphql), _load(Path(args.ingest)), others, _load(Path(args.three_way)))
    page = assemble(existing, generated)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
