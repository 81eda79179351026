"""The gateway's configuration: one typed object read once from ``ANALYTICS_*``.

Every variable of contracts section 4 is a field here. ``load_settings`` turns a
validation failure into a :class:`ConfigError` whose message is one line naming
the variable, which the CLI prints before exiting non-zero.
"""

from __future__ import annotations

import os
from enum import StrEnum
from pathlib import Path

from pydantic import AnyUrl, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from kernel.errors import ConfigError

ENV_PREFIX = "ANALYTICS_"


class ProcessRole(StrEnum):
    """The parts of the gateway that one ``serve`` process can run (``--role``); not a token's role, which
    grants scopes (``kernel/scopes.py``)."""

    API = "api"
    INGEST = "ingest"
    ROLLUP = "rollup"
    EXPORT = "export"


ALL_ROLES: frozenset[ProcessRole] = frozenset(ProcessRole)


def parse_roles(text: str) -> frozenset[ProcessRole]:
    """``"api,ingest"`` as roles; ValueError naming the valid ones otherwise."""
    try:
        roles = frozenset(ProcessRole(part.strip()) for part in text.split(",") if part.strip())
    except ValueError:
        roles = frozenset()
    if not roles:
        raise ValueError(f"takes a comma-separated list of {', '.join(r.value for r in ProcessRole)}")
    return roles


