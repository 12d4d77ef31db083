"""Header hygiene both ways: what the upstream saw, and what the client saw.

The upstream's view comes from the mock's ``GET /_mock/requests``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gateway import keys
from gateway.app import create_app
from gateway.config import parse
from gateway.policy.admit import Admitter, Reservation
from tests.conftest import CONFIG_DIR, TEST_KEY, gateway_toml

AV = {"anthropic-version": "2023-06-01"}
MSG = {"model": "demo-claude", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}
CHAT = {"model": "demo-gpt", "messages": [{"role": "user", "content": "hi"}]}
ANTHROPIC_SECRET = "sk-ant-upstream-secret"
OPENAI_SECRET = "sk-openai-upstream-secret"
HOP_BY_HOP = ("keep-alive", "proxy-authorization", "proxy-connection", "te", "trailer", "upgrade", "x-hop-custom")


async def last_seen(mock_upstream) -> dict[str, Any]:
    return (await mock_upstream.requests())[-1]


def client_view(r: Any, body: bytes) -> str:
    return orjson.dumps({"headers": {str(k): v for k, v in r.headers.items()}}).decode() + body.decode(errors="replace")


@pytest.mark.parametrize("stream", [False, True])
async def test_anthropic_upstream_sees_provider_key_and_provider_headers_only(gateway, mock_upstream, stream):
    """Upstream gets the provider key, anthropic-* headers; never the gateway key or hop-by-hop headers."""
    r = await gateway.post(
        "/v1/messages",
        headers={
            "x-api-key": TEST_KEY,
            "authorization": f"Bearer {TEST_KEY}",
            "anthropic-version": "2023-06-01",
            "anthropic-beta": "prompt-caching-2024-07-31,interleaved-thinking",
            "x-stainless-lang": "python",
            "user-agent": "Anthropic/Python 1.0",
            "cookie": "session=abc",
            "connection": "keep-alive, x-hop-custom",
            "keep-alive": "timeout=5",
            "x-hop-custom": "per-hop",
            "proxy-authorization": "Basic Zm9vOmJhcg==",
            "te": "trailers",
            "trailer": "x-foo",
            "accept-encoding": "gzip, br",
        },
        json={**MSG, "stream": stream},
        expect100=True,
    )
    body = await r.read()
    assert 200 == r.status, body
    seen = await last_seen(mock_upstream)
    h = seen["headers"]
    assert ANTHROPIC_SECRET == h["x-api-key"]
    assert "authorization" not in h
    assert TEST_KEY not in orjson.dumps(seen).decode()
    assert "2023-06-01" == h["anthropic-version"]
    assert "prompt-caching-2024-07-31,interleaved-thinking" == h["anthropic-beta"]
    assert "python" == h["x-stainless-lang"]
    assert "Anthropic/Python 1.0" == h["user-agent"]
    assert "cookie" not in h
    assert "expect" not in h  # the gateway answered the 100-continue itself
    for name in HOP_BY_HOP:
        assert name not in h, name
    assert "x-hop-custom" not in h.get("connection", "")
    assert "identity" == h["accept-encoding"]
    assert mock_upstream.base_url.removeprefix("http://") == h["host"]


@pytest.mark.parametrize("stream", [False, True])
async def test_openai_upstream_sees_provider_key_and_organization(gateway, mock_upstream, stream):
    """Upstream gets Bearer <provider key>, openai-organization/-project; never the gateway key."""
    r = await gateway.post(
        "/v1/chat/completions",
        headers={
            "authorization": f"Bearer {TEST_KEY}",
            "openai-organization": "org-123",
            "openai-project": "proj_abc",
            "openai-beta": "assistants=v2",
            "x-api-key": "",
            "proxy-connection": "keep-alive",
            "upgrade": "h2c",
        },
        json={**CHAT, "stream": stream},
    )
    body = await r.read()
    assert 200 == r.status, body
    seen = await last_seen(mock_upstream)
    h = seen["headers"]
    assert f"Bearer {OPENAI_SECRET}" == h["authorization"]
    assert "x-api-key" not in h
    assert TEST_KEY not in orjson.dumps(seen).decode()
    assert "org-123" == h["openai-organization"]
    assert "proj_abc" == h["openai-project"]
    assert "assistants=v2" == h["openai-beta"]
    for name in HOP_BY_HOP:
        assert name not in h, name


async def test_ak_path_key_never_reaches_upstream(gateway, mock_upstream):
    """With /ak/{key}, neither the path nor any header upstream holds the gateway key."""
    r = await gateway.post(f"/ak/{TEST_KEY}/v1/messages", headers={**AV, "x-api-key": "unused"}, json=MSG)
    assert 200 == r.status
    seen = await last_seen(mock_upstream)
    assert "/v1/messages" == seen["path"]
    assert ANTHROPIC_SECRET == seen["headers"]["x-api-key"]
    assert TEST_KEY not in orjson.dumps(seen).decode()


@pytest.mark.parametrize("stream", [False, True])
async def test_anthropic_client_sees_upstream_request_id_and_never_provider_key(gateway, stream):
    """Anthropic's request-id is relayed as is; x-request-id is the gateway's."""
    r = await gateway.post("/v1/messages", headers={"x-api-key": TEST_KEY, **AV}, json={**MSG, "stream": stream})
    body = await r.read()
    assert r.headers["request-id"].startswith("req_mock_msg_mock")
    assert r.headers["x-request-id"].startswith("req_")
    assert not r.headers["x-request-id"].startswith("req_mock")
    assert ANTHROPIC_SECRET not in client_view(r, body)
    assert "server" not in {k.lower() for k in r.headers} or "mock" not in r.headers.get("server", "")


@pytest.mark.parametrize("stream", [False, True])
async def test_openai_upstream_request_id_is_relayed_as_x_upstream_request_id(gateway, stream):
    """OpenAI's x-request-id would clash with the gateway's: it comes back as x-upstream-request-id."""
    r = await gateway.post(
        "/v1/chat/completions", headers={"authorization": f"Bearer {TEST_KEY}"}, json={**CHAT, "stream": stream}
    )
    body = await r.read()
    assert r.headers["x-upstream-request-id"].startswith("req_mock_chatcmpl-mock")
    assert 1 == len(r.headers.getall("x-request-id"))
    assert r.headers["x-request-id"].startswith("req_")
    assert not r.headers["x-request-id"].startswith("req_mock")
    assert OPENAI_SECRET not in client_view(r, body)


@pytest.mark.parametrize(
    ("path", "payload", "auth", "rid_header"),
    [
        ("/v1/messages", MSG, {"x-api-key": TEST_KEY, **AV}, "request-id"),
        ("/v1/chat/completions", CHAT, {"authorization": f"Bearer {TEST_KEY}"}, "x-upstream-request-id"),
    ],
)
async def test_upstream_error_in_clients_dialect_passes_through_unchanged(gateway, path, payload, auth, rid_header):
    """An upstream 400 keeps its status, body and request id; the gateway adds only its own headers."""
    r = await gateway.post(path, headers={**auth, "x-mock-status": "400"}, json=payload)
    body = await r.read()
    assert 400 == r.status
    assert "mock error 400" in orjson.loads(body)["error"]["message"]
    assert "req_mock_error" == r.headers[rid_header]
    assert r.headers["x-request-id"].startswith("req_")
    assert r.headers["server-timing"].startswith("gateway;dur=")


async def test_upstream_429_passes_retry_after_through(gateway):
    """An upstream 429 (no other deployment to fail over to) is relayed with its retry-after."""
    r = await gateway.post(
        "/v1/messages", headers={"x-api-key": TEST_KEY, **AV, "x-mock-status": "429"}, json=MSG
    )
    body = orjson.loads(await r.read())
    assert 429 == r.status
    assert "1" == r.headers["retry-after"]
    assert "rate_limit_error" == body["error"]["type"]


async def test_server_timing_excludes_upstream_time(gateway):
    """server-timing's gateway duration leaves out the time spent waiting on the upstream."""
    r = await gateway.post(
        "/v1/messages", headers={"x-api-key": TEST_KEY, **AV, "x-mock-latency-ms": "3000"}, json=MSG
    )
    assert 200 == r.status
    dur = float(r.headers["server-timing"].split("dur=")[1])
    # The upstream waited 3 s; the gateway's own share is reported apart from it (a bound no
    # loaded machine comes near, yet any inclusion of the upstream's wait breaks it).
    assert dur < 3000.0


