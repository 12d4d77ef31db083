"""Failover before the first byte, and the circuit breaker per deployment.

Each route here has a bad primary deployment and a good fallback.  Bad means a
dead port (connection refused), a slow mock (first-byte timeout) or the mock's
``/_mock/status/{code}`` base URL (always that status).
"""

from __future__ import annotations

import asyncio
import textwrap
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from gateway.config import BreakerConfig, MockUpstreamConfig
from gateway.mock.upstream import create_mock_app
from gateway.proxy.failures import Verdict, classify_status
from gateway.resilience.breaker import Breaker, State
from tests.conftest import CONFIG_DIR, TEST_KEY, MockUpstream, sha
from tests.fixtures.servers import free_port

AV = {"anthropic-version": "2023-06-01"}
MSG = {"model": "demo-claude", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}
CHAT = {"model": "demo-gpt", "messages": [{"role": "user", "content": "hi"}]}
AUTH = {"anthropic": {"x-api-key": TEST_KEY, **AV}, "openai": {"authorization": f"Bearer {TEST_KEY}"}}
PATHS = {"anthropic": ("/v1/messages", MSG), "openai": ("/v1/chat/completions", CHAT)}
DIALECTS = pytest.mark.parametrize("dialect", ["anthropic", "openai"])


def failover_toml(bad: str, good: str | None, *, threshold: int = 5, cooldown: float = 10.0,
                  first_byte: float = 5.0) -> str:
    """demo-* -> the bad deployment first, then the good one as fallback (one pair per dialect)."""
    ups = []
    for dialect in ("anthropic", "openai"):
        ups.append(f"""
            [upstreams.bad-{dialect}]
            provider = "{dialect}"
            base_url = "{bad}"
            api_key_env = "TEST_{dialect.upper()}_KEY"
            first_byte_timeout = {first_byte}
            retries = 0  # failover and breakers alone (same-upstream retries: tests/test_routing_scenarios.py)
            breaker = {{ failure_threshold = {threshold}, cooldown_seconds = {cooldown} }}
            """)
        if good:
            ups.append(f"""
                [upstreams.good-{dialect}]
                provider = "{dialect}"
                base_url = "{good}"
                api_key_env = "TEST_{dialect.upper()}_KEY"
                """)
    fallbacks = '["good-anthropic", "good-openai"]' if good else "[]"
    return textwrap.dedent(f"""
        [server]
        host = "127.0.0.1"
        port = 0
        forward_headers = ["x-mock-*"]

        [pricing]
        file = "{CONFIG_DIR / 'prices.toml'}"

        [[routes]]
        match = "demo-*"
        deployments = [{{ upstream = "bad-anthropic" }}, {{ upstream = "bad-openai" }}]
        fallbacks = {fallbacks}

        [[keys]]
        name = "test"
        key_sha256 = "{sha(TEST_KEY)}"
        """) + "".join(textwrap.dedent(u) for u in ups)


async def call(client: Any, dialect: str, headers: dict[str, str] | None = None, **body: Any) -> tuple[Any, bytes]:
    path, payload = PATHS[dialect]
    r = await client.post(path, headers={**AUTH[dialect], **(headers or {})}, json={**payload, **body})
    return r, await r.read()


@pytest.fixture
async def slow_mock() -> AsyncIterator[MockUpstream]:
    """A mock that takes 10 s before answering anything."""
    server = TestServer(create_mock_app(MockUpstreamConfig(latency_ms=10_000)), host="127.0.0.1")
    await server.start_server()
    yield MockUpstream(server)
    await server.close()


# ------------------------------------------------------------------ failover


@DIALECTS
@pytest.mark.parametrize("stream", [False, True])
async def test_connection_refused_fails_over_to_fallback(make_gateway, mock_upstream, dialect, stream):
    gw = await make_gateway(failover_toml(f"http://127.0.0.1:{free_port()}", mock_upstream.base_url))
    r, body = await call(gw, dialect, stream=stream)
    assert 200 == r.status, body
    assert 1 == (await mock_upstream.stats())["requests"]


