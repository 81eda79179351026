"""Percentile bucket indexes per hourly row, and daily rollups of the latency sketches and of the errors.

Revision ID: 0012
Revises: 0011
Create Date: 2026-11-30

A 30-day HOUR ``reliability`` report per model read one packed sketch per bucket (2,160 sketches, 430,000 entries,
5 MB) for two things: each bucket's percentiles, and the totals' (a merge of them all); and its breakdown read
6,900 hourly error rows. Moving and merging them was most of the query's time (docs/benchmarks.md, "Reliability
query").

- ``sketch_rank_indexes(jsonb)``: the bucket index of each of RANKED_PERCENTILES (0.5, 0.75, 0.9, 0.95, 0.99,
  0.999), by the rank rule of ``reliability/sketch.py`` (nearest rank ``max(1, ceil(q * n))``, q as written);
  null for an empty sketch.
- ``reliability_hourly_model.latency_ranks``: a stored generated column of it. An HOUR bucket per model is one
  hourly row: its percentiles among the six are these indexes' values, with no sketch read.
- ``reliability_daily_model`` (per org, UTC day and model: the merge of the day's hourly sketches, packed and
  ascending by index, and their request count) and ``errors_daily`` (per org, UTC day, model, status code and
  error type: the day's requests of ``errors_hourly``). A row covers the day's rolled-up hours; readers use only
  days wholly rolled up with no hour read raw (db/reliability.py).
- Both are kept by statement triggers on their hourly tables, in the writing transaction: whatever a statement
  inserts, deletes or updates there, the days it touched are rewritten from the hourly rows (``*_rewrite``). So
  every writer keeps them exact without knowing of them, as the generated columns are kept: the rollup worker of
  this release, and one of an earlier release still running during a rolling deploy after this migration.
  TRUNCATE is not followed (nothing truncates them). Filled here from the hourly rows.
"""

from __future__ import annotations

from db.sqlscript import run_script

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

RANKED_PERCENTILES = "0.5,0.75,0.9,0.95,0.99,0.999"  # as db/sketch.py's RANKED_PERCENTILES when this was written

# The daily table, its hourly table, and the INSERT that fills the days ``d(org_id, day)`` from ``h`` (the hourly rows
# of those days, joined as ``{days}``).
DAILY = {
    "reliability_daily_model": (
        "reliability_hourly_model",
        """
    INSERT INTO reliability_daily_model (org_id, day, model, requests, latency_sketch_packed)
    SELECT org_id, day, model, sum(n), string_agg(int4send(idx) || int8send(n), ''::bytea ORDER BY idx)
    FROM (
        SELECT d.org_id, d.day, h.model, s.key::int AS idx, sum(s.value::bigint)::bigint AS n
        FROM {days} CROSS JOIN LATERAL jsonb_each_text(h.latency_sketch) AS s
        GROUP BY 1, 2, 3, 4
    ) AS per_index
    GROUP BY 1, 2, 3""",
    ),
    "errors_daily": (
        "errors_hourly",
        """
    INSERT INTO errors_daily (org_id, day, model, status_code, error_type, requests)
    SELECT d.org_id, d.day, h.model, h.status_code, h.error_type, sum(h.requests)
    FROM {days}
    GROUP BY 1, 2, 3, 4, 5""",
    ),
}
_DAYS = (
    "unnest(orgs, days) AS d(org_id, day) JOIN {hourly} h "
    "ON h.org_id = d.org_id AND h.hour >= d.day AND h.hour < d.day + interval '24 hours'"
)


def _following(daily: str, hourly: str, insert: str) -> str:
    """``{daily}_rewrite(orgs, days)`` (distinct (org, day) pairs: their daily rows from the hourly ones), the trigger
    function that calls it for the days a statement touched, and the triggers."""
    return f"""
CREATE FUNCTION {daily}_rewrite(orgs text[], days timestamptz[]) RETURNS void
LANGUAGE sql AS $$
    DELETE FROM {daily} r USING unnest(orgs, days) AS d(org_id, day) WHERE r.org_id = d.org_id AND r.day = d.day;
    {insert.format(days=_DAYS.format(hourly=hourly)).strip()};
$$;
COMMENT ON FUNCTION {daily}_rewrite(text[], timestamptz[]) IS
  'Rewrites the {daily} rows of the given distinct (org, UTC day) pairs from {hourly}.';

CREATE FUNCTION {daily}_follow() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        PERFORM {daily}_rewrite(array_agg(org_id), array_agg(day))
        FROM (SELECT DISTINCT org_id, date_trunc('day', hour, 'UTC') AS day FROM new_rows) AS touched;
    ELSIF TG_OP = 'DELETE' THEN
        PERFORM {daily}_rewrite(array_agg(org_id), array_agg(day))
        FROM (SELECT DISTINCT org_id, date_trunc('day', hour, 'UTC') AS day FROM old_rows) AS touched;
    ELSE
        PERFORM {daily}_rewrite(array_agg(org_id), array_agg(day))
        FROM (SELECT org_id, date_trunc('day', hour, 'UTC') AS day FROM new_rows
              UNION SELECT org_id, date_trunc('day', hour, 'UTC') FROM old_rows) AS touched;
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER {daily}_on_insert AFTER INSERT ON {hourly}
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION {daily}_follow();
CREATE TRIGGER {daily}_on_delete AFTER DELETE ON {hourly}
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION {daily}_follow();
CREATE TRIGGER {daily}_on_update AFTER UPDATE ON {hourly}
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION {daily}_follow();

SELECT {daily}_rewrite(array_agg(org_id), array_agg(day))
FROM (SELECT DISTINCT org_id, date_trunc('day', hour, 'UTC') AS day FROM {hourly}) AS every_day;
"""


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
COMMENT ON TABLE reliability_daily_model IS
  'Per org, UTC day and model: the merge of the day''s rolled-up hourly latency sketches (packed, db/sketch.py) '
  'and their request count; kept by triggers on reliability_hourly_model.';

CREATE TABLE errors_daily (
    org_id      text        NOT NULL,
    day         timestamptz NOT NULL,
    model       text        NOT NULL,
    status_code smallint    NOT NULL,
    error_type  text,
    requests    bigint      NOT NULL
);
CREATE UNIQUE INDEX errors_daily_key ON errors_daily (org_id, day, model, status_code, error_type) NULLS NOT DISTINCT;
COMMENT ON TABLE errors_daily IS
  'Requests with status_code >= 400 per org, UTC day, model, status code and error type: the sum of the day''s '
  'rolled-up errors_hourly rows; kept by triggers on errors_hourly.';
{"".join(_following(daily, hourly, insert) for daily, (hourly, insert) in DAILY.items())}"""

DOWNGRADE = (
    "\n".join(
        f"DROP TRIGGER {daily}_on_{event} ON {hourly};"
        for daily, (hourly, _) in DAILY.items()
        for event in ("insert", "delete", "update")
    )
    + """
DROP FUNCTION errors_daily_follow();
DROP FUNCTION errors_daily_rewrite(text[], timestamptz[]);
DROP FUNCTION reliability_daily_model_follow();
DROP FUNCTION reliability_daily_model_rewrite(text[], timestamptz[]);
DROP TABLE errors_daily;
DROP TABLE reliability_daily_model;
ALTER TABLE reliability_hourly_model DROP COLUMN latency_ranks;
DROP FUNCTION sketch_rank_indexes(jsonb);
"""
)


def upgrade() -> None:
    run_script(UPGRADE)


def downgrade() -> None:
    run_script(DOWNGRADE)
