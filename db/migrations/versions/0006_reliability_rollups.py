"""Reliability rollups: errors and a latency sketch per org, hour and model; errors by status code and type;
sketch functions that SQL clients (Grafana panels) share with the API.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30

- ``reliability_hourly_model``: per org, UTC hour and model, requests, errors (status >= 500), client errors
  (400-499) and the merged latency sketch: one row per series bucket of ``reliability`` (no merging of the
  per-project/key/status-class sketches of ``usage_hourly`` at query time).
- ``errors_hourly``: requests with status >= 400 per org, hour, model, project, API key, status code and
  error type: the ``breakdown`` and the attribution of error spikes without scanning raw events.
- ``sketch_merge(jsonb)`` (aggregate) and ``sketch_quantile(jsonb, q)``: the same merge and rank rule as
  ``reliability/sketch.py`` (nearest rank: the value of rank ``ceil(q * n)``), reported as the bucket's
  representative value.

The rollup worker keeps both tables in step with ``usage_hourly`` in the same transactions (db/rollup.py);
hours already rolled up are filled here from raw events.
"""

from __future__ import annotations

from db.sketch import GAMMA, ZERO_INDEX, index_sql
from db.sqlscript import run_script

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

UPGRADE = f"""
CREATE TABLE reliability_hourly_model (
    org_id         text        NOT NULL,
    hour           timestamptz NOT NULL,
    model          text        NOT NULL,
    requests       bigint      NOT NULL,
    errors         bigint      NOT NULL,
    client_errors  bigint      NOT NULL,
    latency_sketch jsonb       NOT NULL,
    PRIMARY KEY (org_id, hour, model)
);
COMMENT ON TABLE reliability_hourly_model IS
  'Per org, UTC hour and model: requests, errors (status >= 500), client errors (400-499) and the latency '
  'sketch (log-bucket index to count, db/sketch.py).';

CREATE TABLE errors_hourly (
    org_id      text        NOT NULL,
    hour        timestamptz NOT NULL,
    model       text        NOT NULL,
    project_id  text,
    api_key_id  text,
    status_code smallint    NOT NULL,
    error_type  text,
    requests    bigint      NOT NULL
);
CREATE UNIQUE INDEX errors_hourly_key ON errors_hourly
    (org_id, hour, model, project_id, api_key_id, status_code, error_type) NULLS NOT DISTINCT;
COMMENT ON TABLE errors_hourly IS
  'Requests with status_code >= 400 per org, UTC hour, model, project, API key, status code and error type.';

CREATE FUNCTION sketch_add(state jsonb, sketch jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT coalesce(jsonb_object_agg(key, total), '{{}}'::jsonb)
    FROM (SELECT key, sum(value::bigint) AS total
          FROM (SELECT * FROM jsonb_each_text(state) UNION ALL SELECT * FROM jsonb_each_text(sketch)) AS pairs
          GROUP BY key) AS merged
$$;
CREATE AGGREGATE sketch_merge(jsonb) (SFUNC = sketch_add, STYPE = jsonb, INITCOND = '{{}}');
COMMENT ON AGGREGATE sketch_merge(jsonb) IS 'Adds latency sketches bucket by bucket (an exact merge).';

CREATE FUNCTION sketch_quantile(sketch jsonb, q double precision) RETURNS double precision
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN b.idx = {ZERO_INDEX} THEN 0::double precision
                ELSE 2 * power({GAMMA!r}::double precision, b.idx) / ({GAMMA!r} + 1) END
    FROM (SELECT key::int AS idx,
                 sum(value::bigint) OVER (ORDER BY key::int) AS below,
                 sum(value::bigint) OVER () AS n
          FROM jsonb_each_text(sketch)) AS b
    WHERE q > 0 AND q <= 1 AND b.below >= greatest(1, ceil(q::numeric * b.n))
    ORDER BY b.idx
    LIMIT 1
$$;
COMMENT ON FUNCTION sketch_quantile(jsonb, double precision) IS
  'The q-quantile of a latency sketch in ms (nearest rank ceil(q * n)), within 1 % of the exact value; '
  'null for an empty sketch or q outside (0, 1].';

INSERT INTO reliability_hourly_model
SELECT org_id, hour, model, sum(n), sum(e), sum(c), jsonb_object_agg(idx::text, n)
FROM (
    SELECT e.org_id, date_trunc('hour', e.event_time, 'UTC') AS hour, e.model, {index_sql("e.latency_ms")} AS idx,
           count(*) AS n, count(*) FILTER (WHERE e.status_code >= 500) AS e,
           count(*) FILTER (WHERE e.status_code BETWEEN 400 AND 499) AS c
    FROM usage_events e, rollup_state s
    WHERE s.materialized_through IS NOT NULL AND e.event_time < s.materialized_through
    GROUP BY 1, 2, 3, 4
) AS per_bucket
GROUP BY 1, 2, 3;

INSERT INTO errors_hourly
SELECT e.org_id, date_trunc('hour', e.event_time, 'UTC'), e.model, e.project_id, e.api_key_id, e.status_code,
       e.error_type, count(*)
FROM usage_events e, rollup_state s
WHERE s.materialized_through IS NOT NULL AND e.event_time < s.materialized_through AND e.status_code >= 400
GROUP BY 1, 2, 3, 4, 5, 6, 7;
"""

DOWNGRADE = """
DROP FUNCTION sketch_quantile(jsonb, double precision);
DROP AGGREGATE sketch_merge(jsonb);
DROP FUNCTION sketch_add(jsonb, jsonb);
DROP TABLE errors_hourly;
DROP TABLE reliability_hourly_model;
"""


def upgrade() -> None:
    run_script(UPGRADE)


def downgrade() -> None:
    run_script(DOWNGRADE)