@DIALECTS
async def test_first_byte_timeout_fails_over_to_fallback(make_gateway, mock_upstream, slow_mock, dialect):
    gw = await make_gateway(failover_toml(slow_mock.base_url, mock_upstream.base_url, first_byte=0.2))
    r, body = await call(gw, dialect)
    assert 200 == r.status, body
    assert 1 == (await slow_mock.stats())["requests"]
    assert 1 == (await mock_upstream.stats())["requests"]


@DIALECTS
@pytest.mark.parametrize("code", [429, 500, 502, 503, 529])
async def test_throttled_or_failed_upstream_fails_over(make_gateway, mock_upstream, dialect, code):
    """429 and 5xx from the first deployment go to the fallback before any byte reached the client."""
    gw = await make_gateway(failover_toml(f"{mock_upstream.base_url}/_mock/status/{code}", mock_upstream.base_url))
    r, body = await call(gw, dialect, stream=True)
    assert 200 == r.status, body
    stats = await mock_upstream.stats()
    assert 1 == stats[f"status_{code}"]
    assert 1 == stats["streams_completed"]


@DIALECTS
@pytest.mark.parametrize("code", [400, 403, 404, 413, 422])
async def test_caller_errors_do_not_fail_over(make_gateway, mock_upstream, dialect, code):
    """A 4xx caller error is relayed as is: the next deployment would refuse the same request."""
    gw = await make_gateway(failover_toml(f"{mock_upstream.base_url}/_mock/status/{code}", mock_upstream.base_url))
    r, body = await call(gw, dialect)
    assert code == r.status
    assert b"mock error" in body
    assert 1 == (await mock_upstream.stats())["requests"]


@DIALECTS
async def test_upstream_401_fails_over_to_a_deployment_with_a_working_key(make_gateway, mock_upstream, dialect):
    """An upstream 401 means the gateway's provider key failed: try the next deployment."""
    gw = await make_gateway(failover_toml(f"{mock_upstream.base_url}/_mock/status/401", mock_upstream.base_url))
    r, body = await call(gw, dialect)
    assert 200 == r.status, body
    assert 1 == (await mock_upstream.stats())["status_401"]


@DIALECTS
async def test_upstream_401_is_never_relayed_as_the_callers_401(make_gateway, mock_upstream, dialect):
    """With no other deployment, a provider-key 401 is the gateway's 502: the caller's key is fine."""
    gw = await make_gateway(failover_toml(f"{mock_upstream.base_url}/_mock/status/401", None))
    r, body = await call(gw, dialect)
    assert 502 == r.status
    assert b"mock error 401" not in body
    assert b"upstream_error" in body if dialect == "openai" else b"api_error" in body
    assert "x-should-retry" not in r.headers


@DIALECTS
async def test_last_deployment_failure_is_relayed_with_its_status(make_gateway, mock_upstream, dialect):
    """With no fallback left, the upstream's own 503 is relayed (in the client's dialect, unchanged)."""
    gw = await make_gateway(failover_toml(f"{mock_upstream.base_url}/_mock/status/503", None))
    r, body = await call(gw, dialect)
    assert 503 == r.status
    assert b"mock error 503" in body
    assert r.headers["x-request-id"].startswith("req_")


@DIALECTS
async def test_no_failover_once_the_stream_started(make_gateway, mock_upstream, dialect):
    """A stream that breaks after its first byte ends with an error event; it is not retried elsewhere."""
    gw = await make_gateway(failover_toml(mock_upstream.base_url, mock_upstream.base_url))
    r, body = await call(gw, dialect, headers={"x-mock-drop-after": "1"}, stream=True)
    assert 200 == r.status
    assert b"error" in body
    assert 1 == (await mock_upstream.stats())["requests"]


# ------------------------------------------------------------------ breaker over HTTP


@DIALECTS
async def test_breaker_opens_after_threshold_and_skips_the_deployment(make_gateway, mock_upstream, dialect):
    """After N failures the bad deployment is skipped: requests go straight to the fallback."""
    bad = f"{mock_upstream.base_url}/_mock/status/500"
    gw = await make_gateway(failover_toml(bad, mock_upstream.base_url, threshold=3, cooldown=60))
    for _ in range(6):
        r, _body = await call(gw, dialect)
        assert 200 == r.status
    assert 3 == (await mock_upstream.stats())["status_500"]


