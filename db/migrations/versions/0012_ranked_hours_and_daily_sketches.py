"""Percentile bucket indexes per hourly row, and a daily rollup of the latency sketches.

Revision ID: 0012
Revises: 0011
Create Date: 2026-11-30

A 30-day HOUR ``reliability`` report per model read one packed sketch per bucket (2,160 sketches, 430,000 entries,
5 MB) for two things: each bucket's percentiles, and the totals' (a merge of them all). Moving and merging them
was most of the query's time (docs/benchmarks.md, "Reliability query").

- ``sketch_rank_indexes(jsonb)``: the bucket index of each of RANKED_PERCENTILES (0.5, 0.75, 0.9, 0.95, 0.99,
  0.999), by the rank rule of ``reliability/sketch.py`` (nearest rank ``max(1, ceil(q * n))``, q as written);
  null for an empty sketch.
- ``reliability_hourly_model.latency_ranks``: a stored generated column of it, so every writer of
  ``latency_sketch`` keeps it exact without knowing of it. An HOUR bucket per model is one hourly row: its
  percentiles among the six are these indexes' values, with no sketch read.
- ``reliability_daily_model``: per org, UTC day and model, the merge of that day's hourly sketches (packed,
  ascending by index) and their request count. The rollup worker rewrites a day's rows whenever it writes one of
  its hours (db/rollup.py), in the same transaction; a row covers the day's rolled-up hours, and readers use only
  days wholly rolled up with no hour read raw (db/reliability.py). Filled here from the hourly rows.
- ``errors_daily``: per org, UTC day, model, status code and error type, the requests of ``errors_hourly`` (status
  >= 400), kept and read the same way: a report's breakdown over 30 days read 6,900 hourly rows of the largest org.
"""

from __future__ import annotations

from db.sqlscript import run_script

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

RANKED_PERCENTILES = "0.5,0.75,0.9,0.95,0.99,0.999"  # as db/sketch.py's RANKED_PERCENTILES when this was written

UPGRADE = f"""
CREATE FUNCTION sketch_rank_indexes(sketch jsonb) RETURNS int[]
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    WITH entries AS (
        SELECT key::int AS idx, sum(value::bigint) OVER (ORDER BY key::int) AS below,
               sum(value::bigint) OVER () AS n
        FROM jsonb_each_text(sketch)
    )
    SELECT array_agg((SELECT min(e.idx) FROM entries e WHERE e.below >= greatest(1, ceil(q.q * e.n))) ORDER BY q.o)
    FROM unnest('{{{RANKED_PERCENTILES}}}'::numeric[]) WITH ORDINALITY AS q(q, o)
    WHERE (SELECT max(n) FROM entries) > 0
$$;
COMMENT ON FUNCTION sketch_rank_indexes(jsonb) IS
  'The bucket index of the {RANKED_PERCENTILES} percentiles of a latency sketch (nearest rank ceil(q * n)); '
  'null for an empty sketch.';

ALTER TABLE reliability_hourly_model
    ADD COLUMN latency_ranks int[] GENERATED ALWAYS AS (sketch_rank_indexes(latency_sketch)) STORED;

CREATE TABLE reliability_daily_model (
    org_id                text        NOT NULL,
    day                   timestamptz NOT NULL,
    model                 text        NOT NULL,
    requests              bigint      NOT NULL,
    latency_sketch_packed bytea       NOT NULL,
    PRIMARY KEY (org_id, day, model)
);
CREATE INDEX reliability_daily_model_day ON reliability_daily_model (day);
COMMENT ON TABLE reliability_daily_model IS
  'Per org, UTC day and model: the merge of the day''s rolled-up hourly latency sketches (packed, db/sketch.py) '
  'and their request count.';

CREATE TABLE errors_daily (
    org_id      text        NOT NULL,
    day         timestamptz NOT NULL,
    model       text        NOT NULL,
    status_code smallint    NOT NULL,
    error_type  text,
    requests    bigint      NOT NULL
);
CREATE UNIQUE INDEX errors_daily_key ON errors_daily (org_id, day, model, status_code, error_type) NULLS NOT DISTINCT;
CREATE INDEX errors_daily_day ON errors_daily (day);
COMMENT ON TABLE errors_daily IS
  'Requests with status_code >= 400 per org, UTC day, model, status code and error type: the sum of the day''s '
  'rolled-up errors_hourly rows.';

INSERT INTO errors_daily (org_id, day, model, status_code, error_type, requests)
SELECT org_id, date_trunc('day', hour, 'UTC'), model, status_code, error_type, sum(requests)
FROM errors_hourly
GROUP BY 1, 2, 3, 4, 5;

INSERT INTO reliability_daily_model (org_id, day, model, requests, latency_sketch_packed)
SELECT org_id, day, model, sum(n), string_agg(int4send(idx) || int8send(n), ''::bytea ORDER BY idx)
FROM (
    SELECT h.org_id, date_trunc('day', h.hour, 'UTC') AS day, h.model, s.key::int AS idx,
           sum(s.value::bigint)::bigint AS n
    FROM reliability_hourly_model h CROSS JOIN LATERAL jsonb_each_text(h.latency_sketch) AS s
    GROUP BY 1, 2, 3, 4
) AS per_index
GROUP BY 1, 2, 3;
"""

DOWNGRADE = """
DROP TABLE errors_daily;
DROP TABLE reliability_daily_model;
ALTER TABLE reliability_hourly_model DROP COLUMN latency_ranks;
DROP FUNCTION sketch_rank_indexes(jsonb);
"""


def upgrade() -> None:
    run_script(UPGRADE)


def downgrade() -> None:
    run_script(DOWNGRADE)
