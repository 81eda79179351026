"""Per-minute reliability rollup of the last days, for MINUTE reports.

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-30

A ``reliability`` report by MINUTE read every raw event of its range (up to 24 hours: 59,000 events of the
benchmark's largest org, scattered over 8,500 heap pages, then a per-event sketch aggregate): about 200 ms of
PostgreSQL time. ``reliability_minute_model`` holds, per org, UTC minute and model, requests, errors, client
errors and the latency sketch, packed (db/sketch.py's layout, ascending by index) as the API reads it.

- Rows exist for every rolled-up hour at or after ``rollup_state.minute_from``; the rollup worker writes them with
  the hourly tables, re-rolls them with dirty hours, and deletes those older than its retention
  (db/rollup.py ``MINUTE_DAYS``), moving ``minute_from`` in the same transaction. Reports read ``minute_from`` in
  their own snapshot and take older hours from raw events, so they stay exact across the deletion.
- ``hour`` (the minute's UTC hour) is stored so that hour-based deletes and plans apply unchanged.
- Filled here from raw events for the hours already rolled up within the retention.
"""

from __future__ import annotations

from db.sketch import index_sql, packed_agg_sql
from db.sqlscript import run_script

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

MINUTE_DAYS = 7  # as db/rollup.py's MINUTE_DAYS when this revision was written

UPGRADE = f"""
CREATE TABLE reliability_minute_model (
    org_id         text        NOT NULL,
    hour           timestamptz NOT NULL,
    minute         timestamptz NOT NULL,
    model          text        NOT NULL,
    requests       bigint      NOT NULL,
    errors         bigint      NOT NULL,
    client_errors  bigint      NOT NULL,
    latency_sketch_packed bytea NOT NULL,
    PRIMARY KEY (org_id, hour, minute, model)
);
CREATE INDEX reliability_minute_model_hour ON reliability_minute_model (hour);
COMMENT ON TABLE reliability_minute_model IS
  'Per org, UTC minute and model, for rolled-up hours from rollup_state.minute_from on: requests, errors '
  '(status >= 500), client errors (400-499) and the packed latency sketch (db/sketch.py).';

ALTER TABLE rollup_state ADD COLUMN minute_from timestamptz;
COMMENT ON COLUMN rollup_state.minute_from IS
  'reliability_minute_model is complete for rolled-up hours at or after this hour (null: no minute rows yet).';

-- The retention's first hour, or the watermark if the rollups stopped before it (no rows then: an empty range).
UPDATE rollup_state
SET minute_from = least(materialized_through, date_trunc('hour', now(), 'UTC') - interval '{MINUTE_DAYS} days')
WHERE materialized_through IS NOT NULL;

INSERT INTO reliability_minute_model
SELECT org_id, date_trunc('hour', minute, 'UTC'), minute, model, sum(n), sum(e), sum(c),
       {packed_agg_sql("idx", "n", ordered=True)}
FROM (
    SELECT ev.org_id, date_bin('1 minute', ev.event_time, TIMESTAMPTZ '2000-01-01 00:00:00+00') AS minute, ev.model,
           {index_sql("ev.latency_ms")} AS idx, count(*) AS n,
           count(*) FILTER (WHERE ev.status_code >= 500) AS e,
           count(*) FILTER (WHERE ev.status_code BETWEEN 400 AND 499) AS c
    FROM usage_events ev, rollup_state s
    WHERE ev.event_time >= s.minute_from AND ev.event_time < s.materialized_through
    GROUP BY 1, 2, 3, 4
) AS per_index
GROUP BY 1, 2, 3, 4;
"""

DOWNGRADE = """
ALTER TABLE rollup_state DROP COLUMN minute_from;
DROP TABLE reliability_minute_model;
"""


def upgrade() -> None:
    run_script(UPGRADE)


def downgrade() -> None:
    run_script(DOWNGRADE)
