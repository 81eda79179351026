"""The embedded default database: a private PostgreSQL kept under the data folder.

When no ``ANALYTICS_DATABASE_URL`` is configured, ``serve`` runs its own
PostgreSQL with the server binaries installed on the machine. Everything it
writes stays inside ``data_dir``: the cluster (``data_dir/postgres``, which also
holds the unix socket), its settings and the log (``data_dir/postgres.log``).
The server listens on 127.0.0.1 only and trusts local connections.

PostgreSQL refuses to run as root, so under root every PostgreSQL program runs
as the existing ``postgres`` user (else ``nobody``), which then owns the cluster
folder. All methods block; async callers wrap them in ``asyncio.to_thread``.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import socket
import stat
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

SUPERUSER = "postgres"
DATABASE = "analytics"
CLUSTER_DIR = "postgres"
LOG_FILE = "postgres.log"
SETTINGS_FILE = "embedded.conf"
INCLUDE_LINE = f"include = '{SETTINGS_FILE}'"
HBA_RULES = (
    "# Written by the analytics gateway: a private database bound to loopback.\n"
    "local all all trust\n"
    "host all all 127.0.0.1/32 trust\n"
)
RUN_AS_CANDIDATES = ("postgres", "nobody")
MAX_SOCKET_PATH = 100
START_TIMEOUT_S = 30
COMMAND_TIMEOUT_S = 90
LOG_TAIL_LINES = 5
NOT_FOUND = (
    "PostgreSQL server binaries (initdb, pg_ctl) not found; install PostgreSQL 15+ or set ANALYTICS_DATABASE_URL"
)


class EmbeddedPostgresError(Exception):
    """The embedded database could not be prepared; the message is one line for the user."""


def find_pg_bindir() -> Path:
    """Return the folder holding ``initdb`` and ``pg_ctl``, or raise EmbeddedPostgresError."""
    for candidate in (_bindir_from_pg_config(), _bindir_from_path(), _newest_debian_bindir()):
        if candidate is not None and _has_server_binaries(candidate):
            return candidate
    raise EmbeddedPostgresError(NOT_FOUND)


def _has_server_binaries(bindir: Path) -> bool:
    return all(os.access(bindir / name, os.X_OK) for name in ("initdb", "pg_ctl"))


def _bindir_from_pg_config() -> Path | None:
    pg_config = shutil.which("pg_config")
    if pg_config is None:
        return None
    try:
        done = subprocess.run(  # noqa: S603 - fixed argv, pg_config found on PATH
            [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    out = done.stdout.strip()
    return Path(out) if done.returncode == 0 and out else None


def _bindir_from_path() -> Path | None:
    initdb = shutil.which("initdb")
    # Follow symlinks (e.g. /usr/local/bin/initdb) to the folder that also has psql.
    return Path(initdb).resolve().parent if initdb else None


def _newest_debian_bindir() -> Path | None:
    bindirs = [p for p in Path("/usr/lib/postgresql").glob("*/bin") if p.is_dir()]
    return max(bindirs, key=lambda p: _version_key(p.parent.name), default=None)


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", name))


@dataclass(frozen=True)
class _Runner:
    """Runs PostgreSQL programs from one bindir, as an unprivileged user under root."""

    bindir: Path
    cwd: Path
    user: pwd.struct_passwd | None

    def run(self, program: str, *args: str) -> subprocess.CompletedProcess[str]:
        """Run ``program`` with ``args``; raise EmbeddedPostgresError if it cannot run."""
        command = [self._program(program), *args]
        user = self.user
        try:
            return subprocess.run(  # noqa: S603 - argv is a PostgreSQL program and our own arguments
                command,
                capture_output=True,
                text=True,
                timeout=COMMAND_TIMEOUT_S,
                check=False,
                cwd=self.cwd,
                env=_clean_env(),
                stdin=subprocess.DEVNULL,
                user=user.pw_uid if user else None,
                group=user.pw_gid if user else None,
                extra_groups=os.getgrouplist(user.pw_name, user.pw_gid) if user else None,
            )
        except subprocess.TimeoutExpired as exc:
            raise EmbeddedPostgresError(f"{program} did not finish within {exc.timeout:.0f}s") from exc
        except OSError as exc:
            raise EmbeddedPostgresError(f"could not run {command[0]}: {exc.strerror}") from exc

    def chown(self, path: Path) -> None:
        """Give ``path`` to the user the server runs as (only when running as root)."""
        if self.user is not None:
            os.chown(path, self.user.pw_uid, self.user.pw_gid)

    def _program(self, name: str) -> str:
        local = self.bindir / name
        if local.exists():
            return str(local)
        found = shutil.which(name)
        if found is None:
            raise EmbeddedPostgresError(f"PostgreSQL program {name} not found in {self.bindir} or PATH")
        return found


def _clean_env() -> dict[str, str]:
    """The environment without ``PG*`` variables, which would redirect the programs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["PGCONNECT_TIMEOUT"] = "10"
    return env


