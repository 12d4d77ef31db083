#!/usr/bin/env python3
"""Console page timings on a large database: 100,000 keys and 10M usage rows.

Starts a throwaway Postgres (the test suite's), applies the migrations and
seeds it in SQL: ``--users`` users, ``--keys`` keys (every 10th with a
budget, every 50th revoked), ``--rows`` usage-ledger rows over ``--days``
days on a skewed key distribution (a few keys carry most traffic, as in real
gateways), and the daily/hourly rollups the ledger writer keeps.  Then runs
an in-process gateway on it and times, per console page, the API calls that
page makes (each page's calls run as the browser runs them: concurrently
where the page does, else in sequence), ``--repeat`` times; reports the
median and worst of each page.

Usage: .venv/bin/python loadtests/bench_console.py [--rows 10000000] [--keys 100000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import asyncpg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.fixtures.servers import PostgresServer, free_port  # noqa: E402  - the test suite's, one definition

ADMIN_TOKEN = "bench-console-admin-token-" + "x" * 20


def seed_sql(users: int, keys: int, rows: int, days: int) -> list[str]:
    return [
        f"""INSERT INTO users (email, name, role, limits)
            SELECT 'user' || i || '@bench.example', 'User ' || i, CASE WHEN i = 1 THEN 'admin' ELSE 'user' END,
                   CASE WHEN i % 10 = 0 THEN '{{"budget_usd": 100.0, "budget_period": "month"}}'::jsonb
                        ELSE '{{}}'::jsonb END
            FROM generate_series(1, {users}) i""",
        f"""INSERT INTO access_keys (user_id, name, key_hash, prefix, limits, revoked_at, created_at)
            SELECT u.id, 'key-' || k, encode(sha256(('bench-key-' || k)::bytea), 'hex'), 'gwk_' || substr(md5(k::text), 1, 8),
                   CASE WHEN k % 10 = 0 THEN '{{"budget_usd": 25.0, "budget_period": "day"}}'::jsonb ELSE '{{}}'::jsonb END,
                   CASE WHEN k % 50 = 0 THEN now() END,
                   now() - make_interval(secs => {keys} - k)
            FROM generate_series(1, {keys}) k
            JOIN LATERAL (SELECT id FROM users ORDER BY created_at, id OFFSET (k % {users}) LIMIT 1) u ON true""",
        "CREATE TEMP TABLE bench_keys AS SELECT row_number() OVER (ORDER BY created_at, id) - 1 AS n, "
        "id::text AS key_id, user_id::text AS user_id FROM access_keys",
        "CREATE UNIQUE INDEX ON bench_keys (n)",
        *[f"SELECT usage_ledger_ensure_partition(now() - make_interval(days => {d}))" for d in range(0, days + 31, 28)],
        # Bulk load: the ledger's indexes are built once afterwards (as a restore would), not row by row.
        "DROP INDEX usage_ledger_request, usage_ledger_ts, usage_ledger_user_ts, usage_ledger_key_ts",
        f"""INSERT INTO usage_ledger (request_id, ts, key_id, user_id, model, route, upstream, status, streamed, partial,
                input_tokens, output_tokens, cache_write_tokens, cache_read_tokens, cost_micros, priced,
                upstream_ms, ttft_ms, gateway_ms, error_kind)
            SELECT 'req_bench_' || s.g, now() - make_interval(secs => random() * {days} * 86400), b.key_id, b.user_id,
                   (ARRAY['claude-sonnet-4-5','claude-haiku-4-5','gpt-4o','gpt-4o-mini','claude-opus-4-1'])[1 + g % 5],
                   'smart', 'anthropic', CASE WHEN g % 97 = 0 THEN 502 ELSE 200 END, g % 2 = 0, false,
                   500 + g % 1000, 100 + g % 300, 0, 0, 3000 + g % 5000, true, 800, 300, 0.4, NULL
            FROM (SELECT g, floor(power(random(), 3) * {keys})::bigint AS kn FROM generate_series(1, {rows}) g) s
            JOIN bench_keys b ON b.n = s.kn""",
        "CREATE UNIQUE INDEX usage_ledger_request ON usage_ledger (request_id, ts)",
        "CREATE INDEX usage_ledger_ts ON usage_ledger (ts)",
        "CREATE INDEX usage_ledger_user_ts ON usage_ledger (user_id, ts)",
        "CREATE INDEX usage_ledger_key_ts ON usage_ledger (key_id, ts)",
        """INSERT INTO usage_daily SELECT (ts AT TIME ZONE 'UTC')::date, user_id, key_id, model, 0, count(*),
               count(*) FILTER (WHERE partial), count(*) FILTER (WHERE NOT priced), sum(input_tokens), sum(output_tokens),
               sum(cache_write_tokens), sum(cache_read_tokens), sum(cost_micros)
           FROM usage_ledger GROUP BY 1, 2, 3, 4""",
        """INSERT INTO usage_hourly SELECT date_trunc('hour', ts AT TIME ZONE 'UTC') AT TIME ZONE 'UTC', user_id, key_id,
               model, 0, count(*), count(*) FILTER (WHERE partial), count(*) FILTER (WHERE NOT priced), sum(input_tokens),
               sum(output_tokens), sum(cache_write_tokens), sum(cache_read_tokens), sum(cost_micros)
           FROM usage_ledger GROUP BY 1, 2, 3, 4""",
        "ANALYZE",
    ]


def pages(user_id: str, key_id: str) -> dict[str, list[list[str]]]:
    """Console view -> the API calls it makes: a list of steps, each step's calls run concurrently."""
    today = datetime.now(UTC).date()
    month = (today - timedelta(days=29)).isoformat()
    # The console's default range: since the first day of last month.
    since = (today.replace(day=1) - timedelta(days=1)).replace(day=1).isoformat()
    return {
        "users": [["/admin/users?limit=50"]],
        "users, email filter": [["/admin/users?limit=50&email=user4242"]],
        "keys": [["/admin/keys?limit=50"]],
        "keys of a user": [[f"/admin/keys?limit=50&user_id={user_id}"]],
        "keys, revoked": [["/admin/keys?limit=50&status=revoked"]],
        "usage (default range, by day)": [[f"/admin/usage?from={since}&group_by=day"]],
        "usage (default range, by model)": [[f"/admin/usage?from={since}&group_by=day", f"/admin/usage?from={since}&group_by=model"]],
        "usage (default range, by key)": [[f"/admin/usage?from={since}&group_by=day", f"/admin/usage?from={since}&group_by=key"]],
        "usage (default range, by user)": [[f"/admin/usage?from={since}&group_by=day", f"/admin/usage?from={since}&group_by=user"]],
        "usage (30 days, by day)": [[f"/admin/usage?from={month}&group_by=day"]],
        "usage (30 days, by model)": [[f"/admin/usage?from={month}&group_by=day", f"/admin/usage?from={month}&group_by=model"]],
        "usage (30 days, by key)": [[f"/admin/usage?from={month}&group_by=day", f"/admin/usage?from={month}&group_by=key"]],
        "usage (30 days, by user)": [[f"/admin/usage?from={month}&group_by=day", f"/admin/usage?from={month}&group_by=user"]],
        "usage of one key": [[f"/admin/usage?from={month}&group_by=day&key_id={key_id}"]],
        "usage CSV (by model)": [[f"/admin/usage?from={month}&group_by=model&format=csv"]],
        "budgets (keys)": [["/admin/budgets?limit=50&scope=key"]],
        "budgets (users)": [["/admin/budgets?limit=50&scope=user"]],
        "audit log": [["/admin/audit?limit=50"]],
        "health": [["/admin/health"]],
    }


