"""Event receipts keyed by org: primary key ``(org_id, source, event_id)`` instead of ``(source, event_id)``.

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-30

A table distributed by ``org_id`` (Citus, docs/scaling.md) can only enforce unique keys that contain ``org_id``;
with this key, every table an ingest batch writes is keyed by org first. ``org_id`` has been a NOT NULL column of
``event_receipts`` since 0002 (filled from every accepted event), so nothing needs backfilling: the upgrade is one
``ALTER TABLE`` that drops the old key and builds the new one (one index build, no row-by-row work), which a
populated database (benchmark data sets of 10M events are upgraded in place) takes in one pass.

What changes: deduplication is per org. The same ``(source, id)`` sent for two orgs is two events, one per org
(before, the second was a duplicate of the first whatever its org). Within one org, first write still wins
(docs/events.md, "Identity and duplicates").

Downgrade restores the old key. Where one ``(source, id)`` was accepted for several orgs, it keeps the receipt of
the earliest batch (the lowest ``batch_id``, then ``org_id``) and deletes the others, so the old key can be built;
the events themselves stay in ``usage_events`` and the rollups (nothing counted is rewritten), and from then on the
identity is global again.
"""

from __future__ import annotations

from db.sqlscript import run_script

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

UPGRADE = """
ALTER TABLE event_receipts
    DROP CONSTRAINT event_receipts_pkey,
    ADD CONSTRAINT event_receipts_pkey PRIMARY KEY (org_id, source, event_id);
COMMENT ON TABLE event_receipts IS
  'One row per accepted event, keyed by (org_id, source, event_id): deduplication per org, first write wins.';
"""

DOWNGRADE = """
DELETE FROM event_receipts r
USING event_receipts f
WHERE f.source = r.source AND f.event_id = r.event_id AND (f.batch_id, f.org_id) < (r.batch_id, r.org_id);
ALTER TABLE event_receipts
    DROP CONSTRAINT event_receipts_pkey,
    ADD CONSTRAINT event_receipts_pkey PRIMARY KEY (source, event_id);
COMMENT ON TABLE event_receipts IS NULL;
"""


def upgrade() -> None:
    run_script(UPGRADE)


def downgrade() -> None:
    run_script(DOWNGRADE)
