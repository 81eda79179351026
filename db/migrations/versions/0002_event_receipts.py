"""Event receipts: one row per accepted (source, id), for deduplication.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29

``usage_events`` is partitioned by event time, so a unique key there cannot
stop the same (source, id) arriving again with another time. This table can:
first write wins, for as long as its rows are kept (at least the raw
retention). Its key is (source, id) rather than org_id first on purpose: the
identity of an event does not include its org, and a replay with a different
org must still count as a duplicate.
"""

from __future__ import annotations

from db.sqlscript import run_script

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

UPGRADE = r"""
CREATE TABLE event_receipts (
    source      text        NOT NULL,
    event_id    text        NOT NULL,
    org_id      text        NOT NULL,
    event_time  timestamptz NOT NULL,
    batch_id    bigint      NOT NULL,
    PRIMARY KEY (source, event_id)
);
CREATE INDEX event_receipts_event_time ON event_receipts USING brin (event_time);
"""

DOWNGRADE = "DROP TABLE event_receipts;"


def upgrade() -> None:
    run_script(UPGRADE)


def downgrade() -> None:
    run_script(DOWNGRADE)
