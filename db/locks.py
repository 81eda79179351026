"""PostgreSQL advisory lock keys shared by every gateway process."""

from __future__ import annotations

# Held shared by every ingest transaction, exclusively by the rollup worker
# while it moves the dirty watermark (db/rollup.py).
WATERMARK_LOCK_KEY = 0x726F6C6C7570_01
# Held by the one rollup worker that runs a cycle at a time.
ROLLUP_WORKER_LOCK_KEY = 0x726F6C6C7570_02
# Held while migrations run (db/migrate.py).
MIGRATION_LOCK_KEY = 0x616E616C79746963
