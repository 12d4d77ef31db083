"""Limits across real processes: a 2-worker ``llm-gateway serve`` plus a second instance, one Redis.

Requests go over TCP to the supervisors' shared sockets, so the kernel
spreads them over the workers; the only thing the processes share is Redis.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from tests.conftest import gateway_toml
from tests.fixtures.limits import CHAT, LIM_KEY, chat_body, fire, limited_keys, post_chat, statuses

pytestmark = pytest.mark.slow



def workers_of(pid: int) -> set[int]:
    """The live child processes (workers) of a supervisor."""
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except FileNotFoundError:
        return set()
    alive = set()
    for k in kids:
        try:
            state = Path(f"/proc/{k}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            continue
        if state != "Z":
            alive.add(int(k))
    return alive


async def test_rpm_exact_over_two_instances_and_three_workers(
    serve: Any, mock_upstream: Any, redis_url: str
) -> None:
    """rpm=10: 30 requests at once over a 2-worker instance and a 1-worker instance -> exactly 10 served."""
    env = {"GATEWAY_REDIS_URL": redis_url}
    extra = limited_keys("rpm = 10", redis="timeout_ms = 1000")  # a loaded test machine must not trip degradation
    a = serve(gateway_toml(mock_upstream.base_url, extra=extra, workers=2), workers=2, env=env)
    b = serve(gateway_toml(mock_upstream.base_url, extra=extra, workers=1), workers=1, env=env)
    async with aiohttp.ClientSession() as s:
        answers = await fire([(s, a.base_url + CHAT), (s, b.base_url + CHAT)], 30, LIM_KEY, chat_body())
    assert {200: 10, 429: 20} == statuses(answers)
    assert 10 == (await mock_upstream.stats())["requests"]


async def test_killed_workers_leases_expire(serve: Any, mock_upstream: Any, redis_url: str) -> None:
    """max_concurrency=2: leases of live slow requests are renewed past lease_seconds; SIGKILLed, they lapse."""
    env = {"GATEWAY_REDIS_URL": redis_url}
    extra = limited_keys("max_concurrency = 2", redis="lease_seconds = 2.0\ntimeout_ms = 1000")
    gw = serve(gateway_toml(mock_upstream.base_url, extra=extra, workers=2), workers=2, env=env)
    url = gw.base_url + CHAT
    lease_key = "gw:v3:{u:lim-user}:c:k:limited"
    r = aioredis.Redis.from_url(redis_url)
    async with aiohttp.ClientSession() as s:
        slow = [
            asyncio.ensure_future(post_chat(s, url, LIM_KEY, chat_body(), {"x-mock-latency-ms": "20000"}))
            for _ in range(2)
        ]
        deadline = time.monotonic() + 15
        while (await mock_upstream.stats()).get("requests", 0) < 2:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        await asyncio.sleep(3.0)  # longer than the lease: only renewal keeps them
        assert 429 == (await post_chat(s, url, LIM_KEY, chat_body())).status
        assert 2 == await r.zcard(lease_key)
        for pid in workers_of(gw.proc.pid):
            os.kill(pid, signal.SIGKILL)
        results = await asyncio.gather(*slow, return_exceptions=True)
        assert all(isinstance(x, aiohttp.ClientError) for x in results)
        assert 2 == await r.zcard(lease_key)  # nobody released them: they can only expire
        deadline = time.monotonic() + 40
        while True:  # the supervisor replaces the workers; the leases lapse after lease_seconds
            try:
                ans = await post_chat(s, url, LIM_KEY, chat_body())
                if ans.status == 200:
                    break
            except aiohttp.ClientError:
                pass
            assert time.monotonic() < deadline, "leases never expired"
            await asyncio.sleep(0.1)
        await gw_drain_leases(r, lease_key)
    await r.aclose()


async def gw_drain_leases(r: aioredis.Redis, key: str) -> None:
    """After the new request settled, nothing is held."""
    deadline = time.monotonic() + 30
    while await r.zcard(key):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