@DIALECTS
async def test_all_circuits_open_answers_overloaded_with_retry_after(make_gateway, dialect):
    """Every deployment open: 529 (Anthropic) / 503 (OpenAI) with retry-after, no upstream call."""
    gw = await make_gateway(failover_toml(f"http://127.0.0.1:{free_port()}", None, threshold=2, cooldown=20))
    for _ in range(2):
        r, _body = await call(gw, dialect)
        assert 502 == r.status
    r, body = await call(gw, dialect)
    assert (529 if dialect == "anthropic" else 503) == r.status
    assert 19 <= int(r.headers["retry-after"]) <= 20
    assert int(r.headers["retry-after-ms"]) > 18_000
    assert r.headers["x-request-id"].startswith("req_")
    assert b"overloaded_error" in body if dialect == "anthropic" else b"service_unavailable" in body


@DIALECTS
async def test_half_open_probe_success_closes_the_breaker(make_gateway, dialect):
    """After the cooldown one probe goes through; its success closes the circuit."""
    port = free_port()
    gw = await make_gateway(failover_toml(f"http://127.0.0.1:{port}", None, threshold=1, cooldown=0.3))
    r, _ = await call(gw, dialect)
    assert 502 == r.status
    r, _ = await call(gw, dialect)
    assert r.status in (503, 529)
    server = TestServer(create_mock_app(MockUpstreamConfig(chunks=2)), host="127.0.0.1", port=port)
    await server.start_server()
    try:
        await asyncio.sleep(0.35)
        for _ in range(3):
            r, body = await call(gw, dialect)
            assert 200 == r.status, body
    finally:
        await server.close()


@DIALECTS
async def test_half_open_probe_failure_reopens_the_breaker(make_gateway, dialect):
    """A failed probe re-opens the circuit for a full cooldown."""
    gw = await make_gateway(failover_toml(f"http://127.0.0.1:{free_port()}", None, threshold=1, cooldown=0.3))
    r, _ = await call(gw, dialect)
    assert 502 == r.status
    await asyncio.sleep(0.35)
    r, _ = await call(gw, dialect)
    assert 502 == r.status  # the probe went out and failed
    r, _ = await call(gw, dialect)
    assert r.status in (503, 529)


@DIALECTS
async def test_caller_errors_never_trip_the_breaker(make_gateway, mock_upstream, dialect):
    """Any number of upstream 4xx caller errors leaves the circuit closed."""
    gw = await make_gateway(failover_toml(f"{mock_upstream.base_url}/_mock/status/400", None, threshold=1))
    for _ in range(5):
        r, _ = await call(gw, dialect)
        assert 400 == r.status
    assert 5 == (await mock_upstream.stats())["status_400"]


@DIALECTS
async def test_gateway_caller_errors_never_reach_the_breaker(make_gateway, mock_upstream, dialect):
    """Bad JSON and unknown models are refused before any deployment is tried."""
    gw = await make_gateway(failover_toml(mock_upstream.base_url, None, threshold=1))
    path, _ = PATHS[dialect]
    for _ in range(3):
        r = await gw.post(path, headers=AUTH[dialect], data=b"{nope")
        assert 400 == r.status
    r, _ = await call(gw, dialect)
    assert 200 == r.status


@DIALECTS
async def test_mid_stream_failure_counts_against_the_breaker(make_gateway, mock_upstream, dialect):
    """An upstream that cuts its stream is an upstream failure: with threshold 1 the circuit opens."""
    gw = await make_gateway(failover_toml(mock_upstream.base_url, None, threshold=1, cooldown=30))
    r, _ = await call(gw, dialect, headers={"x-mock-drop-after": "1"}, stream=True)
    assert 200 == r.status
    r, _ = await call(gw, dialect)
    assert r.status in (503, 529)


@DIALECTS
async def test_upstream_error_event_counts_against_the_breaker(make_gateway, mock_upstream, dialect):
    """A provider error event mid-stream is an upstream failure too."""
    gw = await make_gateway(failover_toml(mock_upstream.base_url, None, threshold=1, cooldown=30))
    r, body = await call(gw, dialect, headers={"x-mock-error-after": "1"}, stream=True)
    assert 200 == r.status
    assert b"mock overloaded mid-stream" in body
    r, _ = await call(gw, dialect)
    assert r.status in (503, 529)


