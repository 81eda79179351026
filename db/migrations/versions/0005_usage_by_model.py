"""usage_hourly_model: the hourly rollup summed over projects, keys and status classes.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29

Most usage queries group and filter by model at most; for them this table has
a few rows per org and hour instead of one per project, key and status class
(measured: db/usage.py picks it). The rollup worker keeps both tables in step,
in the same transactions.
"""

from __future__ import annotations

from db.sqlscript import run_script

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

UPGRADE = """
CREATE TABLE usage_hourly_model (
    org_id              text        NOT NULL,
    hour                timestamptz NOT NULL,
    model               text        NOT NULL,
    requests            bigint      NOT NULL,
    input_tokens        bigint      NOT NULL,
    cached_input_tokens bigint      NOT NULL,
    output_tokens       bigint      NOT NULL,
    PRIMARY KEY (org_id, hour, model)
);
INSERT INTO usage_hourly_model
SELECT org_id, hour, model, sum(requests), sum(input_tokens), sum(cached_input_tokens), sum(output_tokens)
FROM usage_hourly GROUP BY org_id, hour, model;
"""


def upgrade() -> None:
    run_script(UPGRADE)


def downgrade() -> None:
    run_script("DROP TABLE usage_hourly_model;")
