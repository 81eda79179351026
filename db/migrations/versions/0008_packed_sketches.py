"""Latency sketches also stored packed, for the API: ``reliability_hourly_model.latency_sketch_packed``.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30

The ``reliability`` query reads one sketch per series bucket (a 30-day HOUR report per model: thousands of
sketches of hundreds of entries). As jsonb text, PostgreSQL formats every entry, the client parses it and makes
a dict of Python ints: that was most of the query's time. Packed, a sketch is bytes the client hands to numpy as
they are: entries of a 4-byte bucket index and an 8-byte count, big-endian (``int4send(index) || int8send(count)``),
ascending by index (``reliability/sketch.py`` reads them; ``db/sketch.py`` has the layout).

- ``sketch_pack(jsonb)``: that layout from a jsonb sketch (immutable; the query also applies it to
  ``usage_hourly`` sketches when a project or API key filter needs that table).
- ``latency_sketch_packed``: a stored generated column, so every writer of ``latency_sketch`` (the rollup worker,
  this and earlier migrations) keeps it exact without knowing of it; the jsonb stays for SQL clients
  (``sketch_merge``/``sketch_quantile`` in Grafana panels).
"""

from __future__ import annotations

from db.sqlscript import run_script

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

UPGRADE = """
CREATE FUNCTION sketch_pack(sketch jsonb) RETURNS bytea
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT coalesce(string_agg(int4send(key::int) || int8send(value::bigint), ''::bytea ORDER BY key::int),
                    ''::bytea)
    FROM jsonb_each_text(sketch)
$$;
COMMENT ON FUNCTION sketch_pack(jsonb) IS
  'A latency sketch as entries of int4 bucket index and int8 count, big-endian, ascending by index '
  '(what the API reads; db/sketch.py).';

ALTER TABLE reliability_hourly_model
    ADD COLUMN latency_sketch_packed bytea GENERATED ALWAYS AS (sketch_pack(latency_sketch)) STORED;
"""

DOWNGRADE = """
ALTER TABLE reliability_hourly_model DROP COLUMN latency_sketch_packed;
DROP FUNCTION sketch_pack(jsonb);
"""


def upgrade() -> None:
    run_script(UPGRADE)


def downgrade() -> None:
    run_script(DOWNGRADE)
