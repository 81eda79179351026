"""Fault injection on a real ``serve --role ingest`` process: a crash, the broker
closing the connection, the database terminating the sessions. After each
fault, once the queue is drained, every published event is stored exactly once.

Every test has its own AMQP prefix, so the session app's in-process consumer
never takes its messages, and its own event ``source`` in the shared database.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import httpx
import pytest

from ingest.synthetic import Traffic, generate, ground_truth
from ingest.topology import Topology
from tests.conftest import AMQP_URL, POSTGRES_ADMIN_URL, REDIS_URL, RUN_ID, TEST_JWT_SECRET
from tests.integration.ingest_support import (
    POLL_S,
    amqp_connections,
    drained,
    eventually,
    publish_mixed,
    publisher,
    stored,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
READY_TIMEOUT_S = 30
STOP_TIMEOUT_S = 30
DRAIN_TIMEOUT_S = 40
EVENTS = 20_000

# Small batches and a small prefetch: a backlog takes seconds to drain, long enough to inject faults into.
SLOW_DRAIN = {"ingest_batch_events": "100", "ingest_prefetch": "20"}


# --- the ingester process ---------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Ingester:
    process: asyncio.subprocess.Process
    base_url: str
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def name(self) -> str:
        """Its PostgreSQL application_name and its AMQP connection_name."""
        return f"analytics-gateway/{self.pid}"

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class Ingesters:
    """Starts ``serve --role ingest`` processes on one prefix; stops them all at teardown."""

    prefix: str
    database_url: str
    logs: Path
    started: list[Ingester] = field(default_factory=list)

    async def start(self, *, ready: bool = True, **settings: str) -> Ingester:
        """Start one with ``ANALYTICS_<SETTING>`` overrides; by default wait for ``/readyz`` 200."""
        port = _free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("ANALYTICS_")} | {
            "ANALYTICS_DATABASE_URL": self.database_url,
            "ANALYTICS_AMQP_URL": AMQP_URL,
            "ANALYTICS_REDIS_URL": REDIS_URL,
            "ANALYTICS_JWT_SECRET": TEST_JWT_SECRET,
            "ANALYTICS_AMQP_PREFIX": self.prefix,
            "ANALYTICS_REDIS_PREFIX": f"test:{RUN_ID}:{self.prefix}",
            "ANALYTICS_PORT": str(port),
        }
        env |= {f"ANALYTICS_{key.upper()}": value for key, value in settings.items()}
        log = self.logs / f"ingester-{len(self.started)}.log"
        with log.open("wb") as output:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "gateway.cli", "serve", "--role", "ingest",
                env=env, cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
            )  # fmt: skip
        ingester = Ingester(process, f"http://127.0.0.1:{port}", log)
        self.started.append(ingester)
        if ready:
            await _wait_ready(ingester)
        return ingester

    async def stop_all(self) -> None:
        for ingester in self.started:
            if ingester.process.returncode is None:
                ingester.process.send_signal(signal.SIGTERM)
        for ingester in self.started:
            try:
                await asyncio.wait_for(ingester.process.wait(), STOP_TIMEOUT_S)
            except TimeoutError:
                ingester.process.kill()
                await ingester.process.wait()


async def _wait_ready(ingester: Ingester) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    async with httpx.AsyncClient(base_url=ingester.base_url) as http:
        while time.monotonic() < deadline:
            if ingester.process.returncode is not None:
                raise AssertionError(f"serve exited with {ingester.process.returncode}:\n{ingester.log_tail()}")
            with suppress(httpx.TransportError):
                if (await http.get("/readyz")).status_code == 200:
                    return
            await asyncio.sleep(POLL_S)  # polling a server that is starting: there is no event to await
    raise AssertionError(f"serve did not become ready:\n{ingester.log_tail()}")


@pytest.fixture
async def ingesters(prefix: str, database_url: str, tmp_path: Path) -> AsyncIterator[Ingesters]:
    """Depends on ``prefix`` so the processes are stopped before the queues are deleted."""
    pool = Ingesters(prefix, database_url, tmp_path)
    try:
        yield pool
    finally:
        await pool.stop_all()


# --- traffic and checks -----------------------------------------------------------------------------------------


def _traffic(**overrides: object) -> Traffic:
    tag = uuid.uuid4().hex[:8]
    options: dict[str, object] = {"source": f"//test/faults/{tag}", "org_prefix": f"org_{tag}", "seed": 13}
    return Traffic(**(options | overrides))  # type: ignore[arg-type]


@dataclass
class Counter:
    """Counts the stored events of one source on one open connection (polled often)."""

    connection: asyncpg.Connection
    source: str

    async def __call__(self) -> int:
        return int(await self.connection.fetchval("SELECT count(*) FROM usage_events WHERE source = $1", self.source))


@pytest.fixture
async def admin() -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(POSTGRES_ADMIN_URL)
    yield connection
    await connection.close()


@asynccontextmanager
async def _counter(database_url: str, source: str) -> AsyncIterator[Counter]:
    connection = await asyncpg.connect(database_url)
    try:
        yield Counter(connection, source)
    finally:
        await connection.close()


async def _grows_past(count: Counter, floor: int, ingester: Ingester, what: str, timeout: float = 15) -> int:
    """Wait until more than ``floor`` events are stored; returns the count seen."""
    seen = floor

    async def grown() -> bool:
        nonlocal seen
        assert ingester.process.returncode is None, f"the ingester exited:\n{ingester.log_tail()}"
        seen = await count()
        return seen > floor

    try:
        await eventually(grown, timeout, what)
    except AssertionError as exc:
        raise AssertionError(f"{exc} (stored: {seen}); ingester log:\n{ingester.log_tail()}") from None
    return seen


async def _assert_exactly_once(database_url: str, events: list[dict[str, object]], source: str) -> None:
    rows = await stored(database_url, source)
    ids = [r["event_id"] for r in rows]
    expected_ids = {e["id"] for e in events}
    lost = expected_ids - set(ids)
    assert not lost, f"{len(lost)} events lost, e.g. {sorted(lost)[:5]}"
    assert len(rows) - len(set(ids)) == 0, f"{len(rows) - len(set(ids))} events stored twice"
    assert set(ids) == expected_ids
    actual: dict[str, list[int]] = {}
    for r in rows:
        sums = actual.setdefault(r["org_id"], [0, 0, 0, 0])
        for i, column in enumerate(("input_tokens", "cached_input_tokens", "output_tokens")):
            sums[i] += r[column]
        sums[3] += 1
    expected = ground_truth(events)
    assert actual == {
        org: [t.input_tokens, t.cached_input_tokens, t.output_tokens, t.requests] for org, t in expected.items()
    }


# --- faults -----------------------------------------------------------------------------------------------------


def _close_amqp_connection(pid: str) -> None:
    subprocess.run(
        ["rabbitmqctl", "-q", "close_connection", pid, "test: broker fault"],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip


async def _drained(ingester: Ingester, queue: str, timeout: float = DRAIN_TIMEOUT_S) -> None:
    """``ingest_support.drained`` for this ingester, with its log on failure."""
    try:
        await drained(queue, ingester.name, timeout, alive=lambda: ingester.process.returncode is None)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; ingester log:\n{ingester.log_tail()}") from None


async def _open_connection(ingester: Ingester, closed: list[str], timeout: float = 30) -> str:
    """Wait until the ingester has an AMQP connection that was not closed yet (it reconnected)."""
    found: list[str] = []

    async def connected() -> bool:
        assert ingester.process.returncode is None, f"the ingester exited:\n{ingester.log_tail()}"
        found[:] = [c for c in await asyncio.to_thread(amqp_connections, ingester.name) if c not in closed]
        return bool(found)

    await eventually(connected, timeout, f"an AMQP connection of {ingester.name}")
    assert len(found) == 1, found
    return found[0]


async def _terminate_sessions(admin: asyncpg.Connection, application_name: str) -> int:
    """Terminate the process's PostgreSQL sessions; returns how many were terminated."""
    terminated = await admin.fetchval(
        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) AS ok FROM pg_stat_activity "
        "WHERE application_name = $1) AS t WHERE ok",
        application_name,
    )
    return int(terminated)


