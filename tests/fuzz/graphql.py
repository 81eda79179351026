"""Fuzz ``/graphql`` with Schemathesis in GraphQL mode against a real gateway process.

``python -m tests.fuzz.graphql --examples 200 --seed 1`` (``make fuzz`` runs it longer; ``make test`` runs a
short one): a database of its own on the local PostgreSQL, ``analytics-gateway serve --role api`` on a free
loopback port, the exported SDL as the schema (introspection may be off in production), a platform admin's
token (so every resolver is reached), and the checks ``not_a_server_error`` and ``no_internal_error``. Exits
non-zero on any finding, or when the gateway logged an internal error.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

from kernel.auth import issue_token
from tests.conftest import create_database, drop_database
from tests.integration.serve_support import clean_env, free_port, wait_ready

ROOT = Path(__file__).resolve().parents[2]
SECRET = "fuzz-secret-" + "x" * 32


async def fuzz(examples: int, seed: int, max_time: int) -> int:
    name = f"analytics_fuzz_{uuid.uuid4().hex[:10]}"
    url = await create_database(name)
    log = Path(tempfile.mkstemp(prefix="gateway-fuzz-", suffix=".log")[1])
    try:
        migrate = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway.cli", "migrate", env=_env(url), cwd=ROOT
        )
        if code := await migrate.wait():
            return code
        return await _against_server(url, log, examples, seed, max_time)
    finally:
        await drop_database(name)


async def _against_server(url: str, log: Path, examples: int, seed: int, max_time: int) -> int:
    port = free_port()
    with log.open("wb") as sink:
        server = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway.cli", "serve", "--role", "api",
            env=_env(url) | {"ANALYTICS_PORT": str(port)}, stdout=sink, stderr=subprocess.STDOUT, cwd=ROOT,
        )  # fmt: skip
        try:
            base = f"http://127.0.0.1:{port}"
            await wait_ready(base, server)
            code = await _schemathesis(base, examples, seed, max_time)
        finally:
            server.send_signal(signal.SIGTERM)
            await asyncio.wait_for(server.wait(), 30)
    internal = [line for line in log.read_text(errors="replace").splitlines() if "internal_error" in line]
    print(f"gateway log: {log} ({len(internal)} internal errors)")
    for line in internal[:20]:
        print("  " + line[:300])
    return code or (1 if internal else 0)


async def _schemathesis(base: str, examples: int, seed: int, max_time: int) -> int:
    token = issue_token(SECRET, ["platform_admin"], subject="fuzz", ttl_seconds=max_time + 600)
    command = [
        str(Path(sys.executable).with_name("st")), "run", str(ROOT / "schema" / "schema.graphql"),
        "--url", f"{base}/graphql", "--header", f"Authorization: Bearer {token}",
        "--checks", "not_a_server_error,no_internal_error", "--max-examples", str(examples),
        "--seed", str(seed), "--generation-deterministic", "--max-time", str(max_time),
        "--phases", "fuzzing", "--workers", "1", "--no-color",
    ]  # fmt: skip
    env = os.environ | {"SCHEMATHESIS_HOOKS": "tests.fuzz.hooks", "PYTHONPATH": str(ROOT)}
    process = await asyncio.create_subprocess_exec(*command, env=env, cwd=ROOT)
    return await process.wait()


def _env(url: str) -> dict[str, str]:
    return clean_env(
        ANALYTICS_DATABASE_URL=url,
        ANALYTICS_JWT_SECRET=SECRET,
        # The fuzzer is one caller sending as fast as it can: the rate limit is not what is under test here.
        ANALYTICS_RATE_LIMIT_PER_MINUTE="1000000",
        ANALYTICS_MAX_CONCURRENT_PER_CALLER="64",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=200, help="examples per root field (default 200)")
    parser.add_argument("--seed", type=int, default=20261130)
    parser.add_argument("--max-time", type=int, default=600, help="seconds for the whole Schemathesis run")
    args = parser.parse_args()
    sys.exit(asyncio.run(fuzz(args.examples, args.seed, args.max_time)))


if __name__ == "__main__":
    main()
