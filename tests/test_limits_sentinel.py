"""redis.topology = "sentinel": the gateway asks a Sentinel for the master and limits there."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway import keys
from tests.conftest import gateway_toml
from tests.fixtures.limits import LIM_KEY, chat_body, fire, limited_keys, statuses
from tests.fixtures.servers import RedisServer, free_port, wait_port


@pytest.fixture
def sentinel_url(redis_url: str, redis_server: RedisServer) -> Iterator[str]:
    """A Sentinel (redis-server --sentinel) monitoring the session's Redis as ``mymaster``."""
    d = Path(tempfile.mkdtemp(prefix="gw-sentinel-"))
    port = free_port()
    conf = d / "sentinel.conf"
    conf.write_text(
        f"port {port}\nbind 127.0.0.1\ndir {d}\n"
        f"sentinel monitor mymaster 127.0.0.1 {redis_server.port} 1\n"
        "sentinel down-after-milliseconds mymaster 5000\n"
    )
    proc = subprocess.Popen(
        [shutil.which("redis-server") or "redis-server", str(conf), "--sentinel"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port)
        yield f"redis+sentinel://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        shutil.rmtree(d, ignore_errors=True)


async def test_limits_through_sentinel(
    make_gateway: Any, mock_upstream: Any, sentinel_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """rpm=3 over two gateways that found the master through Sentinel: 3 of 9 served."""
    monkeypatch.setenv("GATEWAY_REDIS_URL", sentinel_url)
    extra = limited_keys("rpm = 3, max_concurrency = 5", redis='topology = "sentinel"\ntimeout_ms = 1000')
    gws = [await make_gateway(gateway_toml(mock_upstream.base_url, extra=extra)) for _ in range(2)]
    answers = await fire([(g, "/v1/chat/completions") for g in gws], 9, LIM_KEY, chat_body())
    assert {200: 3, 429: 6} == statuses(answers)
    for g in gws:
        limiter = g.server.app[keys.LIMITER]
        assert limiter.store.fast is None  # redis-py's Sentinel client, not the single-node fast path
        assert 0 == limiter.stats.degraded
