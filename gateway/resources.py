"""Clients shared by a whole process, opened once in the lifespan and closed with it."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import TypedDict

import aio_pika
import structlog
from aio_pika.abc import AbstractRobustConnection
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.types import Scope

from db.audit_trail import AuditTrail
from db.engine import create_engine
from db.migrate import current_head, migrate
from exports.storage.configured import open_storage
from exports.storage.protocol import Storage
from gateway.embedded import EmbeddedPostgres
from gateway.metrics import Metrics, OffloadMetrics
from ingest.metrics import IngestMetrics
from ingest.writer import EventWriter
from kernel.auth import TokenVerifier
from kernel.cache import Cache, LocalCache, RedisCache
from kernel.errors import ConfigError
from kernel.offload import Offload
from kernel.pubsub import LocalPubSub, PubSub, RedisPubSub
from kernel.settings import ProcessRole, Settings

log = structlog.get_logger(__name__)
AMQP_CONNECT_TIMEOUT_S = 10.0
OFFLOAD_PRELOAD = ("reliability.spikes",)  # what the helpers import before they take steps (spike detection)


@dataclass(frozen=True)
class Resources:
    """Everything long-lived that request handlers and workers use."""

    settings: Settings
    roles: frozenset[ProcessRole]
    # Two pools on one database, so that neither side can starve the other: ``engine`` for the workers
    # (ingestion, rollups, exports, audit, health), whose statements may run long; ``query_engine`` for
    # GraphQL, whose statements PostgreSQL cuts at ANALYTICS_DB_STATEMENT_TIMEOUT_MS and whose requests wait
    # at most ANALYTICS_DB_POOL_TIMEOUT_S for a connection (both answer UNAVAILABLE, retryable). Pools
    # connect lazily: a process without the api role never opens a query connection.
    engine: AsyncEngine
    query_engine: AsyncEngine
    verifier: TokenVerifier
    metrics: Metrics
    migrations_head: str
    pubsub: PubSub
    cache: Cache
    audit: AuditTrail
    ingest_metrics: IngestMetrics
    writer: EventWriter
    storage: Storage
    # Helper processes for an answer's CPU-bound steps (spike detection); steps run here when none is free.
    offload: Offload
    redis: Redis | None = None
    amqp: AbstractRobustConnection | None = None
    embedded: bool = False


class State(TypedDict):
    """What the lifespan hands every request: handlers take ``Request[State]`` and read
    ``request.state["resources"]`` typed."""

    resources: Resources


def resources_of(scope: Scope) -> Resources:
    """The resources from a raw ASGI scope, for middleware that runs below Starlette's ``Request``."""
    state: State = scope["state"]
    return state["resources"]


@asynccontextmanager
async def open_resources(
    settings: Settings, roles: frozenset[ProcessRole], metrics: Metrics
) -> AsyncIterator[Resources]:
    """Open the database (the embedded one when none is configured), Redis and AMQP."""
    async with AsyncExitStack() as stack:
        engine, query_engine, embedded = await open_database(settings, stack)
        redis = _redis(settings)
        if redis is not None:
            stack.push_async_callback(redis.aclose)
        amqp = await _amqp(settings, roles)
        if amqp is not None:
            stack.push_async_callback(amqp.close)
        pubsub: PubSub = RedisPubSub(redis, settings.redis_prefix) if redis is not None else LocalPubSub()
        cache: Cache = RedisCache(redis, settings.redis_prefix) if redis is not None else LocalCache()
        ingest_metrics = IngestMetrics(metrics.meter("analytics.ingest"))
        audit = AuditTrail(engine, metrics.meter("analytics.audit"))
        await audit.start()
        stack.push_async_callback(audit.stop)
        storage = await stack.enter_async_context(open_storage(settings))
        # (its helpers start on the first report: a process that serves none starts none)
        offload = Offload(settings.offload_workers if ProcessRole.API in roles else 0, preload=OFFLOAD_PRELOAD)
        OffloadMetrics(metrics.meter("analytics.offload"), offload)
        stack.push_async_callback(offload.close)
        yield Resources(
            settings=settings,
            roles=roles,
            engine=engine,
            query_engine=query_engine,
            verifier=TokenVerifier(settings),
            metrics=metrics,
            migrations_head=current_head(),
            pubsub=pubsub,
            cache=cache,
            audit=audit,
            ingest_metrics=ingest_metrics,
            writer=EventWriter(engine, pubsub, cache, ingest_metrics),
            storage=storage,
            offload=offload,
            redis=redis,
            amqp=amqp,
            embedded=embedded,
        )


async def open_database(settings: Settings, stack: AsyncExitStack) -> tuple[AsyncEngine, AsyncEngine, bool]:
    """The workers' engine and the queries' engine (both closed with ``stack``), and whether the database is
    the embedded default, which is migrated here; a configured database is migrated by ``migrate``."""
    url, embedded = await _database_url(settings, stack)
    engine = create_engine(url, pool_size=settings.db_pool_size)
    stack.push_async_callback(engine.dispose)
    query_engine = create_engine(
        url,
        pool_size=settings.db_pool_size,
        pool_timeout_s=settings.db_pool_timeout_s,
        statement_timeout_ms=settings.db_statement_timeout_ms,
    )
    stack.push_async_callback(query_engine.dispose)
    if embedded:
        await migrate(engine)
    return engine, query_engine, embedded


async def _database_url(settings: Settings, stack: AsyncExitStack) -> tuple[str, bool]:
    if settings.database_url is not None:
        return settings.database_url.get_secret_value(), False
    server = EmbeddedPostgres(settings.data_dir)
    url = await asyncio.to_thread(server.start)
    stack.push_async_callback(asyncio.to_thread, server.release)
    log.info("embedded_postgres.started", data_dir=str(settings.data_dir))
    return url, True


def _redis(settings: Settings) -> Redis | None:
    if settings.redis_url is None:
        return None
    return Redis.from_url(settings.redis_url.get_secret_value(), socket_connect_timeout=5)


async def _amqp(settings: Settings, roles: frozenset[ProcessRole]) -> AbstractRobustConnection | None:
    if settings.amqp_url is None or ProcessRole.INGEST not in roles:
        return None
    try:
        return await asyncio.wait_for(
            aio_pika.connect_robust(
                settings.amqp_url.get_secret_value(),
                client_properties={"connection_name": f"analytics-gateway/{os.getpid()}"},
            ),
            AMQP_CONNECT_TIMEOUT_S,
        )
    except (OSError, TimeoutError, aio_pika.exceptions.AMQPError) as exc:
        raise ConfigError(f"ANALYTICS_AMQP_URL: cannot connect to the broker ({type(exc).__name__})") from None
