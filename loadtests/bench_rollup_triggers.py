#!/usr/bin/env python3
"""What migration 0041's rollup triggers add to the ledger writer: one batch INSERT, triggers on vs off.

A throwaway Postgres (the test suite's), all migrations, then ``--batches``
batches of ``--size`` synthetic records through the ledger writer's own
statement (INSERT_SQL: ledger rows + daily/hourly rollups), alternating
``usage_daily``'s triggers enabled and disabled so both see the same table
sizes and machine load.  Reports the median milliseconds per batch of each.

Usage: .venv/bin/python loadtests/bench_rollup_triggers.py [--batches 60] [--size 500]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.fixtures.ledger_seed import record  # noqa: E402
from tests.fixtures.servers import PostgresServer  # noqa: E402


async def main(args: argparse.Namespace) -> dict[str, object]:
    from gateway.accounting.ledger import INSERT_SQL, columns
    from gateway.stores.migrate import migrate

    pg = PostgresServer()
    pg.start()
    try:
        conn = await asyncpg.connect(pg.create_database("rollup_bench"))
        await migrate(conn)
        now = datetime.now(UTC)
        await conn.execute("SELECT usage_ledger_ensure_partition($1)", now)
        await conn.execute("SELECT usage_ledger_ensure_partition($1)", now - timedelta(days=2))
        rnd = random.Random(1)
        times: dict[str, list[float]] = {"on": [], "off": []}
        for i in range(args.batches):
            mode = "on" if i % 2 == 0 else "off"
            await conn.execute(f"ALTER TABLE usage_daily {'ENABLE' if mode == 'on' else 'DISABLE'} TRIGGER USER")
            recs = [record(f"k{rnd.randrange(args.keys)}", f"u{rnd.randrange(50)}", rnd.choice(["m-a", "m-b", "m-c"]),
                           now - timedelta(seconds=rnd.randrange(86400)))
                    for _ in range(args.size)]
            cols = columns(recs)
            t0 = time.perf_counter()
            await conn.fetchrow(INSERT_SQL, *cols, i % 8)
            times[mode].append((time.perf_counter() - t0) * 1000)
        await conn.close()
    finally:
        pg.destroy()
    return {m: {"median_ms_per_batch": round(statistics.median(v), 2), "batches": len(v)} for m, v in times.items()}


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", type=int, default=60)
    p.add_argument("--size", type=int, default=500)
    p.add_argument("--keys", type=int, default=2000)
    print(json.dumps(asyncio.run(main(p.parse_args()))))
