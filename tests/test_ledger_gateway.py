"""The usage ledger behind an in-process gateway: one exact row per request, also across outages."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest

from gateway import keys
from tests.conftest import TEST_KEY, gateway_toml

ANTH = {"x-api-key": TEST_KEY, "anthropic-version": "2023-06-01"}
OAI = {"authorization": f"Bearer {TEST_KEY}"}
MSGS = [{"role": "user", "content": "how many tokens is this question, roughly?"}]

# demo-* in config/prices.toml, in micro-dollars per million tokens (== pico-dollars per token).
DEMO = {"input": 3_000_000, "output": 15_000_000, "cache_write": 3_750_000, "cache_read": 300_000}


def ledger_toml(upstream: str, journal: Path, extra: str = "") -> str:
    return gateway_toml(upstream, extra=f"""
        [accounting]
        journal_dir = "{journal}"
        flush_ms = 50
        batch_size = 7
        """ + extra)


def mock_input_tokens(body: dict[str, Any]) -> int:
    """What the mock upstream reports as input tokens for a body."""
    return max(1, len(orjson.dumps(body.get("messages") or body.get("input") or "")) // 4)


def cost(inp: int, out: int, cw: int = 0, cr: int = 0, price: dict[str, int] = DEMO) -> int:
    """Exact pico-dollars."""
    return inp * price["input"] + out * price["output"] + cw * price["cache_write"] + cr * price["cache_read"]


async def rows(dsn: str) -> dict[str, asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        got = await conn.fetch("SELECT * FROM usage_ledger")
    finally:
        await conn.close()
    by_id = {r["request_id"]: r for r in got}
    assert len(got) == len(by_id), "a request id appears twice in the ledger"
    return by_id


async def checkpoint(dsn: str) -> None:
    """The throwaway cluster runs with synchronous_commit=off and stops with -m immediate: without a
    checkpoint it would forget the last commits (a fixture shortcut, not the ledger's doing)."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("CHECKPOINT")
    finally:
        await conn.close()


async def wait_rows(dsn: str, n: int, timeout: float = 20.0) -> dict[str, asyncpg.Record]:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        got = await rows(dsn)
        if len(got) >= n or asyncio.get_running_loop().time() > deadline:
            return got
        await asyncio.sleep(0.05)


async def test_mixed_requests_give_exactly_one_row_each_with_the_mock_tokens_and_exact_cost(
        make_gateway, mock_upstream, pg_env, tmp_path):
    """Both dialects, streamed and not, cache tokens, embeddings: N requests -> N rows, exact tokens and
    integer micro-dollar cost; the daily rollup sums to the same totals."""
    gw = await make_gateway(ledger_toml(mock_upstream.base_url, tmp_path))
    expected: dict[str, tuple[int, int, int, int, bool]] = {}  # id -> in, out, cache_write, cache_read, streamed
    for i in range(3):
        chunks = 3 + i
        body = {"model": "demo-claude", "max_tokens": 50, "messages": MSGS}
        hdrs = {**ANTH, "x-mock-chunks": str(chunks), "x-mock-cache-read": str(100 * i), "x-mock-cache-write": "17"}
        r = await gw.post("/v1/messages", json=body, headers=hdrs)
        assert 200 == r.status
        await r.read()
        expected[r.headers["x-request-id"]] = (mock_input_tokens(body), chunks, 17, 100 * i, False)

        r = await gw.post("/v1/messages", json={**body, "stream": True}, headers=hdrs)
        assert 200 == r.status
        await r.read()
        expected[r.headers["x-request-id"]] = (mock_input_tokens(body), chunks, 17, 100 * i, True)

        obody = {"model": "demo-gpt", "messages": MSGS}
        ohdrs = {**OAI, "x-mock-chunks": str(chunks), "x-mock-cache-read": str(40 * i)}
        r = await gw.post("/v1/chat/completions", json=obody, headers=ohdrs)
        assert 200 == r.status
        await r.read()
        expected[r.headers["x-request-id"]] = (mock_input_tokens(obody), chunks, 0, 40 * i, False)

        for opts in ({}, {"stream_options": {"include_usage": True}}):
            r = await gw.post("/v1/chat/completions", json={**obody, "stream": True, **opts}, headers=ohdrs)
            assert 200 == r.status
            await r.read()
            expected[r.headers["x-request-id"]] = (mock_input_tokens(obody), chunks, 0, 40 * i, True)

        ebody = {"model": "demo-embed", "input": ["some text", "more text"] * (i + 1)}
        r = await gw.post("/v1/embeddings", json=ebody, headers=OAI)
        assert 200 == r.status
        await r.read()
        expected[r.headers["x-request-id"]] = (mock_input_tokens(ebody), 0, 0, 0, False)

    got = await wait_rows(pg_env, len(expected))
    assert set(expected) == set(got)
    for rid, (inp, out, cw, cr, streamed) in expected.items():
        row = got[rid]
        assert (inp, out, cw, cr) == (row["input_tokens"], row["output_tokens"], row["cache_write_tokens"],
                                      row["cache_read_tokens"]), rid
        assert cost(inp, out, cw, cr) == row["cost_pico"], rid
        assert -(-row["cost_pico"] // 10**6) == row["cost_micros"], rid  # the previous release's figure
        assert (streamed, False, True, 200) == (row["streamed"], row["partial"], row["priced"], row["status"])
        assert "test" == row["key_id"] and "standalone" == row["user_id"]
    conn = await asyncpg.connect(pg_env)
    try:
        daily = await conn.fetchrow(
            "SELECT sum(requests) AS n, sum(cost_pico) AS c, sum(output_tokens) AS o FROM usage_daily")
    finally:
        await conn.close()
    assert (len(expected), sum(r["cost_pico"] for r in got.values()),
            sum(r["output_tokens"] for r in got.values())) == (daily["n"], daily["c"], daily["o"])


async def test_client_disconnect_and_upstream_cut_each_record_one_partial_row(
        make_gateway, mock_upstream, pg_env, tmp_path):
    """A stream the client abandons and one the upstream cuts: one row each, partial, input counted."""
    gw = await make_gateway(ledger_toml(mock_upstream.base_url, tmp_path))
    body = {"model": "demo-claude", "max_tokens": 50, "messages": MSGS, "stream": True}

    r = await gw.post("/v1/messages", json=body, headers={**ANTH, "x-mock-drop-after": "2", "x-mock-chunks": "6"})
    await r.read()
    cut_id = r.headers["x-request-id"]

    r = await gw.post("/v1/messages", json=body,
                      headers={**ANTH, "x-mock-chunks": "50", "x-mock-chunk-gap-ms": "100"})
    gone_id = r.headers["x-request-id"]
    await r.content.readany()
    r.close()  # the client goes away mid-stream

    got = await wait_rows(pg_env, 2)
    assert {cut_id, gone_id} == set(got)
    for rid in (cut_id, gone_id):
        assert got[rid]["partial"] is True
        assert mock_input_tokens(body) == got[rid]["input_tokens"]
        assert got[rid]["cost_pico"] > 0
    assert got[cut_id]["output_tokens"] >= 1
    await asyncio.sleep(0.3)
    assert 2 == len(await rows(pg_env)), "a partial request was recorded twice"


async def test_postgres_down_during_traffic_then_back_every_record_exactly_once(
        make_gateway, mock_upstream, pg_env, pg_server, tmp_path):
    """Postgres stops while requests are served: they still succeed, and once it is back every record
    appears exactly once (journal replay deduplicated by request id)."""
    gw = await make_gateway(ledger_toml(mock_upstream.base_url, tmp_path))
    body = {"model": "demo-claude", "max_tokens": 50, "messages": MSGS}
    ids: list[str] = []

    async def send(n: int) -> None:
        for _ in range(n):
            r = await gw.post("/v1/messages", json=body, headers=ANTH)
            assert 200 == r.status
            await r.read()
            ids.append(r.headers["x-request-id"])

    await send(5)
    await wait_rows(pg_env, 5)
    await checkpoint(pg_env)
    pg_server.stop()
    try:
        await send(30)
        deadline = asyncio.get_running_loop().time() + 30  # the writer tries, fails and keeps them journaled
        while not any(tmp_path.glob("usage-*.jsonl")):
            assert asyncio.get_running_loop().time() < deadline, "nothing journaled while Postgres is down"
            await asyncio.sleep(0.05)
    finally:
        pg_server.start()
    await send(5)
    got = await wait_rows(pg_env, 40)
    assert sorted(ids) == sorted(got)
    writer = gw.server.app[keys.USAGE]
    await writer.flush()
    assert 40 == len(await rows(pg_env))
    conn = await asyncpg.connect(pg_env)
    try:
        daily = await conn.fetchval("SELECT sum(requests) FROM usage_daily")
        hourly = await conn.fetchval("SELECT sum(requests) FROM usage_hourly")
    finally:
        await conn.close()
    assert (40, 40) == (daily, hourly), "a replayed duplicate was counted in a rollup"


async def test_shutdown_flushes_every_record_before_the_app_is_gone(
        make_gateway, mock_upstream, pg_env, tmp_path):
    """With a long flush interval nothing is written during traffic; closing the gateway writes all."""
    gw = await make_gateway(gateway_toml(mock_upstream.base_url, extra=f"""
        [accounting]
        journal_dir = "{tmp_path}"
        flush_ms = 600000
        batch_size = 100000
        """))
    body = {"model": "demo-claude", "max_tokens": 50, "messages": MSGS}
    for _ in range(12):
        r = await gw.post("/v1/messages", json=body, headers=ANTH)
        await r.read()
    await asyncio.sleep(0.1)
    assert 0 == len(await rows(pg_env))
    await gw.close()
    assert 12 == len(await rows(pg_env))
    assert [] == list(tmp_path.glob("usage-*.jsonl")), "flushed segments must be deleted"


@pytest.mark.parametrize("mode", ["default", "refuse"])
async def test_unpriced_model_is_flagged_at_the_default_price_or_refused(
        make_gateway, mock_upstream, pg_env, tmp_path, mode):
    """pricing.unknown_model: "default" serves it, records it priced=false at the default price;
    "refuse" answers 404 model_not_found (Anthropic not_found_error) and records nothing charged."""
    toml = ledger_toml(mock_upstream.base_url, tmp_path).replace(
        "[pricing]\n",
        f'[pricing]\nunknown_model = "{mode}"\ndefault_input_per_mtok = 10.0\ndefault_output_per_mtok = 20.0\n', 1)
    toml += """
[[routes]]
match = "mystery-*"
deployments = [{ upstream = "mock-anthropic" }, { upstream = "mock-openai" }]
"""
    gw = await make_gateway(toml)
    body = {"model": "mystery-1", "max_tokens": 50, "messages": MSGS}
    r = await gw.post("/v1/messages", json=body, headers={**ANTH, "x-mock-chunks": "4"})
    doc = await r.json()
    o = await gw.post("/v1/chat/completions", json={"model": "mystery-1", "messages": MSGS}, headers=OAI)
    odoc = await o.json()
    if mode == "refuse":
        assert (404, "not_found_error") == (r.status, doc["error"]["type"])
        assert (404, "model_not_found") == (o.status, odoc["error"]["code"])
        await asyncio.sleep(0.3)
        assert all(0 == row["cost_pico"] for row in (await rows(pg_env)).values())
        return
    assert 200 == r.status and 200 == o.status
    got = await wait_rows(pg_env, 2)
    row = got[r.headers["x-request-id"]]
    assert (False, cost(mock_input_tokens(body), 4, price={"input": 10_000_000, "output": 20_000_000,
                                                            "cache_write": 10_000_000, "cache_read": 10_000_000})) \
        == (row["priced"], row["cost_pico"])


async def test_memory_stays_bounded_during_an_outage_and_the_journal_fills_the_gap(
        make_gateway, mock_upstream, pg_env, pg_server, tmp_path):
    """max_memory_records caps what the writer holds while Postgres is down; the rest is read back
    from the journal when it returns, and every record lands exactly once."""
    gw = await make_gateway(gateway_toml(mock_upstream.base_url, extra=f"""
        [accounting]
        journal_dir = "{tmp_path}"
        flush_ms = 50
        batch_size = 4
        max_memory_records = 4
        """))
    writer = gw.server.app[keys.USAGE]
    body = {"model": "demo-claude", "max_tokens": 50, "messages": MSGS}
    ids = []
    r = await gw.post("/v1/messages", json=body, headers=ANTH)  # caches the key, creates the partition
    ids.append(r.headers["x-request-id"])
    await wait_rows(pg_env, 1)
    await checkpoint(pg_env)
    pg_server.stop()
    try:
        peak = 0
        for _ in range(40):
            r = await gw.post("/v1/messages", json=body, headers=ANTH)
            assert 200 == r.status
            ids.append(r.headers["x-request-id"])
            peak = max(peak, writer._mem_count)
    finally:
        pg_server.start()
    assert peak <= 4
    assert 40 <= writer.pending
    got = await wait_rows(pg_env, 41)
    assert sorted(ids) == sorted(got)


async def test_postgres_down_at_startup_the_gateway_serves_and_records_once_it_is_up(
        make_gateway, mock_upstream, pg_env, pg_server, tmp_path):
    """The writer needs no database to start: records wait in the journal until Postgres appears."""
    await checkpoint(pg_env)
    pg_server.stop()
    try:
        gw = await make_gateway(ledger_toml(mock_upstream.base_url, tmp_path))
        ids = []
        for _ in range(6):
            r = await gw.post("/v1/messages", json={"model": "demo-claude", "max_tokens": 5, "messages": MSGS},
                              headers=ANTH)
            assert 200 == r.status
            ids.append(r.headers["x-request-id"])
    finally:
        pg_server.start()
    assert sorted(ids) == sorted(await wait_rows(pg_env, 6))
