"""Initial schema: raw events, ingestion batches, freshness, prices, exports, audit.

Revision ID: 0001
Revises:
Create Date: 2026-11-29

Keys start with ``org_id`` wherever a row belongs to one org, so the tables
can be distributed by org (Citus) later. Money is NUMERIC, counts BIGINT.
"""

from __future__ import annotations

from db.sqlscript import run_script

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

UPGRADE = r"""
CREATE TABLE usage_events (
    org_id              text             NOT NULL,
    event_time          timestamptz      NOT NULL,
    source              text             NOT NULL,
    event_id            text             NOT NULL,
    project_id          text,
    api_key_id          text,
    model               text             NOT NULL,
    input_tokens        bigint           NOT NULL CHECK (input_tokens >= 0),
    cached_input_tokens bigint           NOT NULL DEFAULT 0 CHECK (cached_input_tokens >= 0),
    output_tokens       bigint           NOT NULL CHECK (output_tokens >= 0),
    latency_ms          double precision NOT NULL CHECK (latency_ms >= 0),
    ttft_ms             double precision,
    status_code         smallint         NOT NULL CHECK (status_code BETWEEN 100 AND 599),
    error_type          text,
    region              text,
    batch_id            bigint,
    ingested_at         timestamptz      NOT NULL DEFAULT now(),
    PRIMARY KEY (org_id, event_time, source, event_id),
    CHECK (cached_input_tokens <= input_tokens)
) PARTITION BY RANGE (event_time);

COMMENT ON TABLE usage_events IS
  'One row per accepted usage event; daily partitions usage_events_pYYYYMMDD (UTC).';

CREATE FUNCTION analytics_ensure_usage_partition(day date) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    partition_name text := format('usage_events_p%s', to_char(day, 'YYYYMMDD'));
BEGIN
    IF to_regclass(partition_name) IS NULL THEN
        -- Serialize creators: two writers must not race on the same partition.
        PERFORM pg_advisory_xact_lock(hashtext('usage_events partitions'));
        IF to_regclass(partition_name) IS NULL THEN
            EXECUTE format(
                'CREATE TABLE %I PARTITION OF usage_events FOR VALUES FROM (%L) TO (%L)',
                partition_name,
                (day::timestamp AT TIME ZONE 'UTC'),
                ((day + 1)::timestamp AT TIME ZONE 'UTC'));
        END IF;
    END IF;
    RETURN partition_name;
END
$$;

CREATE TABLE ingestion_batches (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    channel         text        NOT NULL CHECK (channel IN ('amqp', 'http', 'seed')),
    accepted        bigint      NOT NULL DEFAULT 0,
    duplicates      bigint      NOT NULL DEFAULT 0,
    rejected        bigint      NOT NULL DEFAULT 0,
    min_event_time  timestamptz,
    max_event_time  timestamptz,
    started_at      timestamptz NOT NULL,
    committed_at    timestamptz NOT NULL DEFAULT now(),
    duration_ms     double precision NOT NULL DEFAULT 0
);
CREATE INDEX ingestion_batches_committed_at ON ingestion_batches (committed_at);

CREATE TABLE freshness_status (
    org_id               text PRIMARY KEY,
    last_event_at        timestamptz,
    last_ingested_at     timestamptz,
    materialized_through timestamptz,
    updated_at           timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE model_prices (
    model                    text        NOT NULL,
    effective_from           timestamptz NOT NULL
        CHECK (effective_from = date_trunc('hour', effective_from AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'),
    input_per_million        numeric     NOT NULL CHECK (input_per_million >= 0),
    output_per_million       numeric     NOT NULL CHECK (output_per_million >= 0),
    cached_input_per_million numeric     NOT NULL CHECK (cached_input_per_million >= 0),
    currency                 text        NOT NULL DEFAULT 'USD',
    created_by               text        NOT NULL,
    created_at               timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (model, effective_from)
);

CREATE TABLE export_jobs (
    id               uuid PRIMARY KEY,
    org_id           text,
    kind             text        NOT NULL CHECK (kind IN ('COST', 'INCIDENT')),
    status           text        NOT NULL DEFAULT 'QUEUED'
        CHECK (status IN ('QUEUED', 'RUNNING', 'SUCCEEDED', 'FAILED', 'CANCELLED', 'EXPIRED')),
    requested_by     text        NOT NULL,
    idempotency_key  text,
    params           jsonb       NOT NULL DEFAULT '{}'::jsonb,
    range_from       timestamptz NOT NULL,
    range_to         timestamptz NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    started_at       timestamptz,
    finished_at      timestamptz,
    lease_owner      text,
    lease_expires_at timestamptz,
    attempts         integer     NOT NULL DEFAULT 0,
    row_count        bigint,
    totals           jsonb,
    checksum_sha256  text,
    object_key       text,
    expires_at       timestamptz,
    error            text,
    CHECK (range_from < range_to)
);
CREATE INDEX export_jobs_org_created ON export_jobs (org_id, created_at DESC, id);
CREATE INDEX export_jobs_runnable ON export_jobs (created_at) WHERE status IN ('QUEUED', 'RUNNING');
CREATE UNIQUE INDEX export_jobs_idempotency
    ON export_jobs (coalesce(org_id, ''), kind, requested_by, idempotency_key)
    WHERE idempotency_key IS NOT NULL;

CREATE TABLE audit_log (
    id        bigint GENERATED ALWAYS AS IDENTITY,
    org_id    text,
    at        timestamptz NOT NULL DEFAULT now(),
    actor     text        NOT NULL,
    action    text        NOT NULL,
    target    text,
    outcome   text        NOT NULL,
    detail    jsonb       NOT NULL DEFAULT '{}'::jsonb,
    PRIMARY KEY (id)
);
CREATE INDEX audit_log_org_at ON audit_log (org_id, at);

CREATE FUNCTION analytics_audit_log_is_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only (% refused)', TG_OP;
END
$$;
CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION analytics_audit_log_is_append_only();
"""

DOWNGRADE = r"""
DROP TABLE audit_log;
DROP FUNCTION analytics_audit_log_is_append_only();
DROP TABLE export_jobs;
DROP TABLE model_prices;
DROP TABLE freshness_status;
DROP TABLE ingestion_batches;
DROP FUNCTION analytics_ensure_usage_partition(date);
DROP TABLE usage_events;
"""


def upgrade() -> None:
    run_script(UPGRADE)


def downgrade() -> None:
    run_script(DOWNGRADE)