def _run_as_user() -> pwd.struct_passwd | None:
    """The unprivileged user to run PostgreSQL as, or None when not root."""
    if os.geteuid() != 0:
        return None
    for name in RUN_AS_CANDIDATES:
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise EmbeddedPostgresError(
        "running as root and no 'postgres' or 'nobody' user exists to run PostgreSQL; set ANALYTICS_DATABASE_URL"
    )


def _check_traversable(path: Path, user: pwd.struct_passwd) -> None:
    """Raise unless ``user`` may enter ``path`` and each of its existing parents."""
    groups = set(os.getgrouplist(user.pw_name, user.pw_gid))
    for folder in reversed([path, *path.parents]):
        if not folder.exists():
            return
        info = folder.stat()
        if info.st_uid == user.pw_uid:
            bit = stat.S_IXUSR
        elif info.st_gid in groups:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not info.st_mode & bit:
            raise EmbeddedPostgresError(
                f"PostgreSQL cannot run as root and user {user.pw_name!r} cannot enter {folder}; "
                f"choose a data folder it can reach or set ANALYTICS_DATABASE_URL"
            )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _port_is_free(port: int) -> bool:
    """Whether PostgreSQL could listen on ``port`` (it also sets SO_REUSEADDR)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _quote(value: str) -> str:
    """Quote ``value`` as a postgresql.conf string."""
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def _socket_setting(cluster: Path, port: int) -> str:
    """The socket folder (the cluster), or '' (TCP only) if the path is too long."""
    socket_path = cluster / f".s.PGSQL.{port}"
    return str(cluster) if len(os.fsencode(socket_path)) < MAX_SOCKET_PATH else ""


def _settings_text(cluster: Path, port: int) -> str:
    return (
        "# Written by the analytics gateway on every start; edits are overwritten.\n"
        "listen_addresses = '127.0.0.1'\n"
        f"port = {port}\n"
        f"unix_socket_directories = {_quote(_socket_setting(cluster, port))}\n"
        "timezone = 'UTC'\n"
        "log_timezone = 'UTC'\n"
    )


class EmbeddedPostgres:
    """A private PostgreSQL whose cluster lives in ``data_dir / "postgres"``."""

    def __init__(self, data_dir: Path) -> None:
        self._data_dir = Path(data_dir).resolve()
        self._cluster = self._data_dir / CLUSTER_DIR
        self._log = self._data_dir / LOG_FILE
        self._runner: _Runner | None = None
        self._url: str | None = None
        self._launched = False

    @property
    def url(self) -> str | None:
        """The connection URL while started by this object, else None."""
        return self._url

    def start(self) -> str:
        """Initialise the cluster if needed, start or reuse its server; return the URL."""
        runner = self._prepare()
        self._ensure_cluster(runner)
        port = self._running_port(runner) if self._is_running(runner) else None
        if port is None:
            port = self._launch(runner)
            self._launched = True
        self._ensure_database(runner, port)
        self._url = f"postgresql://{SUPERUSER}@127.0.0.1:{port}/{DATABASE}"
        return self._url

    def stop(self) -> None:
        """Stop the server of this folder (fast mode); do nothing if it is not running."""
        self._url = None
        if not (self._cluster / "PG_VERSION").is_file():
            return
        runner = self._get_runner()
        if not self._is_running(runner):
            return
        done = runner.run("pg_ctl", "stop", "-D", str(self._cluster), "-m", "fast", "-w", "-t", str(START_TIMEOUT_S))
        if done.returncode != 0 and self._is_running(runner):
            raise EmbeddedPostgresError(f"embedded PostgreSQL did not stop: {_one_line(done)}")

    def release(self) -> None:
        """Stop the server if this object launched it; leave one it reused (another
        process's, e.g. a running gateway while ``seed-demo`` runs) alone."""
        if self._launched:
            self.stop()
            self._launched = False
        self._url = None

    def _get_runner(self) -> _Runner:
        if self._runner is None:
            self._runner = _Runner(find_pg_bindir(), self._data_dir, _run_as_user())
        return self._runner

    def _prepare(self) -> _Runner:
        """Create ``data_dir`` and the log file, checking the server's user can reach them."""
        runner = self._get_runner()
        if runner.user is not None:
            _check_traversable(self._data_dir, runner.user)
        self._data_dir.mkdir(parents=True, exist_ok=True)
        if runner.user is not None:  # again: the new folders follow the umask
            _check_traversable(self._data_dir, runner.user)
        self._log.touch(exist_ok=True)
        runner.chown(self._log)
        return runner

    def _ensure_cluster(self, runner: _Runner) -> None:
        """Run initdb unless the cluster exists; make sure our settings are included."""
        if not (self._cluster / "PG_VERSION").is_file():
            self._initdb(runner)
        elif runner.user is not None and self._cluster.stat().st_uid != runner.user.pw_uid:
            self._chown_cluster(runner)
        conf = self._cluster / "postgresql.conf"
        if INCLUDE_LINE not in conf.read_text(encoding="utf-8").splitlines():
            (self._cluster / "pg_hba.conf").write_text(HBA_RULES, encoding="utf-8")
            with conf.open("a", encoding="utf-8") as out:
                out.write(f"\n# Added by the analytics gateway.\n{INCLUDE_LINE}\n")

    def _initdb(self, runner: _Runner) -> None:
        if self._cluster.exists() and any(self._cluster.iterdir()):
            raise EmbeddedPostgresError(f"{self._cluster} exists but is not a PostgreSQL cluster; move it away")
        self._cluster.mkdir(mode=0o700, exist_ok=True)
        runner.chown(self._cluster)
        done = runner.run(
            "initdb", "-D", str(self._cluster), "-U", SUPERUSER, "--auth=trust", "--encoding=UTF8", "--locale=C"
        )
        if done.returncode != 0:
            raise EmbeddedPostgresError(f"initdb failed: {_one_line(done)}")
        self._write_settings(runner, _free_port())

    def _chown_cluster(self, runner: _Runner) -> None:
        for folder, _dirs, files in os.walk(self._cluster):
            runner.chown(Path(folder))
            for name in files:
                runner.chown(Path(folder) / name)

    def _write_settings(self, runner: _Runner, port: int) -> None:
        path = self._cluster / SETTINGS_FILE
        path.write_text(_settings_text(self._cluster, port), encoding="utf-8")
        runner.chown(path)

    def _saved_port(self) -> int | None:
        path = self._cluster / SETTINGS_FILE
        text = path.read_text(encoding="utf-8") if path.is_file() else ""
        match = re.search(r"^port = (\d+)$", text, re.MULTILINE)
        return int(match.group(1)) if match else None

    def _is_running(self, runner: _Runner) -> bool:
        return runner.run("pg_ctl", "status", "-D", str(self._cluster)).returncode == 0

    def _running_port(self, runner: _Runner) -> int | None:
        """Wait until the running server is ready and return its port (None if it went away)."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            lines = self._pid_file_lines()
            if lines is None:
                return None
            if len(lines) >= 8 and lines[7].strip() == "ready":
                return int(lines[3])
            time.sleep(0.1)
        raise EmbeddedPostgresError(self._failure("the running embedded PostgreSQL is not ready"))

    def _pid_file_lines(self) -> list[str] | None:
        try:
            return (self._cluster / "postmaster.pid").read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return None

    def _launch(self, runner: _Runner) -> int:
        """Start the server on its saved port, or a new one if that is taken."""
        port = self._saved_port()
        if port is None or not _port_is_free(port):
            port = _free_port()
        self._write_settings(runner, port)
        log_size = self._log.stat().st_size
        done = runner.run(
            "pg_ctl", "start", "-D", str(self._cluster), "-l", str(self._log), "-w", "-t", str(START_TIMEOUT_S)
        )
        if done.returncode == 0:
            return port
        if self._is_running(runner):  # another process started it meanwhile
            running = self._running_port(runner)
            if running is not None:
                return running
        raise EmbeddedPostgresError(self._failure("embedded PostgreSQL failed to start", since=log_size))

    def _ensure_database(self, runner: _Runner, port: int) -> None:
        """Create the ``analytics`` database unless it exists."""
        if self._has_database(runner, port):
            return
        done = self._psql(runner, port, f"CREATE DATABASE {DATABASE}")
        if done.returncode != 0 and not self._has_database(runner, port):
            raise EmbeddedPostgresError(f"could not create database {DATABASE}: {_one_line(done)}")

    def _has_database(self, runner: _Runner, port: int) -> bool:
        done = self._psql(runner, port, f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE}'")
        if done.returncode != 0:
            raise EmbeddedPostgresError(f"cannot connect to embedded PostgreSQL on port {port}: {_one_line(done)}")
        return done.stdout.strip() == "1"

    def _psql(self, runner: _Runner, port: int, sql: str) -> subprocess.CompletedProcess[str]:
        target = ("-h", "127.0.0.1", "-p", str(port), "-U", SUPERUSER, "-d", "postgres")
        return runner.run("psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", *target, "-c", sql)

    def _failure(self, what: str, since: int = 0) -> str:
        """One line: ``what``, where the log is, and its last lines written after byte ``since``."""
        try:
            with self._log.open("rb") as log:
                log.seek(since)
                lines = log.read().decode("utf-8", errors="replace").splitlines()
        except OSError:
            lines = []
        tail = " | ".join(line.strip() for line in lines[-LOG_TAIL_LINES:] if line.strip())
        return f"{what} (log: {self._log}): {tail or 'log is empty'}"


def _one_line(done: subprocess.CompletedProcess[str]) -> str:
    """A program's error output on one line."""
    text = (done.stderr or done.stdout or "").strip()
    joined = " | ".join(line.strip() for line in text.splitlines() if line.strip())
    return joined or f"exit status {done.returncode}"