# --- the tests --------------------------------------------------------------------------------------------------


@pytest.mark.slow
async def test_a_killed_ingester_loses_nothing_and_its_successor_stores_each_event_once(
    ingesters: Ingesters, prefix: str, database_url: str
) -> None:
    traffic = _traffic(events=EVENTS, orgs=15, duplicate_share=0.05)
    events = list(generate(traffic))
    async with publisher(prefix) as pub:
        await publish_mixed(pub, events)
    queue = Topology.named(prefix).queue

    async with _counter(database_url, traffic.source) as count:
        # Not waiting for /readyz: the consumer starts before the server listens, and the backlog drains in seconds.
        first = await ingesters.start(ready=False, ingest_batch_events="500")

        async def some_stored() -> bool:
            assert first.process.returncode is None, f"the ingester exited:\n{first.log_tail()}"
            return await count() > 0

        await eventually(some_stored, READY_TIMEOUT_S, "the first committed batch")
        first.process.kill()
        assert await asyncio.wait_for(first.process.wait(), STOP_TIMEOUT_S) == -signal.SIGKILL
        at_crash = await count()
        assert 0 < at_crash < traffic.events, f"{at_crash} of {traffic.events} stored at the crash: it proves nothing"

        successor = await ingesters.start(ingest_batch_events="500")
        await _drained(successor, queue)
    await _assert_exactly_once(database_url, events, traffic.source)


