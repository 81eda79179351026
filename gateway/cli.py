"""The ``analytics-gateway`` command line."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import uuid
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Annotated, NoReturn

import asyncpg
import typer
import uvicorn
from botocore.exceptions import BotoCoreError, ClientError  # type: ignore[import-untyped]
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors.multiprocess import Multiprocess

from db.engine import create_engine
from db.migrate import migrate as run_migrations
from exports.jobs import ExportJobNotFound
from exports.storage.configured import open_storage
from exports.verify import NotVerifiable, Verification, verify_export
from gateway.graphiql import DEV_JWT_COMMAND
from gateway.logging import configure_logging
from ingest.publish_file import publish_file
from kernel.auth import issue_token, signing_secret
from kernel.errors import ConfigError
from kernel.scopes import ROLE_GRANTS
from kernel.settings import ENV_PREFIX, ProcessRole, Settings, load_settings, parse_roles

app = typer.Typer(help="GraphQL analytics gateway for an LLM API platform.", no_args_is_help=True)


def _settings() -> Settings:
    try:
        return load_settings()
    except ConfigError as exc:
        _fail(str(exc))


def _fail(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def _parse_roles(value: str) -> frozenset[ProcessRole]:
    try:
        return parse_roles(value)
    except ValueError as exc:
        _fail(f"--role {exc}")


@app.command()
def serve(
    role: Annotated[str | None, typer.Option(help="Comma-separated roles to run (default ANALYTICS_ROLES).")] = None,
    host: Annotated[str | None, typer.Option(help="Listen address (default ANALYTICS_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Listen port (default ANALYTICS_PORT).")] = None,
    workers: Annotated[
        int | None, typer.Option(help="Worker processes (default ANALYTICS_WORKERS).", min=1, max=64)
    ] = None,
) -> None:
    """API, AMQP ingester, rollup and export workers in one process, or in each of ``--workers`` processes."""
    from gateway.app import create_app

    settings = _settings()
    roles = _parse_roles(role) if role is not None else settings.role_set
    processes = workers if workers is not None else settings.workers
    try:
        settings.require_for(roles)
    except ConfigError as exc:
        _fail(str(exc))
    configure_logging(settings.log_level)
    bind_host, bind_port = host or settings.host, port if port is not None else settings.port
    if processes > 1 and settings.database_url is None:
        _fail("--workers above 1 needs ANALYTICS_DATABASE_URL (the embedded database serves one process)")
    # The port first: a taken one ends start-up before a database, broker or embedded PostgreSQL is opened.
    listener = _listen(bind_host, bind_port)
    if processes > 1:
        _serve_workers(settings, roles, processes, listener)
        return
    if settings.database_url is None:
        _print_embedded_banner(settings.data_dir, bind_host, bind_port)
    config = uvicorn.Config(
        create_app(settings, roles, own_signals=True), host=bind_host, port=bind_port, log_config=None,
        access_log=False, timeout_graceful_shutdown=_connections_grace(settings),
    )  # fmt: skip
    server = uvicorn.Server(config)
    try:
        server.run(sockets=[listener])
    except ConfigError as exc:
        _fail(str(exc))
    if not server.started:
        raise typer.Exit(1)


def _listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound here rather than by uvicorn: uvicorn binds after the app has started (its
    clients open, the embedded database up) and reports a taken port as a log line and exit code 3; this
    says it in one line, with the settings that change it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a restart reuses a TIME_WAIT port
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        _fail(_bind_failure(host, port, exc))
    sock.set_inheritable(True)  # the --workers processes listen on it too
    return sock


def _bind_failure(host: str, port: int, exc: OSError) -> str:
    where = f"cannot listen on {host}:{port}"
    if exc.errno == errno.EADDRINUSE:
        return f"{where}: the port is in use by another process; set ANALYTICS_PORT or pass --port to use another"
    if exc.errno == errno.EACCES:
        return f"{where}: permission denied (ports under 1024 need privileges); set ANALYTICS_PORT or pass --port"
    reason = exc.strerror or str(exc)
    return f"{where}: {reason}; check ANALYTICS_HOST / --host and ANALYTICS_PORT / --port"


def _serve_workers(settings: Settings, roles: frozenset[ProcessRole], processes: int, listener: socket.socket) -> None:
    """``processes`` uvicorn workers sharing one socket, each a whole gateway (pool, clients, workers of its
    roles); uvicorn's supervisor restarts a worker that dies and stops when one cannot start."""
    os.environ[f"{ENV_PREFIX}ROLES"] = ",".join(sorted(roles))  # the workers read their settings from it
    host, port = listener.getsockname()[:2]
    config = uvicorn.Config(
        "gateway.app:app_from_environment", factory=True, workers=processes, host=host, port=port,
        log_config=None, access_log=False, timeout_graceful_shutdown=_connections_grace(settings),
    )  # fmt: skip
    supervisor = Multiprocess(config, sockets=[listener])
    supervisor.run()
    if any(worker.exitcode == STARTUP_FAILURE for worker in supervisor.processes):
        raise typer.Exit(1)


def _connections_grace(settings: Settings) -> int:
    """Seconds uvicorn waits for open connections at shutdown (then cancels them): a third of the grace
    period, so that the workers' drain and closing the clients fit in the rest."""
    return max(1, int(settings.shutdown_grace_s / 3))


