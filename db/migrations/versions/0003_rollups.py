"""Hourly rollups with a latency sketch, their watermarks, dirty hours, ingest heartbeats.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29

How rollups stay exact while events keep arriving (see db/rollup.py):

- ``rollup_state.materialized_through`` (M, null at first): rollups are complete for hours
  before M; queries read raw events from M on.
- ``rollup_state.dirty_before`` (D >= M): writers mark the (org, hour) of every
  new event before D in ``rollup_dirty``, in the same transaction. Queries read
  dirty hours from raw events until the worker has re-rolled them.
- Writers hold a shared advisory lock while they write; the worker moves D
  under the exclusive lock, so no write can miss the new D.
"""

from __future__ import annotations

from db.sqlscript import run_script

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

UPGRADE = r"""
CREATE TABLE usage_hourly (
    org_id              text        NOT NULL,
    hour                timestamptz NOT NULL,
    model               text        NOT NULL,
    project_id          text,
    api_key_id          text,
    status_class        smallint    NOT NULL,
    requests            bigint      NOT NULL,
    input_tokens        bigint      NOT NULL,
    cached_input_tokens bigint      NOT NULL,
    output_tokens       bigint      NOT NULL,
    latency_sum_ms      double precision NOT NULL,
    latency_sketch      jsonb       NOT NULL
);
CREATE UNIQUE INDEX usage_hourly_key ON usage_hourly
    (org_id, hour, model, project_id, api_key_id, status_class) NULLS NOT DISTINCT;
COMMENT ON TABLE usage_hourly IS
  'Per org, UTC hour, model, project, API key and status class (status_code / 100). '
  'latency_sketch maps log-bucket index to count (db/sketch.py).';

CREATE TABLE rollup_state (
    singleton            boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    materialized_through timestamptz,
    dirty_before         timestamptz,
    updated_at           timestamptz NOT NULL DEFAULT now(),
    CHECK (materialized_through <= dirty_before)
);
INSERT INTO rollup_state DEFAULT VALUES;

CREATE TABLE rollup_dirty (
    org_id    text        NOT NULL,
    hour      timestamptz NOT NULL,
    marked_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (org_id, hour)
);

CREATE TABLE ingest_heartbeats (
    instance          text PRIMARY KEY,
    beat_at           timestamptz NOT NULL,
    caught_up_through timestamptz NOT NULL
);
"""

DOWNGRADE = """
DROP TABLE ingest_heartbeats;
DROP TABLE rollup_dirty;
DROP TABLE rollup_state;
DROP TABLE usage_hourly;
"""


def upgrade() -> None:
    run_script(UPGRADE)


def downgrade() -> None:
    run_script(DOWNGRADE)
