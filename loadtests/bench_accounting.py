#!/usr/bin/env python3
"""Accounting benchmark: ledger writer throughput, its cost on the hot path, report latency.

Starts a throwaway Postgres cluster (the test suite's fixture class) and runs:

  writer   LedgerWriter in one process: N synthetic records through ``record()``
           (the hot-path call: microseconds per record), then the time until all
           are committed (journal -> batched insert + rollup) -> records/s.
  latency  ``llm-gateway serve --workers 1`` in database mode against the bundled
           mock upstream, the same closed-loop load twice: accounting.sink =
           "auto" (the ledger) and "none" (nothing recorded); client p50/p99 and
           the gateway's own server-timing p50.  Both rows also give req/s, so the
           writer's records/s can be compared with the gateway's request rate.
  reports  (--report-rows N) N ledger rows over 30 days + their rollup, then
           GET /admin/usage with random filters/groupings/ranges: p50/p95.

Usage: .venv/bin/python loadtests/bench_accounting.py [--records 100000] [--seconds 10]
       [--concurrency 16] [--report-rows 10000000] [--only writer,latency,reports]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import asyncpg  # noqa: E402
import uvloop  # noqa: E402

from gateway.accounting.ledger import LedgerWriter  # noqa: E402
from gateway.accounting.record import UsageRecord  # noqa: E402
from gateway.config import AccountingConfig  # noqa: E402
from gateway.stores.migrate import migrate_dsn  # noqa: E402
from gateway.stores.postgres import Database  # noqa: E402
from tests.fixtures.servers import PostgresServer, free_port, wait_port  # noqa: E402

KEY = "gwk_bench_" + "k" * 32
ADMIN_TOKEN = "bench-admin-token-" + secrets.token_hex(8)


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))] if xs else float("nan")


def record(i: int, ts: float) -> UsageRecord:
    return UsageRecord(
        request_id=f"bench-{i}-{secrets.token_hex(4)}", ts=ts, key_id=f"key-{i % 50}", user_id=f"user-{i % 10}",
        model=("demo-claude", "demo-gpt", "claude-sonnet-4-5")[i % 3], route="demo-*", upstream="mock",
        status=200, streamed=bool(i % 2), partial=False, input_tokens=100 + i % 900, output_tokens=50 + i % 400,
        cache_write_tokens=i % 7, cache_read_tokens=i % 11, cost_pico=(1000 + i % 5000) * 1_000_000 + i % 7, priced=True,
        upstream_ms=12.5, ttft_ms=3.0, gateway_ms=0.2,
    )


# ------------------------------------------------------------------ writer


async def bench_writer(dsn: str, n: int, batch_size: int) -> dict[str, Any]:
    journal = Path(tempfile.mkdtemp(prefix="gw-bench-journal-"))
    db = Database(dsn, pool_max=4)
    await db.start()
    writer = LedgerWriter(db, AccountingConfig(journal_dir=str(journal), batch_size=batch_size, flush_ms=200))
    await writer.start()
    recs = [record(i, time.time()) for i in range(n)]
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    hot = 0.0
    # Feed in slices of 1000 with a yield between, as a busy event loop would.
    for i in range(0, n, 1000):
        a = time.perf_counter()
        for r in recs[i : i + 1000]:
            writer.record(r)
        hot += time.perf_counter() - a
        await asyncio.sleep(0)
    while writer.written < n:
        await asyncio.sleep(0.01)
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    await writer.close()
    await db.close()
    shutil.rmtree(journal, ignore_errors=True)
    return {"records": n, "batch_size": batch_size, "record_us": round(hot / n * 1e6, 2),
            "writer_cpu_us_per_record": round(cpu / n * 1e6, 2),
            "records_per_s": round(n / elapsed), "seconds": round(elapsed, 2)}


# ------------------------------------------------------------------ latency


def gateway_toml(port: int, mock_port: int, journal: Path, sink: str) -> str:
    import hashlib

    return f"""
[server]
host = "127.0.0.1"
port = {port}
workers = 1

[log]
access_log = false

[mock_upstream]
enabled = true
port = {mock_port}
chunks = 5

[pricing]
file = "{ROOT / 'config' / 'prices.toml'}"

[accounting]
sink = "{sink}"
journal_dir = "{journal}"

[upstreams.mock-anthropic]
provider = "anthropic"
base_url = "http://127.0.0.1:{mock_port}"
api_key_env = "BENCH_UPSTREAM_KEY"

[[routes]]
match = "demo-*"
deployments = [{{ upstream = "mock-anthropic" }}]

