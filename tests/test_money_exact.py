"""Exact money (issue 10, item 2): pico-dollar integers in pricing, the ledger, the rollups, the
reports and the Redis budget counters; nothing rounds, any sum equals tokens x price."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
import redis.asyncio as aioredis
from hypothesis import given
from hypothesis import strategies as st

from gateway import keys
from gateway.accounting import money
from gateway.accounting.pricing import PriceTable
from gateway.accounting.usage import Usage
from gateway.config import ConfigError
from tests.conftest import CONFIG_DIR, gateway_toml
from tests.fixtures.control_plane import ADMIN
from tests.fixtures.limits import LIM_KEY, limited_keys, post_chat
from tests.test_ledger_gateway import OAI, ledger_toml, rows

SHIPPED = CONFIG_DIR / "prices.toml"
TINY = "demo-embed-tiny"  # $0.02 per million tokens: 10 tokens = 0.2 micro-dollars


# --------------------------------------------------------------------------- pricing and money, as tables


@pytest.mark.parametrize(("usd_per_mtok", "tokens", "pico"), [
    (0.02, 10, 200_000),  # the 0.2 micro-dollar embedding
    (0.02, 1, 20_000),
    (0.15, 7, 1_050_000),
    (3, 1_000_000, 3 * 10**12),
    (3.75, 3, 11_250_000),
    (0.000001, 1, 1),  # the finest price: one pico-dollar per token
    (75, 123_456_789, 9_259_259_175_000_000),
    (1e-06, 10**9, 10**9),
])
def test_a_price_times_tokens_is_exact_pico_dollars(usd_per_mtok: float, tokens: int, pico: int) -> None:
    t = PriceTable.from_toml(f'[models.m]\ninput = {usd_per_mtok!r}\noutput = {usd_per_mtok!r}\n', default=None)
    p = t.lookup("m")
    assert p is not None
    assert pico == p.cost_pico(Usage(input_tokens=tokens))
    assert Fraction(str(usd_per_mtok)) * tokens / 10**6 == Fraction(pico, 10**12)  # the same amount in USD


@pytest.mark.parametrize("price", ["0.0000001", "1e-9", "0.1234567", "nan", "inf", "-1.0"])
def test_a_price_finer_than_a_pico_dollar_per_token_or_not_a_price_is_refused(price: str) -> None:
    with pytest.raises(ConfigError, match=r"models\.'m'\.input"):
        PriceTable.from_toml(f"[models.m]\ninput = {price}\noutput = 1.0\n", default=None)


@given(st.integers(min_value=0, max_value=10**9), st.integers(min_value=0, max_value=10**12),
       st.lists(st.integers(min_value=0, max_value=10**7), min_size=1, max_size=40))
def test_costs_of_any_split_sum_to_tokens_times_price(micro_per_mtok: int, _: int, tokens: list[int]) -> None:
    """Prices with up to six decimals (any multiple of $0.000001/M): the sum over records of their costs is
    exactly the total tokens x price, the same in USD as Fraction arithmetic says."""
    usd_per_mtok = Decimal(micro_per_mtok) / 10**6
    t = PriceTable.from_toml(f"[models.m]\ninput = {usd_per_mtok}\noutput = 0\n", default=None)
    p = t.lookup("m")
    assert p is not None
    parts = sum(p.cost_pico(Usage(input_tokens=n)) for n in tokens)
    assert parts == p.cost_pico(Usage(input_tokens=sum(tokens)))
    assert Fraction(parts, 10**12) == Fraction(usd_per_mtok) * sum(tokens) / 10**6


@given(st.integers(min_value=-(10**30), max_value=10**30))
def test_usd_strings_are_exact(pico: int) -> None:
    assert Fraction(pico, 10**12) == Fraction(money.usd(pico))
    assert money.usd_to_pico(money.usd(pico)) == pico


@pytest.mark.parametrize(("pico", "text"), [(0, "0"), (200_000, "0.0000002"), (10**12, "1"), (1, "0.000000000001"),
                                            (12_345 * 10**12 + 5 * 10**11, "12345.5")])
def test_usd_examples(pico: int, text: str) -> None:
    assert text == money.usd(pico)


# --------------------------------------------------------------------------- the ledger, rollups and reports


def tiny_prices(tmp_path: Path) -> Path:
    path = tmp_path / "prices.toml"
    path.write_text(SHIPPED.read_text() + f'\n[models."{TINY}"]\ninput = 0.02\noutput = 0.0\n')
    return path


def with_prices(toml: str, prices: Path) -> str:
    return toml.replace(f'file = "{SHIPPED}"', f'file = "{prices}"')


def embed_body(tokens: int) -> dict[str, Any]:
    """A body the mock upstream reports as ``tokens`` input tokens (len(json(input)) // 4)."""
    body = {"model": TINY, "input": "x" * (4 * tokens - 2)}
    assert tokens == len(orjson.dumps(body["input"])) // 4
    return body


async def test_a_sub_micro_embedding_is_recorded_exactly_in_the_ledger_rollups_and_reports(
        make_gateway: Any, mock_upstream: Any, pg_env: str, tmp_path: Path) -> None:
    """One 10-token embedding at $0.02/M is 200,000 pico-dollars everywhere; 40 of various sizes sum to
    tokens x price exactly (the old per-request micro-dollar rounding would have billed 40 micro-dollars)."""
    gw = await make_gateway(with_prices(ledger_toml(mock_upstream.base_url, tmp_path / "j"), tiny_prices(tmp_path)))
    r = await gw.post("/v1/embeddings", json=embed_body(10), headers=OAI)
    assert 200 == r.status
    first = r.headers["x-request-id"]
    sizes = [1 + (i * 7) % 23 for i in range(39)]
    for n in sizes:
        r = await gw.post("/v1/embeddings", json=embed_body(n), headers=OAI)
        assert 200 == r.status
    await gw.app[keys.USAGE].flush()
    got = await rows(pg_env)
    assert 40 == len(got)
    assert (200_000, 1) == (got[first]["cost_pico"], got[first]["cost_micros"])
    total_tokens = 10 + sum(sizes)
    exact = total_tokens * 20_000
    assert exact == sum(row["cost_pico"] for row in got.values())

    conn = await asyncpg.connect(pg_env)
    try:
        for table in ("usage_daily", "usage_hourly"):
            assert exact == await conn.fetchval(f"SELECT sum(cost_pico) FROM {table} WHERE model = $1", TINY)
    finally:
        await conn.close()

    r = await gw.get("/admin/usage", params={"group_by": "model", "model": TINY}, headers=ADMIN)
    assert 200 == r.status, await r.text()
    doc = await r.json()
    assert [(TINY, str(exact), money.usd(exact))] == [(d["model"], d["cost_pico"], d["cost_usd"]) for d in doc["data"]]
    assert (str(exact), money.usd(exact)) == (doc["totals"]["cost_pico"], doc["totals"]["cost_usd"])
    assert Fraction(doc["totals"]["cost_usd"]) == Fraction(total_tokens * 2, 10**8)


async def test_the_migration_backfills_pico_from_micro_and_keeps_rows_of_the_previous_release_exact(
        pg_env: str) -> None:
    """A row and a rollup increment written the previous release's way (cost_micros only) get cost_pico
    = micro x 10^6 from the triggers of migrations 0011/0012."""
    conn = await asyncpg.connect(pg_env)
    try:
        await conn.execute("SELECT usage_ledger_ensure_partition(now())")
        await conn.execute(
            """INSERT INTO usage_ledger (request_id, ts, key_id, user_id, model, status, streamed, partial,
               input_tokens, output_tokens, cache_write_tokens, cache_read_tokens, cost_micros, priced,
               upstream_ms, gateway_ms) VALUES ('old-1', now(), 'k', 'u', 'm', 200, false, false, 1, 1, 0, 0, 7,
               true, 1, 1)""")
        assert 7_000_000 == await conn.fetchval("SELECT cost_pico FROM usage_ledger WHERE request_id = 'old-1'")
        old_rollup = """INSERT INTO usage_daily AS r (day, user_id, key_id, model, shard, requests, partial_requests,
               unpriced_requests, input_tokens, output_tokens, cache_write_tokens, cache_read_tokens, cost_micros)
               VALUES (current_date, 'u', 'k', 'm', 0, 1, 0, 0, 1, 1, 0, 0, $1)
               ON CONFLICT (day, user_id, key_id, model, shard) DO UPDATE SET
               requests = r.requests + excluded.requests, cost_micros = r.cost_micros + excluded.cost_micros"""
        await conn.execute(old_rollup, 5)
        await conn.execute(old_rollup, 3)
        assert (8, 8_000_000) == tuple(await conn.fetchrow(
            "SELECT cost_micros, cost_pico FROM usage_daily WHERE user_id = 'u' AND model = 'm'"))
    finally:
        await conn.close()


# --------------------------------------------------------------------------- budgets in Redis


@pytest.fixture
def with_redis(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("GATEWAY_REDIS_URL", redis_url)
    return redis_url


async def _counter(url: str, field: str = "v") -> bytes | None:
    r = aioredis.Redis.from_url(url)
    try:
        return await r.hget("gw:v3:{u:lim-user}:b:k:limited:all", field)  # type: ignore[no-any-return]
    finally:
        await r.aclose()


async def _drained(gw: Any) -> None:
    await gw.server.app[keys.TASKS].drain(timeout=5)


async def test_a_budget_of_one_micro_dollar_admits_sub_micro_requests_exactly(
        make_gateway: Any, mock_upstream: Any, with_redis: str, tmp_path: Path) -> None:
    """$0.000001 budget, 10-token embeddings at 200,000 pico each, worst case (estimate) reserved first:
    admitted while spent + worst case <= 10^6 pico; the counter holds the exact spend."""
    body = embed_body(10)
    raw = orjson.dumps(body)
    worst = (len(raw) // 4 + 1) * 20_000
    toml = with_prices(gateway_toml(mock_upstream.base_url, extra=limited_keys("budget_usd = 0.000001")), tiny_prices(tmp_path))
    gw = await make_gateway(toml)
    statuses, spent = [], 0
    for _ in range(8):
        a = await post_chat(gw, "/v1/embeddings", LIM_KEY, raw)
        statuses.append(a.status)
        await _drained(gw)
        if a.status == 200:
            spent += 200_000
    expected = 0
    while expected * 200_000 + worst <= 10**6:
        expected += 1
    assert expected >= 2, "the test needs a budget that several sub-micro requests fit"
    assert [200] * expected + [429] * (8 - expected) == statuses
    assert str(spent).encode() == await _counter(with_redis)


async def test_budget_counters_stay_exact_past_what_a_lua_double_holds(
        make_gateway: Any, mock_upstream: Any, with_redis: str, tmp_path: Path) -> None:
    """A $20,000 budget is 2x10^16 pico-dollars, past 2^53: a counter one pico-dollar short of fitting a
    request's worst case refuses it, one that fits it exactly admits it, and the spend adds exactly."""
    body = embed_body(10)
    raw = orjson.dumps(body)
    worst = (len(raw) // 4 + 1) * 20_000
    limit = 20_000 * 10**12
    toml = with_prices(gateway_toml(mock_upstream.base_url, extra=limited_keys("budget_usd = 20000.0")), tiny_prices(tmp_path))
    gw = await make_gateway(toml)
    assert 200 == (await post_chat(gw, "/v1/embeddings", LIM_KEY, raw)).status  # builds the counter
    await _drained(gw)
    r = aioredis.Redis.from_url(with_redis)
    key = "gw:v3:{u:lim-user}:b:k:limited:all"
    try:
        assert b"200000" == await r.hget(key, "v")
        await r.hset(key, "v", str(limit - worst + 1))  # odd, not a double: 1 pico too much
        a = await post_chat(gw, "/v1/embeddings", LIM_KEY, raw)
        assert 429 == a.status and "budget_exceeded" == a.json()["error"]["code"]
        await r.hset(key, "v", str(limit - worst))  # exactly fits
        assert 200 == (await post_chat(gw, "/v1/embeddings", LIM_KEY, raw)).status
        await _drained(gw)
        assert str(limit - worst + 200_000).encode() == await r.hget(key, "v")
        assert b"0" == await r.hget(key, "r")
    finally:
        await r.aclose()


async def test_settled_costs_move_exactly_through_the_ledger_into_the_counter(
        make_gateway: Any, mock_upstream: Any, with_redis: str, pg_env: str, tmp_path: Path) -> None:
    """Database mode: 12 sub-micro requests; the budget counter equals the ledger's exact sum."""
    toml = with_prices(ledger_toml(mock_upstream.base_url, tmp_path / "j", extra=limited_keys("budget_usd = 1.0")),
                       tiny_prices(tmp_path))
    gw = await make_gateway(toml)
    sizes = [3, 10, 17, 1, 5, 8, 13, 2, 21, 4, 6, 9]
    for n in sizes:
        assert 200 == (await post_chat(gw, "/v1/embeddings", LIM_KEY, orjson.dumps(embed_body(n)))).status
    await _drained(gw)
    await gw.server.app[keys.USAGE].flush()
    exact = sum(sizes) * 20_000
    assert exact == sum(row["cost_pico"] for row in (await rows(pg_env)).values())
    deadline = asyncio.get_running_loop().time() + 10
    while await _counter(with_redis) != str(exact).encode():
        assert asyncio.get_running_loop().time() < deadline, await _counter(with_redis)
        await asyncio.sleep(0.05)


def test_a_journal_line_of_the_previous_release_replays_at_its_billed_amount() -> None:
    """A journal written before the upgrade has cost_micros only: replayed as micro x 10^6 pico-dollars."""
    from gateway.accounting.ledger import decode, encode
    from tests.test_accounting_reports import synthetic

    rec = synthetic(1, seed=5)[0]
    old = rec.to_dict()
    del old["cost_pico"]
    old["cost_micros"] = 7
    back = decode(orjson.dumps(old))
    assert back is not None and 7_000_000 == back.cost_pico
    assert rec == decode(encode(rec))  # the current format round-trips as is


def test_prices_are_read_as_the_decimals_written_not_through_a_float() -> None:
    """19 significant digits survive (a float would keep ~16): the price table reads TOML decimals exactly."""
    t = PriceTable.from_toml("[models.m]\ninput = 1234567890123.456789\noutput = 0.000001\n", default=None)
    p = t.lookup("m")
    assert p is not None
    assert 1_234_567_890_123_456_789 == p.input
    assert 1 == p.output
