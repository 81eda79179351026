"""Scenario (e), publish-to-visible: an ingest gateway (``serve --role ingest,rollup``, its own AMQP prefix) on
the benchmark's database; steady publishing with a probe for a dedicated org every 200 ms while the API is
polled every 50 ms for that org's MINUTE totals. Probe k is visible when ``totals.requests >= k``."""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import sys
import time
from typing import Any

from bench.api.probes import (
    PROBE_ORG_PREFIX,
    Poll,
    Steady,
    background_bodies,
    poll_probe_org,
    probe_commits,
    probe_lags,
    publish_steady,
    remove_publish_events,
)
from bench.api.queries import token_for
from bench.api.run import Run
from bench.api.server import READY_TIMEOUT_S, gateway_env
from bench.harness.broker import declare_topology, remove_topology
from bench.harness.cpu import wait_quiet
from bench.harness.output import say
from bench.harness.servers import Server, free_port, log_problems, start_server, stop_server
from bench.harness.services import AMQP_URL, REDIS_URL
from bench.harness.stats import latency_summary_ms, seconds_summary

PROBE_EVERY_S = 0.2
POLL_EVERY_S = 0.05


@dataclasses.dataclass
class Visibility:
    """One publish-to-visible scenario: what each attempt publishes and measures."""

    run: Run
    prefix: str
    probe_org: str = ""
    token: str = ""
    background: list[bytes] = dataclasses.field(default_factory=list)

    @property
    def seconds(self) -> float:
        return float(self.run.args.visible_seconds)

    async def prepare(self) -> None:
        """Before each attempt (outside its window): a new probe org, and background events never sent before."""
        self.probe_org = f"{PROBE_ORG_PREFIX}_{secrets.token_hex(4)}"
        self.token = token_for(self.run.secret, self.probe_org)
        bg_events = int((self.run.args.rate - 1 / PROBE_EVERY_S) * self.seconds)
        self.background = await asyncio.to_thread(
            background_bodies, bg_events, self.run.args.bg_batch, self.seconds, secrets.randbelow(2**31)
        )
        await wait_quiet(30, self.run.args.quiet_threshold)

    async def measure(self) -> dict[str, Any]:
        """Publish while polling; the lags once every probe was seen (or 30 s after publishing stopped)."""
        polls: list[Poll] = []
        steady = Steady(self.background, self.run.args.bg_batch, self.run.args.rate, self.probe_org, PROBE_EVERY_S,
                        [])  # fmt: skip
        stop = asyncio.Event()
        poller = asyncio.create_task(
            poll_probe_org(self.run.api.base_url, self.probe_org, self.token, POLL_EVERY_S, polls, stop)
        )
        try:
            published = await publish_steady(self.prefix, steady, self.seconds)
            deadline = time.monotonic() + 30
            while (not polls or polls[-1].count < len(steady.probes)) and time.monotonic() < deadline:
                if poller.done():
                    poller.result()
                await asyncio.sleep(0.1)  # the poller's list grows; there is no event to await
        finally:
            stop.set()
            await poller
        return figures(self.probe_org, published, steady.probes, polls)


def figures(probe_org: str, published: dict[str, Any], probes: list[float], polls: list[Poll]) -> dict[str, Any]:
    """What a window of publish-to-visible records."""
    lags = probe_lags(probes, polls)
    by = [x["visible_by"] for x in lags]
    after = [x["visible_after"] for x in lags]
    poll_s = [(p.received - p.sent) for p in polls]
    warm = [x["visible_by"] for x in lags if x["published"] >= probes[0] + 5] if probes else []
    return {
        "probe_org": probe_org,
        "publish": published,
        "probes_published": len(probes),
        "probes_seen": polls[-1].count if polls else 0,
        "polls": len(polls),
        "poll_latency_ms": latency_summary_ms(poll_s),
        "lag_s": seconds_summary(by),
        "lag_s_after_5s": seconds_summary(warm),
        "lag_lower_bound_s": seconds_summary(after),
        "latency_ms": {k: v * 1000 for k, v in seconds_summary(by).items() if k != "count"},
        "rps": published["events_per_s"],
    }


async def scenario_publish_to_visible(run: Run) -> None:
    """(e): steady publishing through an ingest gateway while the API is polled for a probe org."""
    rate, seconds, bg_batch = run.args.rate, run.args.visible_seconds, run.args.bg_batch
    say(f"== publish-to-visible: {rate:,} events/s for {seconds} s (background in {bg_batch}-event messages, "
        f"a probe every {PROBE_EVERY_S * 1000:.0f} ms, polls every {POLL_EVERY_S * 1000:.0f} ms)")  # fmt: skip
    removed = await remove_publish_events(run.dataset.url)
    if removed:
        say(f"   removed {removed:,} events of earlier publish-to-visible runs")
    prefix = f"bench_gql_{secrets.token_hex(4)}."
    entry: dict[str, Any] = {
        "amqp_prefix": prefix, "rate_target": rate, "seconds_target": seconds, "probe_every_s": PROBE_EVERY_S,
        "poll_every_s": POLL_EVERY_S,
    }  # fmt: skip
    try:
        await declare_topology(prefix)  # the queue exists before anything is published
        entry |= await _with_ingest_gateway(run, Visibility(run, prefix))
        lag, commit = entry["lag_s"], entry["publish_to_commit_s"]
        say(f"   publish-to-visible: p50 {lag.get('p50')} s  p99 {lag.get('p99')} s  max {lag.get('max')} s "
            f"({lag.get('count')} probes); publish-to-commit p99 {commit.get('p99')} s")  # fmt: skip
    finally:
        await remove_topology(prefix)
    run.results["publish_to_visible"] = entry
    run.save()


async def _with_ingest_gateway(run: Run, scenario: Visibility) -> dict[str, Any]:
    """The measured window with an ingest gateway running; its exit, its log's problems, publish-to-commit."""
    ingest = await _start_ingest(run, scenario.prefix)
    try:
        await asyncio.sleep(2)  # let start-up work settle
        named = {run.api.pid: "api_gateway", ingest.pid: "ingest_gateway"}
        entry = await run.window("publish-to-visible", scenario.measure, named, warm=scenario.prepare)
    finally:
        code = await stop_server(ingest)
    entry["ingest_gateway_exit_code"] = code
    entry["ingest_gateway_log_problems"] = log_problems(ingest.log_path)
    commits = await probe_commits(run.dataset.url)
    entry["publish_to_commit_s"] = seconds_summary(list(commits.values()))
    return entry


async def _start_ingest(run: Run, prefix: str) -> Server:
    port = free_port()
    env = gateway_env(
        ANALYTICS_DATABASE_URL=run.dataset.url, ANALYTICS_AMQP_URL=AMQP_URL, ANALYTICS_AMQP_PREFIX=prefix,
        ANALYTICS_REDIS_URL=REDIS_URL, ANALYTICS_REDIS_PREFIX=run.results["settings"]["redis_prefix"],
        ANALYTICS_PORT=str(port), ANALYTICS_LOG_LEVEL="INFO",
    )  # fmt: skip
    command = [sys.executable, "-m", "gateway.cli", "serve", "--role", "ingest,rollup"]
    return await start_server("ingest_gateway", command, env, port, run.work, READY_TIMEOUT_S)
