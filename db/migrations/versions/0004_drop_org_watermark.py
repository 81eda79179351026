"""Drop freshness_status.materialized_through: the rollup watermark is global (rollup_state).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29
"""

from __future__ import annotations

from db.sqlscript import run_script

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_script("ALTER TABLE freshness_status DROP COLUMN materialized_through;")


def downgrade() -> None:
    run_script("ALTER TABLE freshness_status ADD COLUMN materialized_through timestamptz;")
