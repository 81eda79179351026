"""The ingestion benchmark (``python -m bench.ingest_bench``), one module per scenario on top of
``bench.harness``."""
