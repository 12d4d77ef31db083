"""Migration 0041: the (day, model) and (day, user, model) rollups stay equal to usage_daily, whoever
writes it (the ledger writer's upserts, batch after batch, on several shards), and reports read them."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from gateway.accounting.ledger import INSERT_SQL, columns
from gateway.accounting.reports import UsageQuery, daily_source
from tests.fixtures.ledger_seed import record

SUMS = "sum(requests), sum(partial_requests), sum(unpriced_requests), sum(input_tokens), sum(output_tokens), " \
       "sum(cache_write_tokens), sum(cache_read_tokens), sum(cost_micros), sum(cost_pico)"


async def _grouped(conn: asyncpg.Connection, table: str, dims: str) -> dict[tuple, tuple]:
    rows = await conn.fetch(f"SELECT {dims}, {SUMS} FROM {table} GROUP BY {dims}")
    n = len(dims.split(","))
    return {tuple(r[:n]): tuple(r[n:]) for r in rows}


async def test_rollups_track_usage_daily_through_batched_upserts_on_several_shards(db_url):
    rnd = random.Random(11)
    day0 = datetime(2026, 11, 20, tzinfo=UTC)
    conn = await asyncpg.connect(db_url)
    try:
        await conn.execute("SELECT usage_ledger_ensure_partition($1)", day0)
        await conn.execute("SELECT usage_ledger_ensure_partition($1)", day0 + timedelta(days=12))
        for batch in range(12):  # the same (day, user, key, model) again and again: inserts, then updates
            recs = [record(rnd.choice(["k1", "k2", "k3"]), rnd.choice(["u1", "u2"]), rnd.choice(["m-a", "m-b"]),
                           day0 + timedelta(hours=rnd.randrange(0, 24 * 12)), cost_pico=rnd.randrange(1, 10**10),
                           input_tokens=rnd.randrange(1000), output_tokens=rnd.randrange(500))
                    for _ in range(40)]
            await conn.fetchrow(INSERT_SQL, *columns(recs), batch % 3)  # three writers' shards
        assert await _grouped(conn, "usage_daily", "day, model") == await _grouped(conn, "usage_daily_totals", "day, model")
        assert await _grouped(conn, "usage_daily", "day, user_id, model") == \
            await _grouped(conn, "usage_daily_users", "day, user_id, model")
        assert await _grouped(conn, "(SELECT date_trunc('month', day)::date AS month, * FROM usage_daily) d", "month, user_id, key_id") == \
            await _grouped(conn, "usage_monthly_keys", "month, user_id, key_id")
        assert 480 == await conn.fetchval("SELECT sum(requests) FROM usage_daily_totals")
        assert 3 == await conn.fetchval("SELECT count(DISTINCT shard) FROM usage_daily_totals")
    finally:
        await conn.close()


async def test_migration_backfills_what_was_recorded_before(pg_dsn, tmp_path):
    """Rows the ledger wrote before 0041 existed are in the new rollups once it is applied."""
    from gateway.stores.migrate import MIGRATIONS_DIR, migrate

    for f in MIGRATIONS_DIR.glob("*.sql"):
        if f.name < "0041":
            (tmp_path / f.name).write_text(f.read_text())
    day0 = datetime(2026, 11, 20, tzinfo=UTC)
    conn = await asyncpg.connect(pg_dsn)
    try:
        await migrate(conn, tmp_path)
        await conn.execute("SELECT usage_ledger_ensure_partition($1)", day0)
        recs = [record(f"k{i % 4}", f"u{i % 2}", f"m-{i % 3}", day0 + timedelta(hours=i % 48)) for i in range(60)]
        await conn.fetchrow(INSERT_SQL, *columns(recs), 0)
        assert "0041_usage_rollups_console.sql" in await migrate(conn)
        assert await _grouped(conn, "(SELECT date_trunc('month', day)::date AS month, * FROM usage_daily) d", "month, user_id, key_id") == \
            await _grouped(conn, "usage_monthly_keys", "month, user_id, key_id")
        assert await _grouped(conn, "usage_daily", "day, model") == await _grouped(conn, "usage_daily_totals", "day, model")
        assert await _grouped(conn, "usage_daily", "day, user_id, model") == \
            await _grouped(conn, "usage_daily_users", "day, user_id, model")
    finally:
        await conn.close()


@pytest.mark.parametrize(("q", "table"), [
    (UsageQuery(None, None, None, None, None, ("day",)), "usage_daily_totals"),
    (UsageQuery(None, None, None, None, "m", ("day", "model")), "usage_daily_totals"),
    (UsageQuery(None, None, "u", None, None, ("day",)), "usage_daily_users"),
    (UsageQuery(None, None, None, None, None, ("user",)), "usage_daily_users"),
    (UsageQuery(None, None, None, "k", None, ("day",)), "usage_daily"),
    (UsageQuery(None, None, "u", None, None, ("key",)), "usage_daily"),
])
def test_reports_read_the_smallest_rollup_that_answers(q, table):
    assert table == daily_source(q)[0]


M0 = datetime(2026, 8, 1, tzinfo=UTC)


@pytest.mark.parametrize(("lo", "hi", "expected"), [
    (None, None, [("monthly", None, None)]),
    (M0, datetime(2026, 10, 1, tzinfo=UTC), [("monthly", M0, datetime(2026, 10, 1, tzinfo=UTC))]),
    (datetime(2026, 8, 5, tzinfo=UTC), None,
     [("monthly", datetime(2026, 9, 1, tzinfo=UTC), None), ("daily", datetime(2026, 8, 5, tzinfo=UTC), datetime(2026, 9, 1, tzinfo=UTC))]),
    (datetime(2026, 8, 5, tzinfo=UTC), datetime(2026, 8, 20, tzinfo=UTC),
     [("daily", datetime(2026, 8, 5, tzinfo=UTC), datetime(2026, 8, 20, tzinfo=UTC))]),
    (datetime(2026, 12, 5, tzinfo=UTC), datetime(2027, 2, 3, tzinfo=UTC),
     [("monthly", datetime(2027, 1, 1, tzinfo=UTC), datetime(2027, 2, 1, tzinfo=UTC)),
      ("daily", datetime(2026, 12, 5, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC)),
      ("daily", datetime(2027, 2, 1, tzinfo=UTC), datetime(2027, 2, 3, tzinfo=UTC))]),
])
def test_split_months_table(lo, hi, expected):
    from gateway.accounting.reports import split_months

    assert expected == split_months(lo, hi)


async def test_reports_by_key_and_user_over_whole_months_equal_a_brute_force_sum(cp, db_url):
    """Three months of records: by key and by user, ranges with whole months and partial edges (and
    sub-day edges) equal summing the records themselves."""
    from tests.fixtures.control_plane import ADMIN

    rnd = random.Random(5)
    recs = [record(rnd.choice(["k1", "k2", "k3"]), rnd.choice(["u1", "u2"]), rnd.choice(["m-a", "m-b"]),
                   M0 + timedelta(seconds=rnd.randrange(0, 92 * 86400)), cost_pico=rnd.randrange(1, 10**10))
            for _ in range(900)]
    from tests.fixtures.ledger_seed import seed

    for i in range(0, 900, 300):
        await seed(db_url, recs[i:i + 300])
    ranges = [(None, None), (M0, M0 + timedelta(days=61)), (M0 + timedelta(days=3), None),
              (M0 + timedelta(days=20, hours=5), M0 + timedelta(days=75, hours=2, minutes=7)),
              (None, datetime(2026, 10, 1, tzinfo=UTC))]
    for lo, hi in ranges:
        for group, attr in (("key", "key_id"), ("user", "user_id")):
            params = {"group_by": group}
            if lo:
                params["from"] = lo.isoformat()
            if hi:
                params["to"] = hi.isoformat()
            r = await cp.get("/admin/usage", params=params, headers=ADMIN)
            assert 200 == r.status, await r.text()
            got = {d[attr]: (d["requests"], int(d["cost_pico"])) for d in (await r.json())["data"]}
            want: dict[str, tuple[int, int]] = {}
            for rec in recs:
                ts = datetime.fromtimestamp(rec.ts, UTC)
                if (lo and ts < lo) or (hi and ts >= hi):
                    continue
                n, c = want.get(getattr(rec, attr), (0, 0))
                want[getattr(rec, attr)] = (n + 1, c + rec.cost_pico)
            assert want == got, (lo, hi, group)
