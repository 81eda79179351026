"""A stop always stops (issue 17): real ``serve`` processes asked to stop while the broker or the database is
gone exit within ``ANALYTICS_SHUTDOWN_GRACE_S``, lose nothing, and a second signal exits at once.

The broker goes away by deleting the test's own RabbitMQ vhost (``rabbitmqctl``); the database by a TCP proxy
between the process and PostgreSQL that the test cuts: ``refuse`` (connections reset, new ones refused: the
server is down) or ``blackhole`` (connections stay open and nothing passes: a network partition).
The export role has no worker yet, so it has no test here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Literal

import asyncpg
import pytest

from ingest.synthetic import Traffic, generate
from ingest.topology import Topology
from tests.conftest import AMQP_URL, POSTGRES_ADMIN_URL, RUN_ID
from tests.integration.ingest_support import (
    amqp_connections,
    drained,
    eventually,
    publish_mixed,
    publisher,
    unacknowledged,
)
from tests.integration.serve_support import clean_env, free_port
from tests.integration.test_ingest_faults import Ingester, Ingesters

pytestmark = pytest.mark.slow

GRACE_S = 3.0
EXIT_SLACK_S = 1.0  # the process's own exit after the grace period (interpreter teardown)


# --- a database that goes away ------------------------------------------------------------------------------


class Proxy:
    """TCP between the gateway and PostgreSQL, which the test can cut and restore."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._refusing = False
        self.held = asyncio.Event()  # set once data arrived while blackholed (a statement hangs)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._pair, "127.0.0.1", self.port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]

    def url(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    async def cut(self, how: Literal["refuse", "blackhole"]) -> None:
        if how == "blackhole":
            self._flowing.clear()
            return
        assert self._server is not None
        self._refusing = True
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        await self._server.wait_closed()

    async def restore(self) -> None:
        self._flowing.set()
        self._refusing = False
        if self._server is None or not self._server.is_serving():
            await self.start()

    async def close(self) -> None:
        self._flowing.set()
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()

    async def _pair(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self._writers.add(client_writer)
        try:
            server_reader, server_writer = await asyncio.open_connection(*self.target)
        except OSError:
            client_writer.transport.abort()
            return
        self._writers.add(server_writer)
        if self._refusing:  # cut while this pair was being accepted or connected
            for writer in (client_writer, server_writer):
                writer.transport.abort()
            return
        await asyncio.gather(
            self._pump(client_reader, server_writer), self._pump(server_reader, client_writer), return_exceptions=True
        )
        for writer in (client_writer, server_writer):
            self._writers.discard(writer)
            writer.transport.abort()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            if not self._flowing.is_set():
                self.held.set()
                await self._flowing.wait()
            writer.write(data)
            await writer.drain()
        writer.transport.abort()


@pytest.fixture
async def proxy() -> AsyncIterator[Proxy]:
    host, port = POSTGRES_ADMIN_URL.split("@", 1)[1].split("/", 1)[0].split(":")
    running = Proxy((host, int(port)))
    await running.start()
    yield running
    await running.close()


# --- a broker vhost that goes away ---------------------------------------------------------------------------


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, text=True, check=True, timeout=60)


@pytest.fixture
async def vhost() -> AsyncIterator[str]:
    name = f"test_{RUN_ID}_{uuid.uuid4().hex[:6]}"
    await asyncio.to_thread(_rabbitmqctl, "add_vhost", name)
    await asyncio.to_thread(_rabbitmqctl, "set_permissions", "-p", name, "guest", ".*", ".*", ".*")
    yield name
    with contextlib.suppress(subprocess.CalledProcessError):
        await asyncio.to_thread(_rabbitmqctl, "delete_vhost", name)


@pytest.fixture
async def pool(prefix: str, database_url: str, tmp_path: Path) -> AsyncIterator[Ingesters]:
    ingesters = Ingesters(prefix, database_url, tmp_path)
    try:
        yield ingesters
    finally:
        await ingesters.stop_all()


# --- helpers ------------------------------------------------------------------------------------------------


async def _stop_within(ingester: Ingester, limit_s: float, how: signal.Signals = signal.SIGTERM) -> float:
    """Signal the process and wait for it to exit; returns how long that took (fails past ``limit_s``)."""
    started = time.monotonic()
    ingester.process.send_signal(how)
    try:
        await asyncio.wait_for(ingester.process.wait(), limit_s)
    except TimeoutError:
        raise AssertionError(f"still running {limit_s} s after {how.name}:\n{ingester.log_tail()}") from None
    return time.monotonic() - started


def _events_logged(ingester: Ingester, event: str) -> list[dict[str, object]]:
    lines = (json.loads(line) for line in ingester.log.read_text().splitlines() if line.startswith("{"))
    return [line for line in lines if line.get("event") == event]


async def _logged(ingester: Ingester, event: str, timeout: float = 15) -> None:
    async def seen() -> bool:
        assert ingester.process.returncode is None, ingester.log_tail()
        return bool(_events_logged(ingester, event))

    await eventually(seen, timeout, f"{event} in the log")


async def _stored(database_url: str, source: str) -> tuple[int, int]:
    """(rows, distinct ids) stored for ``source``."""
    connection = await asyncpg.connect(database_url)
    try:
        row = await connection.fetchrow(
            "SELECT count(*) AS n, count(DISTINCT event_id) AS d FROM usage_events WHERE source = $1", source
        )
    finally:
        await connection.close()
    assert row is not None
    return int(row["n"]), int(row["d"])


# --- the tests ----------------------------------------------------------------------------------------------


async def test_an_ingester_whose_broker_vhost_is_gone_stops_within_the_grace_period(
    pool: Ingesters, vhost: str
) -> None:
    broker = AMQP_URL.rstrip("/") + f"/{vhost}"
    ingester = await pool.start(amqp_url=broker, shutdown_grace_s=str(GRACE_S))
    await asyncio.to_thread(_rabbitmqctl, "delete_vhost", vhost)

    async def disconnected() -> bool:
        assert ingester.process.returncode is None, ingester.log_tail()
        return not await asyncio.to_thread(amqp_connections, ingester.name)

    await eventually(disconnected, 15, "the broker to drop the ingester's connection")
    took = await _stop_within(ingester, GRACE_S + EXIT_SLACK_S + 5)
    assert took <= GRACE_S + EXIT_SLACK_S, f"{took:.1f} s:\n{ingester.log_tail()}"
    stopped = _events_logged(ingester, "ingest.stopped") + _events_logged(ingester, "ingest.stopped_with_messages_left")
    assert stopped or _events_logged(ingester, "shutdown.grace_exceeded"), ingester.log_tail()


async def test_an_ingester_with_a_batch_and_no_database_stops_in_time_and_the_batch_is_stored_once_later(
    pool: Ingesters, prefix: str, proxy: Proxy, database_url: str
) -> None:
    via_proxy = proxy.url(database_url.rsplit("/", 1)[1])
    ingester = await pool.start(database_url=via_proxy, shutdown_grace_s=str(GRACE_S))
    traffic = Traffic(seed=3, events=300, orgs=2, source=f"//test/shutdown/{uuid.uuid4().hex[:8]}")
    events = list(generate(traffic))
    await proxy.cut("refuse")
    async with publisher(prefix) as pub:
        await publish_mixed(pub, events, batch=30)
    await _logged(ingester, "ingest.write_failed")  # the batch is in hand, and cannot be committed

    async def held() -> bool:
        return bool(await asyncio.to_thread(unacknowledged, ingester.name))

    await eventually(held, 15, "the ingester to hold the messages unacknowledged")
    took = await _stop_within(ingester, GRACE_S + EXIT_SLACK_S + 5)
    assert took <= GRACE_S + EXIT_SLACK_S, f"{took:.1f} s:\n{ingester.log_tail()}"
    [left] = _events_logged(ingester, "ingest.stopped_with_messages_left")
    assert int(str(left["unacknowledged_messages"])) > 0 and "database" in str(left["reason"]), left
    assert await _stored(database_url, traffic.source) == (0, 0)

    await proxy.restore()
    successor = await pool.start(shutdown_grace_s=str(GRACE_S))
    await drained(Topology.named(prefix).queue, successor.name, 30)
    assert await _stored(database_url, traffic.source) == (traffic.events, traffic.events)


async def test_a_second_signal_exits_at_once(pool: Ingesters, prefix: str, proxy: Proxy, database_url: str) -> None:
    via_proxy = proxy.url(database_url.rsplit("/", 1)[1])
    ingester = await pool.start(database_url=via_proxy, shutdown_grace_s="60")
    await proxy.cut("blackhole")  # the drain can never finish: only the second signal ends the stop early
    async with publisher(prefix) as pub:
        await publish_mixed(pub, list(generate(Traffic(seed=4, events=50, orgs=1))), batch=10)

    await asyncio.wait_for(proxy.held.wait(), 15)  # a batch's write hangs on the lost database
    ingester.process.send_signal(signal.SIGTERM)
    await _logged(ingester, "Waiting for application shutdown.")
    took = await _stop_within(ingester, 5, signal.SIGINT)
    assert took < 2, f"{took:.1f} s"
    assert ingester.process.returncode == 128 + signal.SIGINT, ingester.process.returncode
    assert _events_logged(ingester, "shutdown.forced"), ingester.log_tail()


@pytest.mark.parametrize("how", ["refuse", "blackhole"])
async def test_a_rollup_process_without_its_database_stops_within_the_grace_period(
    how: Literal["refuse", "blackhole"], proxy: Proxy, database_url: str, tmp_path: Path
) -> None:
    env = clean_env(
        ANALYTICS_DATABASE_URL=proxy.url(database_url.rsplit("/", 1)[1]),
        ANALYTICS_ROLLUP_INTERVAL_S="0.2",
        ANALYTICS_SHUTDOWN_GRACE_S=str(GRACE_S),
    )
    log = tmp_path / "rollup.log"
    with log.open("wb") as output:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway.cli", "serve", "--role", "rollup", "--port", str(free_port()),
            env=env, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
        )  # fmt: skip
    rollup = Ingester(process, "", log)
    try:
        await _logged(rollup, "gateway.started")
        await proxy.cut(how)
        if how == "blackhole":
            await asyncio.wait_for(proxy.held.wait(), 15)  # a cycle's statement hangs
        else:
            await _logged(rollup, "worker.failed")  # a cycle failed on the lost database
        took = await _stop_within(rollup, GRACE_S + EXIT_SLACK_S + 5)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert took <= GRACE_S + EXIT_SLACK_S, f"{took:.1f} s:\n{rollup.log_tail()}"
    assert _events_logged(rollup, "gateway.stopped") or _events_logged(rollup, "shutdown.grace_exceeded")