class Settings(BaseSettings):
    """Configuration of one gateway process. Unset means the embedded default."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    database_url: SecretStr | None = None
    amqp_url: SecretStr | None = None
    redis_url: SecretStr | None = None

    s3_endpoint_url: AnyUrl | None = None
    s3_bucket: str | None = None
    s3_region: str = "us-east-1"

    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)

    jwt_secret: SecretStr | None = None
    jwt_jwks_url: AnyUrl | None = None
    jwt_issuer: str | None = None
    jwt_audience: str | None = None

    export_retention_days: int = Field(default=30, ge=1)
    raw_retention_days: int = Field(default=90, ge=1)
    # The export worker (docs/finance-exports.md): a job's lease (renewed every third of it), attempts and
    # their backoff, how often an idle worker looks for work, the largest INCIDENT export, the lifetime of a
    # download link (SigV4's limit is 7 days), and the key of the gateway's own links for the local folder
    # (unset: generated once into the data dir).
    export_lease_s: float = Field(default=60.0, ge=1, le=3600)
    export_max_attempts: int = Field(default=5, ge=1, le=100)
    export_retry_base_s: float = Field(default=10.0, ge=0, le=86400)
    export_retry_max_s: float = Field(default=600.0, ge=0, le=86400)
    export_poll_s: float = Field(default=1.0, gt=0, le=3600)
    export_incident_max_rows: int = Field(default=5_000_000, ge=1)
    export_link_ttl_s: int = Field(default=900, ge=1, le=604_800)
    export_link_secret: SecretStr | None = None
    # The retention sweeper: how often it runs (expired exports, raw partitions, event receipts).
    retention_interval_s: float = Field(default=3600.0, gt=0)

    # Ingestion from RabbitMQ: prefetch bounds what is in memory (backpressure);
    # a batch is flushed when it holds batch_events events or is batch_max_age_ms old.
    ingest_prefetch: int = Field(default=2000, ge=1, le=65535)
    ingest_batch_events: int = Field(default=20000, ge=1)
    ingest_batch_max_age_ms: int = Field(default=100, ge=1)
    amqp_delivery_limit: int = Field(default=20, ge=1)
    ingest_heartbeat_s: float = Field(default=1.0, gt=0)
    # How long a stop (SIGTERM, Ctrl-C) may take: every role drains what it can within it, then exits.
    shutdown_grace_s: float = Field(default=10.0, gt=0, le=3600)

    # Rollups and freshness.
    rollup_interval_s: float = Field(default=5.0, gt=0)
    freshness_fresh_s: float = Field(default=60.0, gt=0)
    freshness_stale_s: float = Field(default=300.0, gt=0)
    freshness_cache_ttl_s: float = Field(default=5.0, gt=0)
    freshness_push_s: float = Field(default=30.0, gt=0)

    # Additions to the contract: names shared with other runs of the gateway
    # (tests give every run its own prefix), and where local state lives.
    amqp_prefix: str = ""
    redis_prefix: str = "analytics:"
    data_dir: Path = Path(".data")
    log_level: str = "INFO"
    db_pool_size: int = Field(default=20, ge=1)
    # Allocations between young garbage collections once started (see gateway/gc_policy.py).
    gc_gen0_threshold: int = Field(default=50_000, ge=100)
    # Buffers up to this many MiB come from malloc's heap and are reused (gateway/allocator.py); 0: glibc's default.
    malloc_mmap_threshold_mb: int = Field(default=32, ge=0, le=32)
    # Helper processes for the CPU-bound steps of an answer (kernel/offload.py: spike detection): one where the
    # machine has a second core, else none; 0 runs every step in the serving process.
    offload_workers: int = Field(default_factory=lambda: 1 if (os.cpu_count() or 1) >= 2 else 0, ge=0, le=64)
    # Bounded cost of every request (docs/security.md): what one caller may send and run.
    graphql_max_body_bytes: int = Field(default=1024 * 1024, ge=1024)
    graphql_max_document_bytes: int = Field(default=32 * 1024, ge=256)
    graphql_max_fields: int = Field(default=1000, ge=10)
    graphql_max_cost: int = Field(default=200_000, ge=1)
    rate_limit_per_minute: int = Field(default=600, ge=1)
    max_concurrent_per_caller: int = Field(default=8, ge=1)
    db_statement_timeout_ms: int = Field(default=15_000, ge=100)
    db_pool_timeout_s: float = Field(default=5.0, gt=0)
    jwt_max_token_bytes: int = Field(default=8192, ge=256)
    # Production switches: the in-browser IDE and schema introspection.
    graphiql_enabled: bool = True
    introspection_enabled: bool = True
    # What ``serve`` runs: its roles (``--role`` overrides) and how many worker processes (``--workers``).
    roles: str = ",".join(sorted(ALL_ROLES))
    workers: int = Field(default=1, ge=1, le=64)

    @property
    def role_set(self) -> frozenset[ProcessRole]:
        return parse_roles(self.roles)

    @field_validator("roles")
    @classmethod
    def _known_roles(cls, value: str) -> str:
        parse_roles(value)
        return value

    @field_validator("database_url")
    @classmethod
    def _postgres_scheme(cls, value: SecretStr | None) -> SecretStr | None:
        return _check_scheme(value, ("postgresql://", "postgres://", "postgresql+asyncpg://"))

    @field_validator("amqp_url")
    @classmethod
    def _amqp_scheme(cls, value: SecretStr | None) -> SecretStr | None:
        return _check_scheme(value, ("amqp://", "amqps://"))

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: SecretStr | None) -> SecretStr | None:
        return _check_scheme(value, ("redis://", "rediss://", "unix://"))

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        if value.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
        return value.upper()

    @field_validator("jwt_secret")
    @classmethod
    def _secret_length(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 32:
            raise ValueError("must be at least 32 characters (HS256 key)")
        return value

    def require_for(self, roles: frozenset[ProcessRole]) -> None:
        """Fail with one line if a setting that ``roles`` need is missing."""
        no_key = self.jwt_secret is None and self.jwt_jwks_url is None
        if ProcessRole.API in roles and no_key and self.database_url is not None:
            raise ConfigError(
                f"{ENV_PREFIX}JWT_SECRET or {ENV_PREFIX}JWT_JWKS_URL must be set "
                "when a database is configured (only the embedded default has a development secret)"
            )
        if self.export_retry_max_s < self.export_retry_base_s:
            raise ConfigError(
                f"{ENV_PREFIX}EXPORT_RETRY_MAX_S must be at least {ENV_PREFIX}EXPORT_RETRY_BASE_S "
                f"({self.export_retry_base_s:g} s)"
            )
        if self.export_link_secret is not None and len(self.export_link_secret.get_secret_value()) < 32:
            raise ConfigError(f"{ENV_PREFIX}EXPORT_LINK_SECRET must be at least 32 characters")
        if self.s3_endpoint_url is not None and self.s3_bucket is None:
            raise ConfigError(f"{ENV_PREFIX}S3_BUCKET must be set when {ENV_PREFIX}S3_ENDPOINT_URL is")


def _check_scheme(value: SecretStr | None, schemes: tuple[str, ...]) -> SecretStr | None:
    if value is not None and not value.get_secret_value().startswith(schemes):
        raise ValueError(f"must be a URL starting with {' or '.join(schemes)}")
    return value


def load_settings(**overrides: object) -> Settings:
    """Read the environment (and ``overrides``); one clear line on a bad value."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None


def _describe(exc: ValidationError) -> str:
    first = exc.errors(include_url=False, include_input=False)[0]
    field = str(first["loc"][0]) if first["loc"] else "?"
    message = str(first["msg"]).removeprefix("Value error, ")
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{ENV_PREFIX}{field.upper()}: {message}{more}"
