#!/usr/bin/env python3
"""What applying committed costs to budget counters costs the worker (off the hot path).

With a database and Redis, the ledger writer hands every committed batch to
``RedisLimiter.apply_committed`` (one APPLY script per record, pipelined).
This starts a throwaway ``redis-server`` on the other core and pushes
``--records`` records with two budget counters each (key and user) through it
in batches of 500, the writer's default: CPU microseconds per record of this
process (``time.process_time``) and records/s.

Usage: taskset -c 0 .venv/bin/python loadtests/bench_apply.py [--records 20000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import bench

from gateway.accounting.pricing import PriceTable
from gateway.accounting.record import UsageRecord
from gateway.config import parse
from gateway.policy.budget_rebuild import BudgetScope, LedgerSpend
from gateway.policy.limits import RedisLimiter
from gateway.stores import redis_scripts as scripts
from gateway.stores.redis import RedisStore

KEYS = (f"gw:{scripts.VERSION}:{{u:u1}}:b:k:k1:all", f"gw:{scripts.VERSION}:{{u:u1}}:b:u:all")


async def run(port: int, records: int, rounds: int) -> None:
    cfg = parse("")

    async def ledger(scopes: list[BudgetScope]) -> LedgerSpend:
        return LedgerSpend({}, "1:1:")

    limiter = RedisLimiter(cfg, RedisStore(cfg.redis, f"redis://127.0.0.1:{port}/0"), PriceTable.load(cfg), rebuild=ledger)
    await limiter.start()
    limiter.attach_ledger()
    await limiter.runner.eval(scripts.SEED, list(KEYS), ["g", "1:1:", "", 0, 0, 0, 0])
    for rnd in range(rounds):
        recs = [
            UsageRecord(f"req_{rnd}_{i}", 0.0, "k1", "u1", "m", "r", "up", 200, False, False, 10, 10, 0, 0, 123,
                        True, 1.0, None, 1.0, None, KEYS)
            for i in range(records)
        ]
        t0, w0 = time.process_time(), time.perf_counter()
        for s in range(0, len(recs), 500):
            await limiter.apply_committed(recs[s : s + 500], "5")
        cpu, wall = time.process_time() - t0, time.perf_counter() - w0
        print(f"round {rnd + 1}: {1e6 * cpu / records:.1f} CPU-us/record, {records / wall:,.0f} records/s")
    assert limiter.stats.applied == records * rounds
    assert not limiter.stats.unapplied
    await limiter.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=20_000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    port = bench.free_port()
    with tempfile.TemporaryDirectory() as tmp:
        redis = subprocess.Popen(
            ["taskset", "-c", bench.LOADGEN_CPU, shutil.which("redis-server") or "redis-server", "--port", str(port),
             "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", tmp],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            bench.wait_port(port)
            uvloop.run(run(port, args.records, args.rounds))
        finally:
            redis.terminate()
            redis.wait()


if __name__ == "__main__":
    main()
