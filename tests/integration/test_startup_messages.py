"""What ``serve`` tells a person at start-up, from a real process: a taken port is one line naming the settings
that change it (before any database is opened), and the embedded default's banner gives a token command that
works as printed for the demo orgs."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import TEST_JWT_SECRET
from tests.integration.serve_support import clean_env, free_port, run_cli, serve

pytestmark = pytest.mark.slow
TOKEN_COMMAND = ".venv/bin/analytics-gateway token --role org_admin --org org_0000"


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A loopback port another process's socket is listening on."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield int(holder.getsockname()[1])


def _one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.mark.parametrize("how", ["ANALYTICS_PORT", "--port", "--workers 2"])
async def test_a_taken_port_ends_start_up_with_one_line_naming_the_setting(
    taken_port: int, database_url: str, how: str
) -> None:
    env = clean_env(ANALYTICS_DATABASE_URL=database_url, ANALYTICS_JWT_SECRET=TEST_JWT_SECRET)
    args = ["serve", "--role", "api"]
    if how == "--port":
        args += ["--port", str(taken_port)]
    else:
        env["ANALYTICS_PORT"] = str(taken_port)
    if how == "--workers 2":
        args += ["--workers", "2"]
    code, stdout, stderr = await run_cli(*args, env=env)
    assert code == 2
    assert stdout == ""
    assert _one_line(stderr) == (
        f"error: cannot listen on 127.0.0.1:{taken_port}: the port is in use by another process; "
        "set ANALYTICS_PORT or pass --port to use another"
    )


async def test_the_port_is_checked_before_the_embedded_database_starts(taken_port: int, tmp_path: Path) -> None:
    env = clean_env(ANALYTICS_DATA_DIR=str(tmp_path), ANALYTICS_PORT=str(taken_port))
    code, _, stderr = await run_cli("serve", env=env)
    assert code == 2
    assert "set ANALYTICS_PORT or pass --port" in _one_line(stderr)
    assert not (tmp_path / "postgres").exists()  # no embedded PostgreSQL was initialised, nor left running


async def test_an_unusable_host_names_the_host_and_port_settings(database_url: str) -> None:
    env = clean_env(ANALYTICS_DATABASE_URL=database_url, ANALYTICS_JWT_SECRET=TEST_JWT_SECRET)
    code, _, stderr = await run_cli("serve", "--host", "192.0.2.1", "--port", str(free_port()), env=env)
    assert code == 2
    line = _one_line(stderr)
    assert line.startswith("error: cannot listen on 192.0.2.1:")
    assert line.endswith("check ANALYTICS_HOST / --host and ANALYTICS_PORT / --port")


@pytest.fixture
def embedded_dir(tmp_path: Path) -> Iterator[Path]:
    """A data folder the embedded server can use: under root it runs as another user, who cannot enter pytest's
    tmp_path (0700), so root gets a fresh 0755 one (as in test_embedded_postgres)."""
    if os.geteuid() != 0:
        yield tmp_path
        return
    base = Path(tempfile.mkdtemp(prefix="banner-pg-"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


async def test_the_embedded_banner_token_command_works_as_printed(embedded_dir: Path) -> None:
    env = clean_env(ANALYTICS_DATA_DIR=str(embedded_dir))
    async with serve(env, "--role", "api") as running:
        command = TOKEN_COMMAND.split()
        assert command[0] == ".venv/bin/analytics-gateway"
        code, token, stderr = await run_cli(*command[1:], env=env)
        assert code == 0, stderr
        async with httpx.AsyncClient(base_url=running.base_url) as http:
            response = await http.post(
                "/graphql",
                json={"query": "{ viewer { orgId roles } }"},
                headers={"Authorization": f"Bearer {token.strip()}"},
            )
        assert response.json() == {"data": {"viewer": {"orgId": "org_0000", "roles": ["org_admin"]}}}
    assert running.process.stderr is not None
    banner = (await running.process.stderr.read()).decode()
    assert f"  {TOKEN_COMMAND}" in banner.splitlines(), banner[:1000]
    assert "org_demo" not in banner
    assert f"GraphiQL: {running.base_url}/graphql" in banner
    assert f"starting an embedded PostgreSQL under {embedded_dir}" in banner
