"""The same scripts on a 3-node Redis Cluster: every key of a call shares the user's hash tag."""

from __future__ import annotations

import re
import subprocess
from typing import Any

import pytest
from redis.asyncio.cluster import RedisCluster

from gateway import keys
from tests.conftest import gateway_toml, sha
from tests.fixtures.limits import CHAT, LIM_KEY, actual_cost, chat_body, fire, limited_keys, statuses

SLOW = {"x-mock-latency-ms": "300"}
KEY_B = "gwk_test_" + "e" * 32  # user-b hashes to slot 2073, lim-user to 12101: different nodes


@pytest.fixture
def with_cluster(redis_cluster_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("GATEWAY_REDIS_URL", redis_cluster_url)
    return redis_cluster_url


async def test_all_limits_hold_on_a_cluster(make_gateway: Any, mock_upstream: Any, with_cluster: str, redis_cluster: Any) -> None:
    """Two users (two hash slots, two nodes): each gets exactly its rpm of concurrent requests; settle works too."""
    extra = limited_keys(
        "rpm = 3, tpm = 100000, max_concurrency = 5, budget_usd = 1.0", redis='topology = "cluster"\ntimeout_ms = 1000'
    ) + f'''
[[keys]]
name = "key-b"
user = "user-b"
key_sha256 = "{sha(KEY_B)}"

[[users]]
name = "user-b"
limits = {{ rpm = 3, max_concurrency = 10 }}
'''
    gws = [await make_gateway(gateway_toml(mock_upstream.base_url, extra=extra)) for _ in range(2)]
    targets = [(g, CHAT) for g in gws]
    lim, b = await fire(targets, 6, LIM_KEY, chat_body(), SLOW), await fire(targets, 6, KEY_B, chat_body(), SLOW)
    assert {200: 3, 429: 3} == statuses(lim)
    assert {200: 3, 429: 3} == statuses(b)
    for g in gws:
        await g.server.app[keys.TASKS].drain(timeout=5)
        assert 0 == g.server.app[keys.LIMITER].stats.degraded
    client = RedisCluster.from_url(with_cluster)
    try:
        assert 0 == await client.zcard("gw:v3:{u:lim-user}:c:k:limited")
        spent = int(await client.hget("gw:v3:{u:lim-user}:b:k:limited:all", "v"))
    finally:
        await client.aclose()
    assert sum(actual_cost(a.json()["usage"]) for a in lim if a.status == 200) == spent
    # The two users' counters hash to different slots (and here to different nodes).
    owners = set()
    for node in redis_cluster.nodes:
        out = subprocess.run(["redis-cli", "-p", str(node.port), "--scan"], capture_output=True, text=True).stdout
        if out.strip():
            owners.add(frozenset(re.search(r"\{[^}]*\}", k).group(0) for k in out.split()))
    assert {frozenset({"{u:lim-user}"}), frozenset({"{u:user-b}"})} == owners
