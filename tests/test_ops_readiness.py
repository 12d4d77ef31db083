"""GET /readyz: Postgres, Redis and circuits; unready while draining."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from gateway import keys
from tests.conftest import TEST_KEY, MockUpstream, gateway_toml, sha
from tests.fixtures.servers import PostgresServer, RedisServer

LIMITED_KEY = "gwk_test_" + "r" * 32
HEADERS = {"x-api-key": LIMITED_KEY, "anthropic-version": "2023-06-01"}
BODY = {"model": "demo-claude", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}


def deps_toml(upstream: str) -> str:
    """Postgres and Redis from the environment, plus a key with an rpm limit (so requests use Redis)."""
    return gateway_toml(upstream, extra=f"""
        [database]
        url_env = "OPS_TEST_DATABASE_URL"
        [redis]
        url_env = "OPS_TEST_REDIS_URL"

        [[keys]]
        name = "limited"
        key_sha256 = "{sha(LIMITED_KEY)}"
        limits = {{ rpm = 1000 }}
    """)


@pytest.fixture
async def deps_gateway(
    make_gateway: Any, mock_upstream: MockUpstream, pg_dsn: str, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> Any:
    """An in-process gateway whose config names the throwaway Postgres and Redis."""
    from gateway.stores.migrate import migrate_dsn

    await migrate_dsn(pg_dsn)
    monkeypatch.setenv("OPS_TEST_DATABASE_URL", pg_dsn)
    monkeypatch.setenv("OPS_TEST_REDIS_URL", redis_url)
    return await make_gateway(deps_toml(mock_upstream.base_url))


async def _wait_status(gw: Any, want: int, timeout: float = 10.0) -> dict[str, Any]:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        r = await gw.get("/readyz")
        body: dict[str, Any] = await r.json()
        if r.status == want or asyncio.get_running_loop().time() > deadline:
            assert want == r.status, body
            return body
        await asyncio.sleep(0.1)


async def test_ready_when_postgres_and_redis_answer(deps_gateway: Any) -> None:
    """Both dependencies up and circuits closed: 200 with each check reported."""
    body = await _wait_status(deps_gateway, 200)
    assert "ready" == body["status"]
    assert "ok" == body["checks"]["postgres"]["status"]
    assert "ok" == body["checks"]["redis"]["status"]
    assert {"mock-anthropic": "closed", "mock-openai": "closed"} == body["checks"]["circuits"]["upstreams"]


async def test_unready_while_redis_is_down_and_ready_again_after(
    deps_gateway: Any, redis_server: RedisServer
) -> None:
    """Stopping Redis turns /readyz 503 (redis: down; a request then marks the worker degraded); restarting it turns it 200."""
    await _wait_status(deps_gateway, 200)
    redis_server.stop()
    try:
        body = await _wait_status(deps_gateway, 503)
        assert "unready" == body["status"]
        assert "down" == body["checks"]["redis"]["status"]
        assert "ok" == body["checks"]["postgres"]["status"]
        # A request meets the outage: it is served on local limits and the worker counts itself degraded.
        r = await deps_gateway.post("/v1/messages", json=BODY, headers=HEADERS)
        assert 200 == r.status
        text = await (await deps_gateway.get("/metrics")).text()
        assert 'gateway_dependency_degraded{dependency="redis"} 1.0' in text
        assert 'gateway_dependency_degradations_total{dependency="redis"} 1.0' in text
        assert 'gateway_limiter_decisions_total{decision="degraded"} 1.0' in text
    finally:
        redis_server.start()
    await _wait_status(deps_gateway, 200)


async def test_unready_while_postgres_is_down_and_ready_again_after(
    deps_gateway: Any, pg_server: PostgresServer
) -> None:
    """Stopping Postgres turns /readyz 503 with postgres: down (degraded gauge 1); restarting it turns it 200."""
    await _wait_status(deps_gateway, 200)
    pg_server.stop()
    try:
        body = await _wait_status(deps_gateway, 503)
        assert "down" == body["checks"]["postgres"]["status"]
        assert "ok" == body["checks"]["redis"]["status"]
        assert "OPS_TEST" not in str(body) and "postgresql://" not in str(body)
        # An unknown key cannot be checked now: 503, counted; the worker reports Postgres degraded.
        r = await deps_gateway.post("/v1/messages", json=BODY, headers={**HEADERS, "x-api-key": "gwk_" + "u" * 40})
        assert 529 == r.status
        text = await (await deps_gateway.get("/metrics")).text()
        assert 'gateway_dependency_degraded{dependency="postgres"} 1.0' in text
        assert 'gateway_key_cache_events_total{event="unavailable"} 1.0' in text
    finally:
        pg_server.start()
    await _wait_status(deps_gateway, 200, timeout=20)


async def test_unready_while_draining(gateway: Any) -> None:
    """Once the worker starts draining (SIGTERM sets keys.DRAINING), /readyz answers 503 draining."""
    r = await gateway.get("/readyz")
    assert 200 == r.status
    gateway.server.app[keys.DRAINING][0] = True
    r = await gateway.get("/readyz")
    assert 503 == r.status
    assert {"status": "draining"} == await r.json()
    r = await gateway.get("/healthz")
    assert 200 == r.status  # liveness is unaffected


async def test_unready_when_every_circuit_is_open(make_gateway: Any, mock_upstream: MockUpstream) -> None:
    """Upstream 5xx until every breaker opens: 503 with circuits down (liveness unaffected)."""
    gw = await make_gateway(gateway_toml(mock_upstream.base_url))
    fail = {"x-mock-status": "500", "x-api-key": TEST_KEY, "anthropic-version": "2023-06-01"}
    body = {"model": "demo-claude", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
    for _ in range(5):  # the default failure_threshold
        await gw.post("/v1/messages", json=body, headers=fail)
        await gw.post("/v1/chat/completions", json=body, headers={**fail, "authorization": f"Bearer {TEST_KEY}"})
    ready = await _wait_status(gw, 503)
    assert "down" == ready["checks"]["circuits"]["status"]
    assert {"mock-anthropic": "open", "mock-openai": "open"} == ready["checks"]["circuits"]["upstreams"]
    assert "disabled" == ready["checks"]["postgres"]["status"]