# ------------------------------------------------------------------ units: classifier and breaker


@pytest.mark.parametrize(
    ("status", "verdict"),
    [(200, Verdict.OK), (204, Verdict.OK), (301, Verdict.OK), (400, Verdict.CALLER), (401, Verdict.FAILED),
     (403, Verdict.CALLER), (404, Verdict.CALLER), (408, Verdict.FAILED), (409, Verdict.FAILED),
     (413, Verdict.CALLER), (422, Verdict.CALLER), (429, Verdict.THROTTLED), (500, Verdict.FAILED),
     (502, Verdict.FAILED), (503, Verdict.FAILED), (504, Verdict.FAILED), (529, Verdict.FAILED)],
)
def test_failure_classifier(status, verdict):
    """Caller faults neither fail over nor trip; 429 fails over without tripping; 5xx does both."""
    assert verdict == classify_status(status)
    assert (verdict in (Verdict.THROTTLED, Verdict.FAILED)) == verdict.fails_over
    assert (verdict is Verdict.FAILED) == verdict.trips


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_breaker_lifecycle_closed_open_half_open_closed():
    """threshold failures open it; after the cooldown half_open_probes probes pass; success closes."""
    clock = Clock()
    b = Breaker(BreakerConfig(failure_threshold=3, cooldown_seconds=10, half_open_probes=1), clock)
    for _ in range(2):
        b.record_failure()
    assert State.CLOSED == b.state
    b.record_success()  # a success resets the count: failures must be consecutive
    for _ in range(3):
        assert b.allow()
        b.record_failure()
    assert State.OPEN == b.state
    assert not b.allow()
    assert 10.0 == b.retry_after()
    clock.t += 4
    assert 6.0 == b.retry_after()
    clock.t += 6
    assert b.allow()  # the one probe
    assert State.HALF_OPEN == b.state
    assert not b.allow()  # no second probe while the first is out
    b.record_success()
    assert State.CLOSED == b.state
    assert b.allow() and b.allow()


def test_breaker_failed_probe_reopens_for_a_full_cooldown():
    clock = Clock()
    b = Breaker(BreakerConfig(failure_threshold=1, cooldown_seconds=5), clock)
    b.record_failure()
    clock.t += 5
    assert b.allow()
    b.record_failure()
    assert State.OPEN == b.state
    assert 5.0 == b.retry_after()
    assert not b.allow()


def test_breaker_released_probe_lets_another_probe_through():
    """A probe that ended without a verdict (caller error, cancelled) frees its slot."""
    clock = Clock()
    b = Breaker(BreakerConfig(failure_threshold=1, cooldown_seconds=5), clock)
    b.record_failure()
    clock.t += 5
    assert b.allow()
    assert not b.allow()
    b.release_probe()
    assert b.allow()


@DIALECTS
async def test_client_leaving_a_half_open_probe_stream_does_not_wedge_the_breaker(make_gateway, dialect):
    """A probe whose stream the client abandons still settles the circuit: later requests pass."""
    port = free_port()
    gw = await make_gateway(failover_toml(f"http://127.0.0.1:{port}", None, threshold=1, cooldown=0.3))
    r, _ = await call(gw, dialect)
    assert 502 == r.status
    server = TestServer(create_mock_app(MockUpstreamConfig(chunks=2)), host="127.0.0.1", port=port)
    await server.start_server()
    try:
        await asyncio.sleep(0.35)
        path, payload = PATHS[dialect]
        headers = {**AUTH[dialect], "x-mock-chunks": "200", "x-mock-chunk-gap-ms": "20"}
        r = await gw.post(path, headers=headers, json={**payload, "stream": True})
        assert 200 == r.status
        await r.content.readany()
        r.close()  # the client leaves the probe's stream
        r, body = await call(gw, dialect)
        assert 200 == r.status, body
    finally:
        await server.close()


def test_a_late_success_does_not_close_an_open_breaker():
    """A request admitted before the trip that succeeds afterwards leaves the circuit open."""
    clock = Clock()
    b = Breaker(BreakerConfig(failure_threshold=2, cooldown_seconds=5), clock)
    b.record_failure()
    b.record_failure()
    b.record_success()
    assert State.OPEN == b.state
    assert not b.allow()
