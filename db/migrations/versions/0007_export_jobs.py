"""Export jobs: retry backoff, the snapshot instant, and indexes for the listing and the retention sweep.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30

- ``next_attempt_at``: a job put back in the queue after a failed attempt is not claimed before it (backoff).
- ``snapshot_at``: the instant of the database snapshot the worker read the rows in (set when the job
  succeeds). ``range_to`` is the event-time cut of the data; ``snapshot_at`` says which ingested events the
  file could see, so a later ``usage`` answer that differs can be explained by events ingested after it.
- The listing is newest first, ``(created_at, id)`` both descending, per org or over every org: the org
  index is rebuilt with ``id DESC`` so a keyset page is one index range, and an index serves all-org lists.
- The retention sweep finds SUCCEEDED jobs by ``expires_at``.
"""

from __future__ import annotations

from db.sqlscript import run_script

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

UPGRADE = """
ALTER TABLE export_jobs
    ADD COLUMN next_attempt_at timestamptz,
    ADD COLUMN snapshot_at     timestamptz;
DROP INDEX export_jobs_org_created;
CREATE INDEX export_jobs_org_created ON export_jobs (org_id, created_at DESC, id DESC);
CREATE INDEX export_jobs_created ON export_jobs (created_at DESC, id DESC);
CREATE INDEX export_jobs_expiry ON export_jobs (expires_at) WHERE status = 'SUCCEEDED';
"""

DOWNGRADE = """
DROP INDEX export_jobs_expiry;
DROP INDEX export_jobs_created;
DROP INDEX export_jobs_org_created;
CREATE INDEX export_jobs_org_created ON export_jobs (org_id, created_at DESC, id);
ALTER TABLE export_jobs DROP COLUMN snapshot_at, DROP COLUMN next_attempt_at;
"""


def upgrade() -> None:
    run_script(UPGRADE)


def downgrade() -> None:
    run_script(DOWNGRADE)
