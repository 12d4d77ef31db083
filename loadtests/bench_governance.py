#!/usr/bin/env python3
"""What team limits and tags add to a request's CPU time in the worker (issue 16: <= 10 CPU-us).

Measures this process's CPU (``time.process_time``) per request for the
pieces of the hot path that teams and tags touch, each in two variants,
interleaved over ``--rounds`` rounds, against a throwaway ``redis-server``
on the other core (its CPU is not counted, as a remote Redis's would not be):

  * policy: ``check_static`` + ``RedisLimiter.reserve`` (one ADMIT script)
    + ``settle`` (one SETTLE, pipelined) for a key with rpm, tpm,
    concurrency and budget limits on the key and its user, without and with
    a team carrying the same four limits (4 more counters in the same call);
  * tags: ``TagPolicy.for_request`` for a request without tags and with
    ``x-gateway-tags: project=search,env=prod`` plus a key default tag.

Usage: taskset -c 0 .venv/bin/python loadtests/bench_governance.py [--requests 20000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
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
from gateway.accounting.tags import TagPolicy
from gateway.config import Limits, parse
from gateway.governance_config import TagsConfig
from gateway.policy.admit import RequestFacts, check_static
from gateway.policy.budget_rebuild import BudgetScope, LedgerSpend
from gateway.policy.limits import RedisLimiter
from gateway.policy.principals import Principal
from gateway.stores.redis import RedisStore

HIGH = Limits(models=("bench-*",), rpm=100_000_000, tpm=10**12, max_concurrency=100_000, budget_usd=1e9)
SOLO = Principal("k1", "gwk_bench", "", "u1", key_limits=HIGH, user_limits=HIGH)
TEAM = Principal("k2", "gwk_bench2", "", "u2", key_limits=HIGH, user_limits=HIGH, team_id="t1", team_limits=HIGH)
SOLO_B = Principal("k3", "gwk_bench3", "", "u3", key_limits=HIGH, user_limits=HIGH)  # --calibrate: an A/A run


async def policy_round(limiter: RedisLimiter, principal: Principal, n: int, tag: str) -> float:
    t0 = time.process_time()
    for i in range(n):
        facts = RequestFacts("bench-model", False, 100, 400, "127.0.0.1", f"req_{tag}_{i}")
        check_static(principal, facts)
        res = await limiter.reserve(principal, facts)
        await limiter.settle(principal, facts, res, 150, 1234)
    return 1e6 * (time.process_time() - t0) / n


def tags_round(policy: TagPolicy, header: str | None, defaults: tuple[tuple[str, str], ...] | None, n: int) -> float:
    doc = {"model": "bench-model", "max_tokens": 100, "messages": []}
    t0 = time.process_time()
    for _ in range(n):
        policy.for_request(header, doc, "openai", defaults)
    return 1e6 * (time.process_time() - t0) / n


async def run(port: int, n: int, rounds: int, calibrate: bool = False) -> None:
    cfg = parse("[redis]\ntimeout_ms = 5000\n")  # a busy machine must not push the bench into degraded mode

    async def ledger(scopes: list[BudgetScope]) -> LedgerSpend:
        return LedgerSpend({}, "1:1:")

    limiter = RedisLimiter(cfg, RedisStore(cfg.redis, f"redis://127.0.0.1:{port}/0"), PriceTable.load(cfg),
                           rebuild=ledger)
    await limiter.start()
    policy = TagPolicy(TagsConfig(allowed=("project", "env", "team")), metrics_enabled=False)
    await policy_round(limiter, SOLO, 500, "warm-a")
    await policy_round(limiter, TEAM, 500, "warm-b")
    solo, team, plain, tagged = [], [], [], []
    chunk = 250  # alternate in small chunks: a busy machine's drifts hit both variants alike
    for r in range(rounds):
        a_us = b_us = 0.0
        for c in range(max(1, n // chunk)):
            a_us += await policy_round(limiter, SOLO, chunk, f"a{r}_{c}")
            b_us += await policy_round(limiter, SOLO_B if calibrate else TEAM, chunk, f"b{r}_{c}")
        solo.append(a_us / max(1, n // chunk))
        team.append(b_us / max(1, n // chunk))
        plain.append(tags_round(policy, None, None, n))
        tagged.append(tags_round(policy, "project=search,env=prod", (("team", "ml"),), n))
    await asyncio.sleep(0)
    med = statistics.median
    print(f"policy, key+user limits:       {med(solo):6.1f} CPU-us/request (rounds: {', '.join(f'{x:.1f}' for x in solo)})")
    label = "policy, second solo key (A/A):" if calibrate else "policy, key+user+team limits: "
    print(f"{label} {med(team):6.1f} CPU-us/request (rounds: {', '.join(f'{x:.1f}' for x in team)})")
    print(f"tags, none:                    {med(plain):6.2f} CPU-us/request")
    print(f"tags, header (2) + key default:{med(tagged):6.2f} CPU-us/request")
    pairs = [b - a for a, b in zip(solo, team, strict=True)]
    print(f"added by a team:               {med(pairs):6.1f} CPU-us/request (median of per-round pairs: "
          f"{', '.join(f'{d:+.1f}' for d in pairs)})")
    print(f"added by tags:                 {med(tagged) - med(plain):6.2f} CPU-us/request")
    assert limiter.stats.degraded == 0, "Redis timed out: the figures would be the local limiter's"
    await limiter.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=20_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calibrate", action="store_true", help="A/A: the second variant is a key without a team")
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
            uvloop.run(run(port, args.requests, args.rounds, args.calibrate))
        finally:
            redis.terminate()
            redis.wait()


if __name__ == "__main__":
    main()
