"""Event receipts keyed by the event's identity again: primary key ``(source, event_id)``, whatever the org.

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-30

Why: the contract producers rely on (shared/contracts/README.md, "Identity: ``(source, id)``. An event whose
identity was already accepted is a duplicate"; DESIGN.md, "Deduplication by ``(source, id)``, first write wins").
Migration 0009 keyed receipts by ``(org_id, source, event_id)``, so the same ``(source, id)`` sent again with
another ``data.org_id`` (a replay with a changed payload, a producer bug) was stored and counted a second time.
That breaks the contract; this revision restores the key of 0002. A later distribution by ``org_id``
(docs/scaling.md) must place ``event_receipts`` by ``source`` or on the coordinator instead of changing the key.

What it does, one statement per step, no row loops:

1. ``LOCK TABLE`` first, so no ingester can add a second org's receipt between steps 2 and 3 (the key build would
   then fail) and the lock is not upgraded half way (ingesters and the pruner wait for the migration's commit).
2. Where one ``(source, id)`` has receipts for several orgs (accepted while 0009 was in force), keep the receipt of
   the earliest batch (the lowest ``batch_id``, then ``org_id``) and delete the others: the same statement as
   0009's downgrade. The events already stored for those orgs stay in ``usage_events`` and the rollups (nothing
   counted is rewritten); from now on a re-send for any org is a duplicate.
3. Rebuild the primary key on ``(source, event_id)`` in one ``ALTER TABLE`` (one index build).

What it costs: step 2 is one self-join of the table on ``(source, event_id)`` (a hash or merge join over every
receipt: the old key starts with ``org_id``, so no index serves it) and step 3 one sort and index build; the table
is locked for writes and reads for both, so ingestion pauses for their duration (batches wait, nothing is lost:
messages are acknowledged only after commit). Measured on 10M receipts (2 shared, busy cores): the DELETE 9–10 s,
the key build 12–18 s, so about 20–30 s of paused ingestion per 10M receipts (docs/scaling.md, step 2, with the
recipe). The new index is about 9 bytes per receipt narrower than 0009's.

Downgrade is 0009's upgrade: the per-org key again (every receipt kept fits it).
"""

from __future__ import annotations

from db.sqlscript import run_script

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

# The DELETE and ALTER are 0009's DOWNGRADE, verbatim (migrations are frozen, so the text is copied, not imported).
UPGRADE = """
LOCK TABLE event_receipts IN ACCESS EXCLUSIVE MODE;
DELETE FROM event_receipts r
USING event_receipts f
WHERE f.source = r.source AND f.event_id = r.event_id AND (f.batch_id, f.org_id) < (r.batch_id, r.org_id);
ALTER TABLE event_receipts
    DROP CONSTRAINT event_receipts_pkey,
    ADD CONSTRAINT event_receipts_pkey PRIMARY KEY (source, event_id);
COMMENT ON TABLE event_receipts IS
  'One row per accepted event, keyed by its identity (source, event_id) whatever its org: first write wins.';
"""

# 0009's UPGRADE, verbatim.
DOWNGRADE = """
ALTER TABLE event_receipts
    DROP CONSTRAINT event_receipts_pkey,
    ADD CONSTRAINT event_receipts_pkey PRIMARY KEY (org_id, source, event_id);
COMMENT ON TABLE event_receipts IS
  'One row per accepted event, keyed by (org_id, source, event_id): deduplication per org, first write wins.';
"""


def upgrade() -> None:
    run_script(UPGRADE)


def downgrade() -> None:
    run_script(DOWNGRADE)
