"""The ledger under a real `llm-gateway serve`: SIGKILL loses nothing, SIGTERM flushes everything."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import gateway_toml
from tests.fixtures.control_plane import ADMIN_TOKEN, JWT_SECRET
from tests.test_ledger_gateway import ANTH, MSGS, rows

pytestmark = pytest.mark.slow


def slow_flush_toml(upstream: str, journal: Path) -> str:
    """Nothing is written to Postgres during the test unless something forces it."""
    return gateway_toml(upstream, extra=f"""
        [accounting]
        journal_dir = "{journal}"
        flush_ms = 600000
        batch_size = 100000
        """)


def env_for(dsn: str) -> dict[str, str]:
    return {"GATEWAY_DATABASE_URL": dsn, "GATEWAY_JWT_SECRET": JWT_SECRET, "GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN}


def workers_of(pid: int) -> list[int]:
    kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(k) for k in kids]


async def fire(base: str, ok: list[str], attempts: list[int], stop: asyncio.Event) -> None:
    """Requests on fresh connections (any worker may take one) until ``stop``; ids of the 200s."""
    body = {"model": "demo-claude", "max_tokens": 20, "messages": MSGS}
    conn = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=conn) as s:
        while not stop.is_set():
            attempts[0] += 1
            try:
                async with s.post(base + "/v1/messages", json=body, headers=ANTH) as r:
                    await r.read()
                    if r.status == 200:
                        ok.append(r.headers["x-request-id"])
            except aiohttp.ClientError:
                await asyncio.sleep(0.01)


async def test_sigkilled_worker_under_traffic_loses_and_doubles_no_record(serve, pg_env, mock_upstream, tmp_path):
    """Records only journaled (long flush interval) when a worker is SIGKILLed mid-traffic: after its
    replacement starts, every answered request is in the ledger exactly once."""
    proc = serve(slow_flush_toml(mock_upstream.base_url, tmp_path), workers=2, env=env_for(pg_env))
    ok: list[str] = []
    attempts = [0]
    stop = asyncio.Event()
    senders = [asyncio.create_task(fire(proc.base_url, ok, attempts, stop)) for _ in range(4)]
    try:
        while len(ok) < 60:
            await asyncio.sleep(0.05)
        victim = workers_of(proc.proc.pid)[0]
        os.kill(victim, signal.SIGKILL)
        n_at_kill = len(ok)
        deadline = time.monotonic() + 20
        while len(ok) < n_at_kill + 60 or victim in workers_of(proc.proc.pid) or len(workers_of(proc.proc.pid)) < 2:
            assert time.monotonic() < deadline, "no replacement worker served traffic"
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await asyncio.gather(*senders)
    # The replacement replays the dead worker's journal at start, without a flush of its own.
    deadline = time.monotonic() + 20
    while True:
        got = await rows(pg_env)  # also asserts no request id twice
        if len(got) >= 1 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    assert got, "the dead worker's journal was not replayed"
    assert 0 == proc.stop()
    got = await rows(pg_env)
    assert set(ok) <= set(got), f"lost: {sorted(set(ok) - set(got))[:5]}"
    assert len(got) <= attempts[0]
    assert [] == list(tmp_path.glob("usage-*.jsonl"))


async def test_sigterm_flushes_every_record_before_exit(serve, pg_env, mock_upstream, tmp_path):
    """With nothing flushed during traffic, SIGTERM writes every record before the workers exit."""
    proc = serve(slow_flush_toml(mock_upstream.base_url, tmp_path), workers=2, env=env_for(pg_env))
    ok: list[str] = []
    stop = asyncio.Event()
    sender = asyncio.create_task(fire(proc.base_url, ok, [0], stop))
    while len(ok) < 40:
        await asyncio.sleep(0.05)
    stop.set()
    await sender
    assert 0 == len(await rows(pg_env))
    assert 0 == proc.stop()
    assert sorted(ok) == sorted(await rows(pg_env))
    assert [] == list(tmp_path.glob("usage-*.jsonl"))


async def test_sighup_reloads_the_price_table(serve, pg_env, mock_upstream, tmp_path):
    """Edit prices.toml, SIGHUP: the rolled workers charge the new price (a fresh load at worker start)."""
    prices = tmp_path / "prices.toml"
    shipped = (Path(__file__).resolve().parent.parent / "config" / "prices.toml").read_text()
    prices.write_text(shipped)
    toml = gateway_toml(mock_upstream.base_url, extra=f"""
        [accounting]
        journal_dir = "{tmp_path}"
        flush_ms = 20
        """)
    toml = toml.replace(f'file = "{Path(__file__).resolve().parent.parent / "config" / "prices.toml"}"',
                        f'file = "{prices}"', 1)
    proc = serve(toml, workers=1, env=env_for(pg_env))
    body = {"model": "demo-claude", "max_tokens": 20, "messages": MSGS}

    async def one() -> str:
        async with aiohttp.ClientSession() as s, s.post(proc.base_url + "/v1/messages", json=body,
                                                         headers={**ANTH, "x-mock-chunks": "10"}) as r:
            await r.read()
            assert 200 == r.status
            return r.headers["x-request-id"]

    before = await one()
    prices.write_text(shipped.replace('[models."demo-*"]\ninput = 3.0\noutput = 15.0',
                                      '[models."demo-*"]\ninput = 30.0\noutput = 150.0'))
    proc.signal(signal.SIGHUP)
    deadline = time.monotonic() + 20
    while '"reloaded"' not in proc.log_text():
        assert time.monotonic() < deadline, proc.log_text()
        await asyncio.sleep(0.05)
    after = await one()
    assert 0 == proc.stop()
    got = await rows(pg_env)
    assert 10 * got[before]["cost_pico"] == got[after]["cost_pico"]