async def timed(http: aiohttp.ClientSession, steps: list[list[str]]) -> float:
    t0 = time.perf_counter()
    for step in steps:
        async def one(path: str) -> None:
            async with http.get(path) as r:
                await r.read()
                assert r.status == 200, (path, r.status, await r.text())
        await asyncio.gather(*(one(p) for p in step))
    return (time.perf_counter() - t0) * 1000


async def main(args: argparse.Namespace) -> dict[str, object]:
    from aiohttp import web

    from gateway.app import create_app
    from gateway.config import parse
    from gateway.stores.migrate import migrate

    pg = PostgresServer()
    pg.start()
    try:
        dsn = pg.create_database("console_bench")
        conn = await asyncpg.connect(dsn)
        seed_s: dict[str, float] = {}
        try:
            await migrate(conn)
            for sql in seed_sql(args.users, args.keys, args.rows, args.days):
                t0 = time.perf_counter()
                await conn.execute(sql, timeout=3600)
                seed_s[" ".join(sql.split()[:3])] = round(time.perf_counter() - t0, 1)
            counts = {t: await conn.fetchval(f"SELECT count(*) FROM {t}")
                      for t in ("users", "access_keys", "usage_ledger", "usage_daily", "usage_hourly",
                                "usage_daily_totals", "usage_daily_users", "usage_monthly_keys")}
            user_id = str(await conn.fetchval("SELECT id FROM users ORDER BY created_at OFFSET 7 LIMIT 1"))
            key_id = await conn.fetchval("SELECT key_id FROM usage_daily GROUP BY key_id ORDER BY sum(requests) DESC LIMIT 1")
        finally:
            await conn.close()
        os.environ.update({"GATEWAY_DATABASE_URL": dsn, "GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN,
                           "GATEWAY_JWT_SECRET": "bench-console-jwt-secret-" + "y" * 32})
        port = free_port()
        cfg = parse(f"""
[server]
host = "127.0.0.1"
port = {port}
workers = 1
[log]
access_log = false
[pricing]
file = "{ROOT / 'config' / 'prices.toml'}"
[upstreams.mock]
provider = "anthropic"
base_url = "http://127.0.0.1:9"
[[routes]]
match = "claude-*"
deployments = [{{ upstream = "mock" }}]
""", source=str(ROOT / "config" / "bench.toml"))
        runner = web.AppRunner(create_app(cfg), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        results: dict[str, dict[str, float]] = {}
        try:
            async with aiohttp.ClientSession(f"http://127.0.0.1:{port}",
                                             headers={"authorization": f"Bearer {ADMIN_TOKEN}"}) as http:
                for name, steps in pages(user_id, key_id).items():
                    await timed(http, steps)  # warm: the first run reads from disk
                    ms = [await timed(http, steps) for _ in range(args.repeat)]
                    results[name] = {"median_ms": round(statistics.median(ms), 1), "max_ms": round(max(ms), 1)}
                    print(f"{name:32s} median {statistics.median(ms):8.1f} ms   max {max(ms):8.1f} ms", file=sys.stderr)
        finally:
            await runner.cleanup()
    finally:
        pg.destroy()
    return {"rows": counts, "seed_seconds": seed_s, "pages": results}


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--users", type=int, default=2000)
    p.add_argument("--keys", type=int, default=100_000)
    p.add_argument("--rows", type=int, default=10_000_000)
    p.add_argument("--days", type=int, default=90)
    p.add_argument("--repeat", type=int, default=5)
    print(json.dumps(asyncio.run(main(p.parse_args())), indent=1))
