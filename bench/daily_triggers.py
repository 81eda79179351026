"""What the daily tables' triggers (migration 0012) cost the rollup: writing one UTC day of hourly reliability and
error rows for every org, as the rollup worker's advance does, with the triggers and without them.

    python -m bench.daily_triggers            # on the reliability benchmark's 10M data set (bench_graphql_10000000)
    python -m bench.daily_triggers --repeat 5

Needs the data set that ``python -m bench.reliability_bench --keep-db`` keeps (loaded there, upgraded in place).
Each run deletes the day's rows of ``reliability_hourly_model`` and ``errors_hourly`` and rolls them again from raw
events (``db.rollup.ROLL_RANGE``'s statements for those tables) in a transaction that is rolled back, so the data
set is left as it was; the runs without triggers disable them inside their own transaction. The best of
``--repeat`` runs of each is kept.

Results: ``bench/results/daily_triggers.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import time
from pathlib import Path
from typing import Any

import asyncpg

from bench.harness.output import say
from bench.harness.services import database_url
from db.rollup import ROLL_RANGE

DATABASE = "bench_graphql_10000000"
TABLES = ("reliability_hourly_model", "errors_hourly")
RESULTS = Path(__file__).resolve().parent / "results" / "daily_triggers.json"


async def measure(repeat: int) -> dict[str, Any]:
    connection = await asyncpg.connect(database_url(DATABASE), server_settings={"TimeZone": "UTC", "jit": "off"})
    try:
        through = await connection.fetchval("SELECT materialized_through FROM rollup_state")
        day = (through - dt.timedelta(days=3)).replace(hour=0, minute=0, second=0, microsecond=0)
        span = (day, day + dt.timedelta(days=1))
        rows = await connection.fetchval(
            "SELECT count(*) FROM reliability_hourly_model WHERE hour >= $1 AND hour < $2", *span
        )
        statements = [
            s.replace(":start", "$1").replace(":end", "$2") for s in ROLL_RANGE if any(t in s for t in TABLES)
        ]
        best: dict[str, float] = {}
        for run in range(repeat):
            for label, triggers in (("with_triggers_s", True), ("without_triggers_s", False)):
                transaction = connection.transaction()
                await transaction.start()
                try:
                    if not triggers:
                        for table in TABLES:
                            await connection.execute(f"ALTER TABLE {table} DISABLE TRIGGER USER")
                    started = time.perf_counter()
                    for table in TABLES:
                        await connection.execute(f"DELETE FROM {table} WHERE hour >= $1 AND hour < $2", *span)
                    for statement in statements:
                        await connection.execute(statement, *span)
                    elapsed = time.perf_counter() - started
                finally:
                    await transaction.rollback()
                best[label] = min(best.get(label, elapsed), elapsed)
                say(f"run {run + 1}/{repeat} {label.removesuffix('_s').replace('_', ' ')}: {elapsed:.2f} s")
    finally:
        await connection.close()
    return {"day": day.isoformat(), "reliability_rows": rows, "repeat": repeat,
            **{k: round(v, 3) for k, v in best.items()}}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.daily_triggers", description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs of each kind (the best is kept)")
    args = parser.parse_args(argv)
    result = asyncio.run(measure(args.repeat))
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    say(f"one UTC day ({result['reliability_rows']:,} reliability rows): {result['with_triggers_s']} s with the "
        f"triggers, {result['without_triggers_s']} s without; {RESULTS}")  # fmt: skip


if __name__ == "__main__":
    main()