def _print_embedded_banner(data_dir: Path, host: str, port: int) -> None:
    typer.echo(
        f"No ANALYTICS_DATABASE_URL: starting an embedded PostgreSQL under {data_dir}/ (ANALYTICS_DATA_DIR)\n"
        f"GraphiQL: http://{host}:{port}/graphql\n"
        f"A development token for the demo org (seed-demo's orgs are org_0000, org_0001, ...):\n"
        f"  {DEV_JWT_COMMAND}\n"
        f'In GraphiQL, put it in the Headers tab: {{"Authorization": "Bearer <token>"}}',
        err=True,
    )


@app.command()
def migrate() -> None:
    """Apply database migrations (idempotent; safe from several processes at once)."""
    settings = _settings()
    if settings.database_url is None:
        _fail("ANALYTICS_DATABASE_URL must be set (the embedded default migrates itself on serve)")
    configure_logging(settings.log_level)

    async def run() -> str:
        engine = create_engine(settings.database_url.get_secret_value(), pool_size=1)  # type: ignore[union-attr]
        try:
            return await run_migrations(engine)
        finally:
            await engine.dispose()

    try:
        revision = asyncio.run(run())
    except (OSError, asyncpg.PostgresError) as exc:
        _fail(f"ANALYTICS_DATABASE_URL: cannot migrate the database ({type(exc).__name__}: {exc})")
    typer.echo(f"database at migration {revision}")


@app.command()
def token(
    role: Annotated[list[str], typer.Option(help="Role to grant (repeatable).")],
    org: Annotated[str | None, typer.Option(help="The caller's org (omit for platform roles).")] = None,
    sub: Annotated[str, typer.Option(help="The caller's subject.")] = "dev-user",
    ttl: Annotated[int, typer.Option(help="Lifetime in seconds.", min=1)] = 3600,
) -> None:
    """Print a signed development JWT (HS256 with ANALYTICS_JWT_SECRET)."""
    settings = _settings()
    unknown = [r for r in role if r not in ROLE_GRANTS]
    if unknown:
        _fail(f"unknown role {unknown[0]!r}; roles: {', '.join(ROLE_GRANTS)}")
    if settings.jwt_jwks_url is not None:
        _fail("ANALYTICS_JWT_JWKS_URL is set: the gateway accepts only the identity provider's tokens")
    secret = signing_secret(settings)
    if secret is None:
        _fail("ANALYTICS_JWT_SECRET must be set to sign development tokens")
    typer.echo(
        issue_token(
            secret,
            role,
            subject=sub,
            org_id=org,
            ttl_seconds=ttl,
            issuer=settings.jwt_issuer,
            audience=settings.jwt_audience,
        )
    )


@app.command()
def publish(
    file: Annotated[Path, typer.Argument(help="JSON Lines: one CloudEvents usage event per line.", exists=True)],
    batch: Annotated[int, typer.Option(help="Events per message (1: single-event messages).", min=1, max=10_000)] = 100,
    in_flight: Annotated[int, typer.Option(help="Messages awaiting confirms at once.", min=1)] = 1000,
) -> None:
    """Publish events from a file to the AMQP exchange, with publisher confirms."""
    settings = _settings()
    if settings.amqp_url is None:
        _fail("ANALYTICS_AMQP_URL must be set to publish")
    try:
        published = asyncio.run(publish_file(settings, file, batch=batch, in_flight=in_flight))
    except (OSError, ValueError) as exc:
        _fail(f"publish failed: {exc}")
    typer.echo(f"published {published:,} events", err=True)


@app.command("seed-demo")
def seed_demo_command(
    events: Annotated[int, typer.Option(help="Synthetic events to load.", min=1)] = 200_000,
    orgs: Annotated[int, typer.Option(help="Orgs (Zipf-distributed volume).", min=1)] = 25,
    days: Annotated[int, typer.Option(help="Days of history, ending now.", min=1)] = 30,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same data).")] = 7,
) -> None:
    """Load a demo price catalog and synthetic events (idempotent for the same seed)."""
    from gateway.seed import seed_demo

    settings = _settings()
    if days >= settings.raw_retention_days:
        _fail(f"--days must be under ANALYTICS_RAW_RETENTION_DAYS ({settings.raw_retention_days})")
    configure_logging("WARNING")
    done = asyncio.run(seed_demo(settings, events=events, orgs=orgs, days=days, seed=seed))
    typer.echo(
        f"seeded {done.accepted:,} new events of {done.events:,} for {done.orgs} orgs (org_0000 ...), "
        f"{done.prices} price versions",
        err=True,
    )


@app.command("verify-export")
def verify_export_command(
    job_id: Annotated[str, typer.Argument(help="The export job's id (a UUID).")],
) -> None:
    """Check a finished export: the stored file's sha256, row count, header and column sums against the job,
    and the sums against a fresh usage answer (exit 0: all agree; 1: findings; 2: bad input)."""
    from gateway.resources import open_database

    try:
        parsed = uuid.UUID(job_id)
    except ValueError:
        _fail(f"{job_id[:80]!r} is not an export job id (a UUID)")
    settings = _settings()
    configure_logging("WARNING")

    async def run() -> Verification:
        async with AsyncExitStack() as stack:
            engine, _, _ = await open_database(settings, stack)
            storage = await stack.enter_async_context(open_storage(settings))
            return await verify_export(engine, storage, parsed)

    try:
        result = asyncio.run(run())
    except (ExportJobNotFound, NotVerifiable) as exc:
        _fail(exc.message)
    except (OSError, asyncpg.PostgresError, BotoCoreError, ClientError) as exc:
        _fail(f"cannot read the database or the export store ({type(exc).__name__}: {exc})")
    typer.echo(result.render())
    if not result.ok:
        raise typer.Exit(1)


def main() -> None:
    app(prog_name="analytics-gateway")


if __name__ == "__main__":
    main()
