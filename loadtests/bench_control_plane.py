#!/usr/bin/env python3
"""Control-plane benchmark: Postgres-backed keys vs standalone keys, login and admin lists.

What it starts (all on 127.0.0.1, all stopped at the end):
  * a throwaway Postgres cluster (or uses --dsn), migrated, seeded with
    --users users (default 10,000) and --keys keys (default 100,000) by COPY;
  * the mock upstream (``llm-gateway mock-upstream``);
  * two ``llm-gateway serve --workers 1`` gateways on the same mock: one
    standalone (key from the config file), one in database mode (key from
    Postgres, cached after its first use).

What it reports (and writes to loadtests/results/control_plane.json):
  * hot path, same load for both gateways: req/s and the gateway's own time
    (server-timing ``gateway;dur``) p50/p95/p99, plus client latency p50/p95;
  * ``POST /auth/login`` latency p50/p95/p99 (argon2id per call);
  * admin list endpoints (users page, users by email, keys page, keys of one
    user, keys by status) latency p50/p95/p99 against the seeded tables.

Usage: .venv/bin/python loadtests/bench_control_plane.py [--quick] [--dsn postgresql://...]
It is not part of the test suite (run it by hand or from loadtests/run.sh).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import secrets
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.auth.passwords import Passwords  # noqa: E402
from gateway.config import AuthConfig  # noqa: E402
from gateway.stores.migrate import migrate  # noqa: E402
from tests.fixtures.servers import PostgresServer, free_port, wait_port  # noqa: E402

RESULTS = ROOT / "loadtests" / "results"
HOST = "127.0.0.1"
JWT_SECRET = "bench-jwt-secret-" + secrets.token_urlsafe(32)
ADMIN_TOKEN = "bench-admin-token-" + secrets.token_urlsafe(24)
PASSWORD = "bench password 123"
MSG = {"model": "demo-bench", "max_tokens": 16, "messages": [{"role": "user", "content": "hello"}]}


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


def summary(values: list[float]) -> dict[str, float]:
    return {"n": len(values), "p50": round(pct(values, 50), 3), "p95": round(pct(values, 95), 3),
            "p99": round(pct(values, 99), 3), "mean": round(statistics.fmean(values), 3) if values else 0.0}


# ------------------------------------------------------------------ seeding


async def seed(dsn: str, n_users: int, n_keys: int) -> tuple[str, str, str]:
    """Users and keys by COPY; returns (admin email, a user id, a known plaintext key)."""
    conn = await asyncpg.connect(dsn)
    try:
        await migrate(conn)
        pw_hash = Passwords(AuthConfig()).hasher.hash(PASSWORD)
        have = await conn.fetchval("SELECT count(*) FROM users")
        if have >= n_users:
            print(f"seed: database already has {have} users; reusing it")
        else:
            t0 = time.monotonic()
            user_ids = [uuid.uuid4() for _ in range(n_users)]
            await conn.copy_records_to_table(
                "users", columns=["id", "email", "name", "password_hash", "role"],
                records=[(uid, f"user{i}@bench.example", f"User {i}", pw_hash, "admin" if i == 0 else "user")
                         for i, uid in enumerate(user_ids)],
            )
            records = []
            for i in range(n_keys):
                digest = hashlib.sha256(secrets.token_bytes(16)).hexdigest()
                records.append((uuid.uuid4(), user_ids[i % n_users], f"key {i}", digest, "gwk_" + digest[:8],
                                "{}"))
            await conn.copy_records_to_table(
                "access_keys", columns=["id", "user_id", "name", "key_hash", "prefix", "limits"], records=records,
            )
            await conn.execute("ANALYZE")
            print(f"seed: {n_users} users, {n_keys} keys in {time.monotonic() - t0:.1f}s")
        user_id = str(await conn.fetchval("SELECT id FROM users WHERE email = 'user1@bench.example'"))
        key = "gwk_" + secrets.token_urlsafe(32)
        await conn.execute(
            "INSERT INTO access_keys (user_id, name, key_hash, prefix) VALUES ($1, 'bench', $2, $3)",
            user_id, hashlib.sha256(key.encode()).hexdigest(), key[:12],
        )
        return "user0@bench.example", user_id, key
    finally:
        await conn.close()


# ------------------------------------------------------------------ processes


def config_text(port: int, mock_port: int, standalone_key_sha: str) -> str:
    return textwrap.dedent(f"""
        [server]
        host = "{HOST}"
        port = {port}
        workers = 1

        [log]
        level = "warning"

        [pricing]
        file = "{ROOT / 'config' / 'prices.toml'}"

        [upstreams.mock]
        provider = "anthropic"
        base_url = "http://{HOST}:{mock_port}"

        [[routes]]
        match = "demo-*"
        deployments = [{{ upstream = "mock" }}]

        [[keys]]
        name = "bench-standalone"
        key_sha256 = "{standalone_key_sha}"
        """)


def start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(cmd, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT, cwd=ROOT)


# ------------------------------------------------------------------ load


async def hammer(url: str, headers: dict[str, str], n: int, conc: int, *, method: str = "POST",
                 body: Any = MSG, urls: list[str] | None = None) -> dict[str, Any]:
    """n requests at ``conc`` concurrency; client latency and server-timing gateway time (ms)."""
    client_ms: list[float] = []
    gateway_ms: list[float] = []
    errors = 0
    counter = iter(range(n))
    conn = aiohttp.TCPConnector(limit=conc)
    async with aiohttp.ClientSession(connector=conn) as s:
        async def worker() -> None:
            nonlocal errors
            for i in counter:
                target = urls[i % len(urls)] if urls else url
                t0 = time.perf_counter()
                async with s.request(method, target, headers=headers, json=body) as r:
                    await r.read()
                    ok = r.status < 400
                    st = r.headers.get("server-timing", "")
                client_ms.append((time.perf_counter() - t0) * 1000)
                if not ok:
                    errors += 1
                if st.startswith("gateway;dur="):
                    gateway_ms.append(float(st.split("=", 1)[1]))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(conc)))
        wall = time.perf_counter() - t0
    return {"rps": round(n / wall, 1), "errors": errors, "client_ms": summary(client_ms),
            "gateway_ms": summary(gateway_ms)}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="gw-bench-cp-"))
    pg: PostgresServer | None = None
    procs: list[subprocess.Popen[bytes]] = []
    try:
        if args.dsn:
            dsn = args.dsn
        else:
            pg = PostgresServer()
            pg.start()
            dsn = pg.create_database("bench")
        admin_email, user_id, db_key = await seed(dsn, args.users, args.keys)

        mock_port, sa_port, db_port = free_port(), free_port(), free_port()
        standalone_key = "gwk_" + secrets.token_urlsafe(32)
        sha = hashlib.sha256(standalone_key.encode()).hexdigest()
        env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        exe = [sys.executable, "-m", "gateway"]
        mock_cfg = tmp / "mock.toml"
        mock_cfg.write_text(f"[mock_upstream]\nhost = \"{HOST}\"\nport = {mock_port}\n")
        procs.append(start([*exe, "--config", str(mock_cfg), "mock-upstream"], env, tmp / "mock.log"))
        for name, port, extra in (("standalone", sa_port, {}),
                                  ("database", db_port, {"GATEWAY_DATABASE_URL": dsn, "GATEWAY_JWT_SECRET": JWT_SECRET,
                                                         "GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN})):
            cfg = tmp / f"{name}.toml"
            cfg.write_text(config_text(port, mock_port, sha))
            procs.append(start([*exe, "serve", "--config", str(cfg), "--workers", "1"], {**env, **extra},
                               tmp / f"{name}.log"))
        for port in (mock_port, sa_port, db_port):
            wait_port(port, timeout=30)
        await asyncio.sleep(1.0)

        out: dict[str, Any] = {"users": args.users, "keys": args.keys, "hot_path": {}, "control_plane": {}}
        n = 500 if args.quick else args.requests
        for name, port, key in (("standalone", sa_port, standalone_key), ("database", db_port, db_key)):
            url = f"http://{HOST}:{port}/v1/messages"
            h = {"x-api-key": key, "anthropic-version": "2023-06-01"}
            await hammer(url, h, 200, 8)  # warm-up: connections, and the key in the cache
            out["hot_path"][name] = await hammer(url, h, n, args.concurrency)

        base = f"http://{HOST}:{db_port}"
        logins = 100 if args.quick else 400
        out["control_plane"]["POST /auth/login"] = await hammer(
            base + "/auth/login", {}, logins, args.login_concurrency,
            body={"email": admin_email, "password": PASSWORD})
        admin = {"authorization": f"Bearer {ADMIN_TOKEN}"}
        lists = {
            "GET /admin/users?limit=50": [base + "/admin/users?limit=50"],
            "GET /admin/users?email=...": [base + f"/admin/users?email=user{random.randrange(args.users)}@"
                                           for _ in range(50)],
            "GET /admin/keys?limit=50": [base + "/admin/keys?limit=50"],
            "GET /admin/keys?user_id=...": [base + f"/admin/keys?user_id={user_id}"],
            "GET /admin/keys?status=active&limit=200": [base + "/admin/keys?status=active&limit=200"],
        }
        n_admin = 100 if args.quick else 400
        for label, urls in lists.items():
            out["control_plane"][label] = await hammer(urls[0], admin, n_admin, args.admin_concurrency,
                                                       method="GET", body=None, urls=urls)
        return out
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        if pg is not None:
            pg.destroy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dsn", default=None, help="use this (empty or previously seeded) database")
    ap.add_argument("--users", type=int, default=10_000)
    ap.add_argument("--keys", type=int, default=100_000)
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--login-concurrency", type=int, default=2, help="argon2id is CPU-bound: about the cores")
    ap.add_argument("--admin-concurrency", type=int, default=8)
    ap.add_argument("--quick", action="store_true", help="fewer requests (a smoke run)")
    args = ap.parse_args()
    out = asyncio.run(run(args))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "control_plane.json").write_text(json.dumps(out, indent=2))
    print(f"\nhot path ({args.concurrency} concurrent, 1 worker each)     req/s   gateway p50/p95/p99 ms   client p50/p95 ms")
    for name, r in out["hot_path"].items():
        g, c = r["gateway_ms"], r["client_ms"]
        print(f"  {name:<44} {r['rps']:>7}   {g['p50']:>6} / {g['p95']:>6} / {g['p99']:>6}   "
              f"{c['p50']:>6} / {c['p95']:>6}   errors={r['errors']}")
    print(f"\ncontrol plane ({out['users']} users, {out['keys']} keys)      p50 / p95 / p99 ms (client)")
    for label, r in out["control_plane"].items():
        c = r["client_ms"]
        print(f"  {label:<44} {c['p50']:>6} / {c['p95']:>6} / {c['p99']:>6}   errors={r['errors']}")
    print(f"\nwritten to {RESULTS / 'control_plane.json'}")


if __name__ == "__main__":
    main()