@pytest.mark.slow
async def test_the_ingester_reconnects_when_the_broker_closes_its_connection(
    ingesters: Ingesters, prefix: str, database_url: str
) -> None:
    traffic = _traffic(events=EVENTS, orgs=15, duplicate_share=0.05)
    events = list(generate(traffic))
    async with publisher(prefix) as pub:
        await publish_mixed(pub, events)
    queue = Topology.named(prefix).queue
    ingester = await ingesters.start(**SLOW_DRAIN)

    closed: list[str] = []
    async with _counter(database_url, traffic.source) as count:
        for _ in range(2):
            connection = await _open_connection(ingester, closed)
            await _grows_past(count, await count(), ingester, "the ingester to store events on its connection")
            await asyncio.to_thread(_close_amqp_connection, connection)
            closed.append(connection)
            assert await count() < traffic.events, "the backlog drained before the fault: make it bigger"
        await _open_connection(ingester, closed)
        await _drained(ingester, queue)

    assert ingester.process.returncode is None, ingester.log_tail()
    assert len(closed) == 2
    await _assert_exactly_once(database_url, events, traffic.source)


@pytest.mark.slow
async def test_the_ingester_survives_its_database_sessions_being_terminated(
    ingesters: Ingesters, prefix: str, database_url: str, admin: asyncpg.Connection
) -> None:
    traffic = _traffic(events=EVENTS * 3 // 5, orgs=15, duplicate_share=0.05)  # no reconnect pause: less suffices
    events = list(generate(traffic))
    async with publisher(prefix) as pub:
        await publish_mixed(pub, events)
    queue = Topology.named(prefix).queue
    ingester = await ingesters.start(**SLOW_DRAIN)

    terminated: list[int] = []
    async with _counter(database_url, traffic.source) as count:
        seen = 0
        for _ in range(4):
            seen = await _grows_past(count, seen, ingester, "the ingester to store events (again)")
            terminated.append(await _terminate_sessions(admin, ingester.name))
            seen = await count()
            assert seen < traffic.events, "the backlog drained before the fault: make it bigger"
        await _drained(ingester, queue)

    assert sum(terminated) > 0, f"no termination hit a session of {ingester.name}: {terminated}"
    assert ingester.process.returncode is None, ingester.log_tail()
    await _assert_exactly_once(database_url, events, traffic.source)