async def test_healthz_carries_request_id(gateway):
    """Every response, not only the data plane's, carries x-request-id."""
    r = await gateway.get("/healthz")
    assert 200 == r.status
    assert r.headers["x-request-id"].startswith("req_")


async def test_upstream_compressing_anyway_reaches_the_client_decodable(gateway):
    """An upstream that gzips despite accept-encoding: identity: the client gets the encoding header with the bytes."""
    r = await gateway.post(
        "/v1/chat/completions", headers={"authorization": f"Bearer {TEST_KEY}", "x-mock-gzip": "1"}, json=CHAT
    )
    assert 200 == r.status
    assert "gzip" == r.headers["content-encoding"]
    assert "chat.completion" == (await r.json())["object"]  # aiohttp's client decodes it


class AdvertisingLimiter:
    """A Limiter (the policy protocol) that admits everything and advertises its state."""

    HEADERS = {"x-ratelimit-limit-requests": "100", "x-ratelimit-remaining-requests": "99",
               "x-ratelimit-reset-requests": "1s"}

    async def reserve(self, principal: Any, facts: Any) -> Reservation:
        return Reservation(headers=dict(self.HEADERS))

    async def settle(self, *args: Any) -> None:
        return None

    async def close(self) -> None:
        return None


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("mock_status", [None, "400"])
async def test_rate_limit_state_is_advertised_on_every_relayed_answer(mock_upstream, stream, mock_status):
    """The limiter's x-ratelimit-* headers reach the client on JSON, SSE and relayed upstream errors."""
    app = create_app(parse(gateway_toml(mock_upstream.base_url), source=str(CONFIG_DIR / "test.toml")))

    async def limiter(app: web.Application) -> AsyncIterator[None]:
        app[keys.ADMITTER] = Admitter(AdvertisingLimiter())
        yield

    app.cleanup_ctx.append(limiter)
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        headers = {"x-api-key": TEST_KEY, **AV, **({"x-mock-status": mock_status} if mock_status else {})}
        r = await client.post("/v1/messages", headers=headers, json={**MSG, "stream": stream})
        await r.read()
        assert (int(mock_status) if mock_status else 200) == r.status
        for name, value in AdvertisingLimiter.HEADERS.items():
            assert value == r.headers[name]