[[keys]]
name = "bench"
key_sha256 = "{hashlib.sha256(KEY.encode()).hexdigest()}"
"""


async def load(base: str, seconds: float, concurrency: int) -> dict[str, Any]:
    body = json.dumps({"model": "demo-claude", "max_tokens": 20,
                       "messages": [{"role": "user", "content": "hello"}]}).encode()
    headers = {"x-api-key": KEY, "anthropic-version": "2023-06-01", "content-type": "application/json"}
    lat: list[float] = []
    gw: list[float] = []
    errors = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as s:
        for _ in range(200):  # warm-up
            async with s.post(base + "/v1/messages", data=body, headers=headers) as r:
                await r.read()
        stop = time.perf_counter() + seconds

        async def one() -> None:
            nonlocal errors
            while time.perf_counter() < stop:
                a = time.perf_counter()
                async with s.post(base + "/v1/messages", data=body, headers=headers) as r:
                    await r.read()
                    if r.status != 200:
                        errors += 1
                    st = r.headers.get("server-timing", "")
                lat.append((time.perf_counter() - a) * 1000)
                if "dur=" in st:
                    gw.append(float(st.split("dur=")[1].split(",")[0]))

        t0 = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
    return {"requests": len(lat), "errors": errors, "req_per_s": round(len(lat) / elapsed),
            "p50_ms": round(pct(lat, 50), 3), "p99_ms": round(pct(lat, 99), 3),
            "gateway_p50_ms": round(pct(gw, 50), 3), "gateway_p99_ms": round(pct(gw, 99), 3)}


async def bench_latency(dsn: str, seconds: float, concurrency: int, rounds: int) -> dict[str, Any]:
    out: dict[str, list[dict[str, Any]]] = {"auto": [], "none": []}
    for _ in range(rounds):  # interleaved, so drift on a shared machine hits both alike
        for sink in ("auto", "none"):
            tmp = Path(tempfile.mkdtemp(prefix="gw-bench-"))
            port, mock_port = free_port(), free_port()
            cfg = tmp / "gateway.toml"
            cfg.write_text(gateway_toml(port, mock_port, tmp / "journal", sink))
            env = {**os.environ, "GATEWAY_DATABASE_URL": dsn, "BENCH_UPSTREAM_KEY": "x",
                   "GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN, "GATEWAY_JWT_SECRET": "bench-" + "j" * 32}
            log = open(tmp / "serve.log", "wb")  # noqa: SIM115
            proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config", str(cfg)],
                                    stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
            try:
                deadline = time.monotonic() + 30
                while b'"gateway serving"' not in (tmp / "serve.log").read_bytes():
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError((tmp / "serve.log").read_text())
                    time.sleep(0.05)
                wait_port(port)
                out[sink].append(await load(f"http://127.0.0.1:{port}", seconds, concurrency))
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=60)
                log.close()
                shutil.rmtree(tmp, ignore_errors=True)

    def median(rows: list[dict[str, Any]]) -> dict[str, Any]:
        return {k: statistics.median(r[k] for r in rows) for k in rows[0]}

    return {"ledger": median(out["auto"]), "no_accounting": median(out["none"]), "rounds": out}


# ------------------------------------------------------------------ reports


async def fill(dsn: str, rows: int) -> float:
    """``rows`` ledger rows over the last 30 days (1000 keys, 100 users, 8 models) + their rollup."""
    t0 = time.perf_counter()
    conn = await asyncpg.connect(dsn)
    try:
        now = datetime.now(UTC)
        for m in range(-2, 2):
            await conn.execute("SELECT usage_ledger_ensure_partition($1)", now + timedelta(days=31 * m))
        chunk = 1_000_000
        for lo in range(0, rows, chunk):
            await conn.execute(
                """
                INSERT INTO usage_ledger
                SELECT 'r' || g, now() - (random() * interval '30 days'), 'key-' || (g % 1000), 'user-' || (g % 100),
                       'model-' || (g % 8), 'r', 'u', 200, g % 2 = 0, g % 50 = 0,
                       (random() * 2000)::int, (random() * 800)::int, g % 13, g % 17, (random() * 20000)::int,
                       g % 97 <> 0, 10.0, 2.0, 0.2, NULL
                FROM generate_series($1::bigint, $2::bigint) g
                """, lo, min(lo + chunk, rows) - 1, timeout=None)
        await conn.execute(
            """
            INSERT INTO usage_daily
            SELECT (ts AT TIME ZONE 'UTC')::date, user_id, key_id, model, 0, count(*),
                   count(*) FILTER (WHERE partial), count(*) FILTER (WHERE NOT priced), sum(input_tokens),
                   sum(output_tokens), sum(cache_write_tokens), sum(cache_read_tokens), sum(cost_pico)
            FROM usage_ledger GROUP BY 1, 2, 3, 4
            """, timeout=None)
        await conn.execute(
            """
            INSERT INTO usage_hourly
            SELECT date_trunc('hour', ts AT TIME ZONE 'UTC') AT TIME ZONE 'UTC', user_id, key_id, model, 0,
                   count(*), count(*) FILTER (WHERE partial), count(*) FILTER (WHERE NOT priced), sum(input_tokens),
                   sum(output_tokens), sum(cache_write_tokens), sum(cache_read_tokens), sum(cost_pico)
            FROM usage_ledger GROUP BY 1, 2, 3, 4
            """, timeout=None)
        await conn.execute("ANALYZE usage_ledger; ANALYZE usage_daily; ANALYZE usage_hourly", timeout=None)
    finally:
        await conn.close()
    return time.perf_counter() - t0


async def bench_reports(dsn: str, rows: int, queries: int) -> dict[str, Any]:
    from aiohttp.test_utils import TestClient, TestServer

    from gateway.app import create_app
    from gateway.config import parse

    fill_s = await fill(dsn, rows)
    os.environ["GATEWAY_DATABASE_URL"] = dsn
    os.environ["GATEWAY_ADMIN_TOKEN"] = ADMIN_TOKEN
    os.environ["GATEWAY_JWT_SECRET"] = "bench-" + "j" * 32
    os.environ["BENCH_UPSTREAM_KEY"] = "x"
    tmp = Path(tempfile.mkdtemp(prefix="gw-bench-"))
    cfg = parse(gateway_toml(0, free_port(), tmp, "auto").replace("enabled = true", "enabled = false"),
                source=str(ROOT / "config" / "bench.toml"))
    client = TestClient(TestServer(create_app(cfg), host="127.0.0.1"))
    await client.start_server()
    rnd = random.Random(1)
    lat: dict[str, list[float]] = {}
    try:
        for _ in range(queries):
            now = datetime.now(UTC)
            params: dict[str, str] = {"group_by": rnd.choice(["day", "model", "key", "user", "day,model"])}
            shape = rnd.choice(["all", "range", "user", "key", "model"])
            if shape != "all":
                lo = now - timedelta(days=rnd.uniform(1, 29))
                params["from"] = lo.isoformat()
                params["to"] = (lo + timedelta(days=rnd.uniform(0.2, 10))).isoformat()
            if shape == "user":
                params["user_id"] = f"user-{rnd.randrange(100)}"
            if shape == "key":
                params["key_id"] = f"key-{rnd.randrange(1000)}"
            if shape == "model":
                params["model"] = f"model-{rnd.randrange(8)}"
            a = time.perf_counter()
            r = await client.get("/admin/usage", params=params, headers={"authorization": f"Bearer {ADMIN_TOKEN}"})
            await r.read()
            assert r.status == 200, await r.text()
            lat.setdefault(shape, []).append((time.perf_counter() - a) * 1000)
    finally:
        await client.close()
        shutil.rmtree(tmp, ignore_errors=True)
    every = [x for xs in lat.values() for x in xs]
    return {"rows": rows, "fill_s": round(fill_s, 1), "queries": queries,
            "p50_ms": round(pct(every, 50), 1), "p95_ms": round(pct(every, 95), 1), "max_ms": round(max(every), 1),
            "p95_by_shape_ms": {k: round(pct(v, 95), 1) for k, v in lat.items()}}


# ------------------------------------------------------------------ main


async def main(args: argparse.Namespace) -> dict[str, Any]:
    only = set(args.only.split(","))
    server = PostgresServer()
    server.start()
    result: dict[str, Any] = {"cpus": os.cpu_count(), "utc": datetime.now(UTC).isoformat(timespec="seconds")}
    try:
        if "writer" in only:
            dsn = server.create_database("bench_writer")
            await migrate_dsn(dsn)
            result["writer"] = [await bench_writer(dsn, args.records, bs) for bs in (500, 2000)]
            print(json.dumps({"writer": result["writer"]}), flush=True)
        if "latency" in only:
            dsn = server.create_database("bench_latency")
            await migrate_dsn(dsn)
            result["latency"] = await bench_latency(dsn, args.seconds, args.concurrency, args.rounds)
            print(json.dumps({k: result["latency"][k] for k in ("ledger", "no_accounting")}), flush=True)
        if "reports" in only:
            dsn = server.create_database("bench_reports")
            await migrate_dsn(dsn)
            result["reports"] = await bench_reports(dsn, args.report_rows, args.queries)
            print(json.dumps({"reports": result["reports"]}), flush=True)
    finally:
        server.destroy()
    return result


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--report-rows", type=int, default=10_000_000)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--only", default="writer,latency,reports")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    res = uvloop.run(main(a))
    out = Path(a.out) if a.out else ROOT / "loadtests" / "results" / f"bench-accounting-{res['utc'].replace(':', '')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print(f"written {out}")
