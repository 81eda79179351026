"""App assembly: ``create_app`` wires routes, middleware and the lifespan."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import structlog
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import BaseRoute, Route, WebSocketRoute

from gateway import export_download, graphiql, health
from gateway.allocator import tune_allocator
from gateway.events_endpoint import post_events
from gateway.gc_policy import settle_heap
from gateway.graphql_view import AuthenticatedGraphQL, GraphQLView
from gateway.logging import configure_logging
from gateway.metrics import Metrics
from gateway.middleware import CallerLimitsMiddleware, RequestIdMiddleware, StartupErrorMiddleware
from gateway.resources import State, open_resources
from gateway.shutdown import ShutdownClock
from gateway.workers import run_workers
from kernel.ratelimit import CallerLimiter
from kernel.settings import ALL_ROLES, ProcessRole, Settings, load_settings
from resolvers.root import build_schema

log = structlog.get_logger(__name__)


def create_app(
    settings: Settings | None = None, roles: frozenset[ProcessRole] | None = None, *, own_signals: bool = False
) -> Starlette:
    """The gateway as an ASGI app; clients open and close with its lifespan. Every process answers the health
    and metrics endpoints; the ``api`` role adds GraphQL, the ``ingest`` role ``POST /v1/events``.

    ``own_signals`` (``serve``): the process's SIGINT/SIGTERM bound its shutdown to
    ``ANALYTICS_SHUTDOWN_GRACE_S`` and a second one exits at once (``gateway/shutdown.py``)."""
    settings = settings or load_settings()
    roles = roles if roles is not None else ALL_ROLES
    metrics = Metrics.create()
    limiter = CallerLimiter.from_settings(settings)
    view = GraphQLView(build_schema(settings, limiter))

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[State]:
        clock = ShutdownClock(settings.shutdown_grace_s)
        if own_signals:
            clock.watch_signals()
        async with open_resources(settings, roles, metrics) as resources:
            async with run_workers(resources, clock):
                settle_heap(settings.gc_gen0_threshold)
                tune_allocator(settings.malloc_mmap_threshold_mb)
                log.info("gateway.started", roles=sorted(roles), embedded_database=resources.embedded)
                yield {"resources": resources}
                clock.begin()
            clock.stage = "closing the clients (audit trail, broker, Redis, database pools)"
        log.info("gateway.stopped")

    routes: list[BaseRoute] = [
        Route("/healthz", health.healthz),
        Route("/readyz", health.readyz),
        Route("/metrics", health.metrics),
    ]
    if ProcessRole.API in roles:
        routes += [
            # Every method reaches the view, which answers those it does not serve with a GraphQL-shaped 405.
            Route("/graphql", AuthenticatedGraphQL(view), methods=None),
            WebSocketRoute("/graphql", view),
            Route(export_download.PATH, export_download.download_export, methods=["GET", "HEAD"]),
            graphiql.asset_route(),
        ]
    if ProcessRole.INGEST in roles:
        routes.append(Route("/v1/events", post_events, methods=["POST"]))
    middleware = [
        Middleware(StartupErrorMiddleware),
        Middleware(RequestIdMiddleware),
        # HTTP metrics only: no spans per ASGI message (a span per message is a measurable cost on every request).
        Middleware(OpenTelemetryMiddleware, meter_provider=metrics.meter_provider, exclude_spans=["receive", "send"]),
        # Innermost: a refused caller (429) is still logged and counted by the middleware above.
        Middleware(CallerLimitsMiddleware, limiter=limiter),
    ]
    return Starlette(routes=routes, middleware=middleware, lifespan=lifespan)


def app_from_environment() -> Starlette:
    """The app of one ``serve --workers N`` worker: settings and roles from the environment that ``serve``
    prepared (uvicorn imports this factory in every worker process)."""
    settings = load_settings()
    configure_logging(settings.log_level)
    return create_app(settings, settings.role_set, own_signals=True)
