"""The ledger's two INSERT shapes write the same rows: the journal lines as one JSON array (the writer's
batches in memory) and typed column arrays (records read back from a file)."""

from __future__ import annotations

import math
import random
import struct
from datetime import UTC, datetime
from typing import Any

import asyncpg

from gateway.accounting.ledger import INSERT_SQL, columns, encode
from gateway.accounting.ledger_sql import JSON_INSERT_SQL
from gateway.accounting.money import micros_ceil
from gateway.accounting.record import UsageRecord


def _records(n: int, seed: int) -> list[UsageRecord]:
    rnd = random.Random(seed)
    base = datetime(2026, 11, 20, tzinfo=UTC).timestamp()
    out = []
    for i in range(n):
        # Every microsecond rounding case: random doubles, ties never land exactly but come close.
        ts = base + rnd.uniform(0, 86400 * 9) + rnd.choice([0.0, 0.0000005, 0.9999996, 0.4999999])
        out.append(UsageRecord(
            request_id=f"json-{seed}-{i}", ts=ts, key_id=f"k{i % 3}", user_id=f"u{i % 2}",
            model=rnd.choice(["m-a", "gpt-4o", "modèle \"quoté\"\n\\x", "💸"]), route="m-*", upstream="x",
            status=rnd.choice([200, 499, 502]), streamed=rnd.random() < 0.5, partial=rnd.random() < 0.1,
            input_tokens=rnd.randrange(10**6), output_tokens=rnd.randrange(10**5), cache_write_tokens=rnd.randrange(50),
            cache_read_tokens=rnd.randrange(50),
            cost_pico=rnd.choice([0, 1, 999_999, 1_000_000, 1_000_001, rnd.randrange(2**63 - 1)]),
            priced=rnd.random() < 0.9, upstream_ms=rnd.uniform(0, 10_000), ttft_ms=rnd.choice([None, rnd.random()]),
            gateway_ms=rnd.choice([0.1, 1e-7, rnd.random()]), error_kind=rnd.choice([None, "upstream_error"]),
            served_model=rnd.choice(["", "gpt-4o-2024"]),
            budget_keys=rnd.choice([(), ("gw:v3:{u:u1}:b:u:all",)]),
            tags=rnd.choice([None, {"team": "a", "ünï": "x\ty"}]),
        ))
    return out


def _f4(x: float) -> float:
    return float(struct.unpack("f", struct.pack("f", x))[0])


async def _rows(conn: asyncpg.Connection, prefix: str) -> dict[str, Any]:
    rows = await conn.fetch("SELECT * FROM usage_ledger WHERE request_id LIKE $1", prefix + "%")
    return {r["request_id"]: dict(r) for r in rows}


async def test_the_json_shape_writes_what_the_typed_shape_writes_and_deduplicates_against_it(db_url: str) -> None:
    """Same columns, to the microsecond, float4 bit and micro-dollar; a record written one way is a
    duplicate the other way (a replay after a crash never writes it twice)."""
    recs = _records(400, seed=3)
    conn = await asyncpg.connect(db_url)
    try:
        await conn.set_type_codec("jsonb", encoder=lambda v: __import__("orjson").dumps(v).decode(),
                                  decoder=__import__("orjson").loads, schema="pg_catalog")
        for day in range(11):
            await conn.execute("SELECT usage_ledger_ensure_partition($1)",
                               datetime.fromtimestamp(recs[0].ts + day * 86400, UTC))
        half = len(recs) // 2
        payload = (b"[" + b",".join(encode(r) for r in recs[:half]) + b"]").decode()
        row = await conn.fetchrow(JSON_INSERT_SQL, payload, 1)
        assert half == len(row["ids"])
        row = await conn.fetchrow(INSERT_SQL, *columns(recs), 1)
        assert len(recs) - half == len(row["ids"]), "the typed shape finds the JSON shape's rows already there"
        payload = (b"[" + b",".join(encode(r) for r in recs) + b"]").decode()
        row = await conn.fetchrow(JSON_INSERT_SQL, payload, 1)
        assert row["ids"] is None, "and the other way round"

        got = await _rows(conn, "json-3-")
        for r in recs:
            g = got[r.request_id]
            assert datetime.fromtimestamp(r.ts, UTC) == g["ts"]
            assert micros_ceil(r.cost_pico) == g["cost_micros"] and r.cost_pico == g["cost_pico"]
            assert _f4(r.upstream_ms) == g["upstream_ms"] and _f4(r.gateway_ms) == g["gateway_ms"]
            assert (None if r.ttft_ms is None else _f4(r.ttft_ms)) == g["ttft_ms"]
            assert r.tags == g["tags"]
            for name in ("key_id", "user_id", "model", "route", "upstream", "status", "streamed", "partial",
                         "input_tokens", "output_tokens", "cache_write_tokens", "cache_read_tokens", "priced",
                         "error_kind", "served_model"):
                assert getattr(r, name) == g[name], name
        # Both halves rolled up once each.
        assert len(recs) == await conn.fetchval(
            "SELECT sum(requests) FROM usage_daily WHERE key_id = ANY($1) AND shard = 1", ["k0", "k1", "k2"])
    finally:
        await conn.close()


def test_the_microsecond_rounding_in_sql_is_pythons() -> None:
    """What JSON_INSERT_SQL computes for ts, in Python: whole seconds, then the fraction x 10^6 rounded half
    to even: the same as datetime.fromtimestamp for any double (checked here without a database)."""
    rnd = random.Random(5)
    for _ in range(200_000):
        ts = rnd.uniform(1e9, 2e9)
        whole = math.floor(ts)
        us = round((ts - whole) * 1e6)
        want = datetime.fromtimestamp(ts, UTC)
        got = datetime.fromtimestamp(whole, UTC).timestamp() * 1_000_000 + us
        assert int(want.timestamp()) * 1_000_000 + want.microsecond == got
