"""Fixtures on real services: a fresh database per run, unique AMQP and Redis
prefixes, the app with its lifespan, an HTTP client, tokens, and a moto S3
server on a free loopback port.

Service addresses come from ``ANALYTICS_TEST_*`` variables and default to the
development machine's services (see ../shared/DESIGN.md).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest
from asgi_lifespan import LifespanManager
from moto.server import ThreadedMotoServer
from redis.asyncio import Redis
from starlette.applications import Starlette

from db.engine import create_engine
from db.migrate import migrate
from gateway.app import create_app
from gateway.resources import Resources
from kernel.auth import issue_token
from kernel.settings import Settings

# The moto S3 server accepts any credentials; the gateway's S3 client (and subprocesses the tests start) read
# them from the environment, as in production.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "test")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "test")
RUN_ID = uuid.uuid4().hex[:10]
TEST_JWT_SECRET = "test-secret-" + "x" * 32
POSTGRES_ADMIN_URL = os.environ.get("ANALYTICS_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
AMQP_URL = os.environ.get("ANALYTICS_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
REDIS_URL = os.environ.get("ANALYTICS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def database_url_for(name: str) -> str:
    return POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"


async def create_database(name: str) -> str:
    admin = await asyncpg.connect(POSTGRES_ADMIN_URL)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    return database_url_for(name)


async def drop_database(name: str) -> None:
    admin = await asyncpg.connect(POSTGRES_ADMIN_URL)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture(scope="session", autouse=True)
async def _clean_broker_and_redis() -> AsyncIterator[None]:
    """After the run, remove this run's queues, exchanges and Redis keys."""
    yield
    from tests.integration.ingest_support import delete_topology

    await delete_topology(f"test_{RUN_ID}.")
    redis = Redis.from_url(REDIS_URL)
    async with redis:
        keys = [key async for key in redis.scan_iter(match=f"test:{RUN_ID}:*")]
        if keys:
            await redis.delete(*keys)


async def create_migrated_database(name: str) -> str:
    url = await create_database(name)
    engine = create_engine(url, pool_size=1)
    try:
        await migrate(engine)
    finally:
        await engine.dispose()
    return url


@pytest.fixture(scope="session")
async def database_url() -> AsyncIterator[str]:
    """A migrated database of this run's own, dropped afterwards."""
    name = f"analytics_test_{RUN_ID}"
    yield await create_migrated_database(name)
    await drop_database(name)


@pytest.fixture
async def migrated_database() -> AsyncIterator[str]:
    """A migrated database of one test's own (for tests that move global state: watermarks, heartbeats)."""
    name = f"analytics_test_{RUN_ID}_{uuid.uuid4().hex[:6]}"
    yield await create_migrated_database(name)
    await drop_database(name)


@pytest.fixture
async def empty_database() -> AsyncIterator[str]:
    """A database with nothing in it, for migration tests."""
    name = f"analytics_test_{RUN_ID}_{uuid.uuid4().hex[:6]}"
    yield await create_database(name)
    await drop_database(name)


@pytest.fixture(scope="module")
async def empty_database_module() -> AsyncIterator[str]:
    """An empty database shared by one test module."""
    name = f"analytics_test_{RUN_ID}_{uuid.uuid4().hex[:6]}"
    yield await create_database(name)
    await drop_database(name)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="session")
def settings(database_url: str, data_dir: Path) -> Settings:
    return Settings(
        database_url=database_url,
        amqp_url=AMQP_URL,
        redis_url=REDIS_URL,
        jwt_secret=TEST_JWT_SECRET,
        amqp_prefix=f"test_{RUN_ID}.",
        redis_prefix=f"test:{RUN_ID}:",
        data_dir=data_dir,
        # The whole run shares this app and mostly one caller: its limits are tested with apps of their own.
        rate_limit_per_minute=1_000_000,
        max_concurrent_per_caller=64,
    )


@pytest.fixture(scope="session")
async def lifespan(settings: Settings) -> AsyncIterator[LifespanManager]:
    """The gateway with its lifespan running (shared by the whole run)."""
    async with LifespanManager(create_app(settings), startup_timeout=60) as manager:
        yield manager


@pytest.fixture(scope="session")
def app(lifespan: LifespanManager) -> Starlette:
    return lifespan.app  # type: ignore[return-value]


@pytest.fixture(scope="session")
def resources(lifespan: LifespanManager) -> Resources:
    """The running app's clients (engine, cache, pub/sub, writer)."""
    return lifespan._state["resources"]  # type: ignore[no-any-return]


@pytest.fixture
async def client(app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway.test") as http:
        yield http


TokenFactory = Callable[..., str]


@pytest.fixture(scope="session")
def make_token() -> TokenFactory:
    """``make_token("finance", org="org_a")``: a signed token for a role."""

    def make(*roles: str, org: str | None = None, sub: str = "test-user", ttl: int = 600, **claims: str) -> str:
        return issue_token(TEST_JWT_SECRET, list(roles), subject=sub, org_id=org, ttl_seconds=ttl, **claims)

    return make


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server over real HTTP on a free loopback port."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()
