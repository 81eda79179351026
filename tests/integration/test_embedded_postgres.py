"""The embedded PostgreSQL: init, reuse, stop, restart, crash, and nothing written outside its folder."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import pytest

from gateway.embedded import EmbeddedPostgres, EmbeddedPostgresError, find_pg_bindir

pytestmark = pytest.mark.slow

SOCKET_FOLDERS = (Path(tempfile.gettempdir()), Path("/var/run/postgresql"))


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[Path]:
    """An empty folder the server's OS user can enter.

    Under root the server runs as another user, who cannot enter pytest's
    tmp_path (pytest makes its base folder 0700), so root gets a fresh 0755 one.
    """
    if os.geteuid() != 0:
        yield tmp_path
        return
    base = Path(tempfile.mkdtemp(prefix="embedded-pg-"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def data_dir(sandbox: Path) -> Iterator[Path]:
    """``sandbox/data``; whatever server runs there is stopped afterwards."""
    path = sandbox / "data"
    try:
        yield path
    finally:
        EmbeddedPostgres(path).stop()


async def fetchval(url: str, sql: str) -> object:
    connection = await asyncpg.connect(url, timeout=10)
    try:
        return await connection.fetchval(sql)
    finally:
        await connection.close()


def accepts_connections(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return True
    except OSError:
        return False


def postmaster_pid(data_dir: Path) -> int:
    return int((data_dir / "postgres" / "postmaster.pid").read_text().split()[0])


def names(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


def stray_sockets() -> set[Path]:
    """PostgreSQL sockets in the usual shared folders (ours must not be there)."""
    found: set[Path] = set()
    for folder in SOCKET_FOLDERS:
        if folder.is_dir():
            found |= set(folder.glob(".s.PGSQL.*"))
    return found


def test_finds_the_server_binaries() -> None:
    bindir = find_pg_bindir()
    assert (bindir / "initdb").is_file()
    assert (bindir / "pg_ctl").is_file()


async def test_start_reuse_stop_restart(sandbox: Path, data_dir: Path) -> None:
    sockets_before = stray_sockets()
    pg = EmbeddedPostgres(data_dir)

    url = await asyncio.to_thread(pg.start)
    parts = urlsplit(url)
    assert (parts.scheme, parts.username, parts.hostname) == ("postgresql", "postgres", "127.0.0.1")
    assert parts.path == "/analytics"
    port = parts.port
    assert port is not None and pg.url == url
    assert await fetchval(url, "SELECT 1") == 1
    assert await fetchval(url, "SHOW timezone") == "UTC"
    assert await fetchval(url, "SHOW listen_addresses") == "127.0.0.1"
    assert (data_dir / "postgres" / f".s.PGSQL.{port}").is_socket()
    assert await fetchval(url, "CREATE TABLE kept AS SELECT 42 AS v") is None

    pid = postmaster_pid(data_dir)
    assert await asyncio.to_thread(EmbeddedPostgres(data_dir).start) == url
    assert postmaster_pid(data_dir) == pid

    await asyncio.to_thread(pg.stop)
    assert pg.url is None
    assert not accepts_connections(port)
    await asyncio.to_thread(pg.stop)  # idempotent

    assert await asyncio.to_thread(pg.start) == url  # the port was kept
    assert await fetchval(url, "SELECT v FROM kept") == 42
    await asyncio.to_thread(pg.stop)

    assert names(sandbox) == ["data"]
    assert names(data_dir) == ["postgres", "postgres.log"]
    assert stray_sockets() == sockets_before


async def test_moves_to_a_new_port_when_its_port_is_taken(data_dir: Path) -> None:
    pg = EmbeddedPostgres(data_dir)
    first = urlsplit(await asyncio.to_thread(pg.start)).port
    await asyncio.to_thread(pg.stop)
    with socket.socket() as squatter:
        # The stopped server's connections may hold the port in TIME_WAIT; a listener may still take it.
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", first or 0))
        squatter.listen()
        url = await asyncio.to_thread(pg.start)
        assert urlsplit(url).port != first
        assert await fetchval(url, "SELECT 1") == 1


async def test_restarts_after_the_server_was_killed(data_dir: Path) -> None:
    pg = EmbeddedPostgres(data_dir)
    url = await asyncio.to_thread(pg.start)
    assert await fetchval(url, "CREATE TABLE kept AS SELECT 7 AS v") is None
    pid = postmaster_pid(data_dir)
    os.kill(pid, signal.SIGKILL)
    await wait_until_gone(pid)

    assert await asyncio.to_thread(EmbeddedPostgres(data_dir).start) == url
    assert await fetchval(url, "SELECT v FROM kept") == 7


async def test_long_folder_uses_tcp_only(sandbox: Path) -> None:
    data_dir = sandbox / ("d" * 100)
    pg = EmbeddedPostgres(data_dir)
    try:
        url = await asyncio.to_thread(pg.start)
        assert await fetchval(url, "SHOW unix_socket_directories") == ""
        assert not list((data_dir / "postgres").glob(".s.PGSQL.*"))
    finally:
        await asyncio.to_thread(pg.stop)


@pytest.mark.skipif(os.geteuid() != 0, reason="only root hands the server to another user")
def test_root_refuses_a_folder_the_server_user_cannot_enter(tmp_path: Path) -> None:
    modes = {p: p.stat().st_mode for p in tmp_path.parents}
    if all(mode & stat.S_IXOTH for mode in modes.values()):
        pytest.skip("pytest's base folder is open to everyone here")
    with pytest.raises(EmbeddedPostgresError, match="cannot enter"):
        EmbeddedPostgres(tmp_path / "data").start()
    assert not (tmp_path / "data").exists()
    assert {p: p.stat().st_mode for p in tmp_path.parents} == modes


async def wait_until_gone(pid: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"process {pid} still exists")


async def test_the_app_serves_on_the_embedded_default_and_stops_it(data_dir: Path) -> None:
    """No ANALYTICS_DATABASE_URL: the lifespan starts, migrates and stops a private server."""
    import httpx
    from asgi_lifespan import LifespanManager

    from gateway.app import create_app
    from kernel.auth import issue_token, signing_secret
    from kernel.settings import Settings

    settings = Settings(data_dir=data_dir, database_url=None, amqp_url=None, redis_url=None, jwt_secret=None)
    secret = signing_secret(settings)
    assert secret is not None and (data_dir / "dev-jwt-secret").stat().st_mode & 0o077 == 0
    token = issue_token(secret, ["viewer"], subject="dev", org_id="org_demo")
    async with LifespanManager(create_app(settings), startup_timeout=60) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway.test") as http:
            ready = await http.get("/readyz")
            viewer = await http.post(
                "/graphql", json={"query": "{ viewer { subject } }"}, headers={"Authorization": f"Bearer {token}"}
            )
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"]["redis"] == {"ok": True, "configured": False}
    assert viewer.json() == {"data": {"viewer": {"subject": "dev"}}}
    port = int((data_dir / "postgres" / "embedded.conf").read_text().split("port = ")[1].split()[0])
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
