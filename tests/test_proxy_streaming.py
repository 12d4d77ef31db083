"""SSE relay: the include_usage rewrite, client disconnects, mid-stream upstream failures.

The disconnect tests run the gateway and the mock as production runs them
(``handler_cancellation=True``), so that a dropped connection cancels the
handler at once on both sides and the mock counts it in ``streams_cancelled``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer

from gateway.app import create_app
from gateway.config import parse
from tests.conftest import CONFIG_DIR, TEST_KEY, MockUpstream, gateway_toml

AV = {"anthropic-version": "2023-06-01"}
MSG = {"model": "demo-claude", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}], "stream": True}
CHAT = {"model": "demo-gpt", "messages": [{"role": "user", "content": "hi"}], "stream": True}
AUTH = {"anthropic": {"x-api-key": TEST_KEY, **AV}, "openai": {"authorization": f"Bearer {TEST_KEY}"}}
PATHS = {"anthropic": ("/v1/messages", MSG), "openai": ("/v1/chat/completions", CHAT)}


def data_lines(raw: bytes) -> list[bytes]:
    return [line[5:].strip() for line in raw.split(b"\n") if line.startswith(b"data:")]


async def stream(client: TestClient[Any, Any], dialect: str, headers: dict[str, str] | None = None,
                 **body: Any) -> tuple[int, bytes]:
    path, payload = PATHS[dialect]
    r = await client.post(path, headers={**AUTH[dialect], **(headers or {})}, json={**payload, **body})
    return r.status, await r.read()


# ------------------------------------------------------------------ include_usage


async def test_usage_chunk_is_requested_and_stripped_when_client_did_not_ask(gateway, mock_upstream):
    """The gateway asks upstream for include_usage and removes the usage chunk from the client's stream."""
    status, raw = await stream(gateway, "openai")
    assert 200 == status
    seen = (await mock_upstream.requests())[-1]
    assert {"include_usage": True} == seen["body"]["stream_options"]
    data = data_lines(raw)
    assert b"[DONE]" == data[-1]
    chunks = [orjson.loads(d) for d in data[:-1]]
    assert 7 == len(chunks)
    assert all(c["choices"] for c in chunks), "the usage-only chunk must not reach the client"
    assert all(c.get("usage") is None for c in chunks)


async def test_usage_chunk_is_stripped_with_other_stream_options_kept(gateway, mock_upstream):
    """Client stream_options other than include_usage survive the rewrite."""
    status, raw = await stream(gateway, "openai", stream_options={"include_usage": False, "x_other": 1})
    assert 200 == status
    seen = (await mock_upstream.requests())[-1]
    assert {"include_usage": True, "x_other": 1} == seen["body"]["stream_options"]
    assert all(orjson.loads(d)["choices"] for d in data_lines(raw)[:-1])


async def test_usage_chunk_passes_through_when_client_asked(gateway, mock_upstream):
    """A client that asked for include_usage gets the usage chunk, and the body goes upstream unchanged."""
    raw_body = b'{"model":"demo-gpt","stream":true,"stream_options":{"include_usage":true},"messages":[]}'
    r = await gateway.post(
        "/v1/chat/completions",
        headers={**AUTH["openai"], "content-type": "application/json"},
        data=raw_body,
    )
    raw = await r.read()
    assert 200 == r.status
    seen = (await mock_upstream.requests())[-1]
    assert str(len(raw_body)) == seen["headers"]["content-length"]
    data = data_lines(raw)
    assert b"[DONE]" == data[-1]
    usage_chunk = orjson.loads(data[-2])
    assert [] == usage_chunk["choices"]
    assert 5 == usage_chunk["usage"]["completion_tokens"]


async def test_non_streamed_chat_body_is_not_rewritten(gateway, mock_upstream):
    """Only streamed chats get stream_options; a plain request goes upstream as sent."""
    r = await gateway.post("/v1/chat/completions", headers=AUTH["openai"], json={**CHAT, "stream": False})
    assert 200 == r.status
    assert "stream_options" not in (await mock_upstream.requests())[-1]["body"]


# ------------------------------------------------------------------ mid-stream upstream failure


@pytest.mark.parametrize("dialect", ["anthropic", "openai"])
async def test_upstream_drop_mid_stream_ends_with_error_event_never_success(gateway, dialect):
    """An upstream that drops the connection mid-stream: the dialect's error event, no message_stop / [DONE]."""
    status, raw = await stream(gateway, dialect, headers={"x-mock-drop-after": "2"})
    assert 200 == status
    assert b"message_stop" not in raw
    assert b"[DONE]" not in raw
    last = orjson.loads(data_lines(raw)[-1])
    if dialect == "anthropic":
        assert raw.rstrip().rsplit(b"\n\n", 1)[-1].startswith(b"event: error")
        assert "api_error" == last["error"]["type"]
        assert 2 == raw.count(b"event: content_block_delta")
    else:
        assert "upstream_error" == last["error"]["code"]
        assert 3 == raw.count(b'"delta"')  # role chunk + 2 deltas


@pytest.mark.parametrize("dialect", ["anthropic", "openai"])
async def test_upstream_cut_mid_line_never_glues_half_a_line_to_the_error_event(gateway, dialect):
    """A cut inside an event: the half line is withheld, so every event the client parses is whole JSON."""
    status, raw = await stream(gateway, dialect, headers={"x-mock-drop-after": "2", "x-mock-drop-mid-event": "1"})
    assert 200 == status
    assert raw.endswith(b"\n\n")
    for line in raw.split(b"\n"):
        if line.startswith(b"data:") and line != b"data: [DONE]":
            orjson.loads(line[5:])  # no truncated JSON reached the client
    last = orjson.loads(data_lines(raw)[-1])
    assert "error" in last
    assert b"message_stop" not in raw and b"[DONE]" not in raw


@pytest.mark.parametrize("dialect", ["anthropic", "openai"])
async def test_upstream_error_event_mid_stream_is_relayed_once_never_success(gateway, dialect):
    """The provider's own in-stream error reaches the client as is, once, with no terminal success event."""
    status, raw = await stream(gateway, dialect, headers={"x-mock-error-after": "2"})
    assert 200 == status
    assert b"message_stop" not in raw
    assert b"[DONE]" not in raw
    assert 1 == raw.count(b"mock overloaded mid-stream")
    assert b"incomplete" not in raw  # no second, gateway-made error event
    if dialect == "anthropic":
        assert 1 == raw.count(b"event: error")


@pytest.mark.parametrize("dialect", ["anthropic", "openai"])
async def test_upstream_stall_mid_stream_hits_idle_timeout(make_gateway, cancelling_mock, dialect):
    """An upstream that stops sending: after idle_timeout a timeout error event, and the upstream is released."""
    gw = await make_gateway(gateway_toml(cancelling_mock.base_url).replace("idle_timeout = 2", "idle_timeout = 0.3"))
    status, raw = await stream(gw, dialect, headers={"x-mock-stall-after": "1"})
    assert 200 == status
    assert b"message_stop" not in raw
    assert b"[DONE]" not in raw
    err = orjson.loads(data_lines(raw)[-1])["error"]
    if dialect == "anthropic":
        assert "timeout_error" == err["type"]
    else:
        assert "upstream_timeout" == err["code"]
    await wait_for_stat(cancelling_mock, "streams_cancelled", 1)


@pytest.mark.parametrize("dialect", ["anthropic", "openai"])
async def test_upstream_error_status_before_stream_is_relayed_as_json(gateway, dialect):
    """A stream request the upstream refuses (400) gets the upstream's JSON error, not an SSE stream."""
    path, payload = PATHS[dialect]
    r = await gateway.post(path, headers={**AUTH[dialect], "x-mock-status": "400"}, json=payload)
    assert 400 == r.status
    assert r.headers["content-type"].startswith("application/json")
    assert "mock error 400" in (await r.json())["error"]["message"]


@pytest.mark.parametrize("dialect", ["anthropic", "openai"])
async def test_non_streamed_body_cut_by_upstream_is_502(gateway, dialect):
    """A JSON body the upstream cuts half-way is a 502 in the dialect's envelope, not a truncated 200."""
    path, payload = PATHS[dialect]
    r = await gateway.post(path, headers={**AUTH[dialect], "x-mock-drop-after": "0"}, json={**payload, "stream": False})
    body = await r.json()
    assert 502 == r.status
    assert r.headers["x-request-id"].startswith("req_")
    if dialect == "anthropic":
        assert "api_error" == body["error"]["type"]
    else:
        assert "upstream_error" == body["error"]["code"]


@pytest.mark.parametrize("dialect", ["anthropic", "openai"])
async def test_non_streamed_body_stalled_by_upstream_is_504(make_gateway, cancelling_mock, dialect):
    """A JSON body that stops half-way is bounded by idle_timeout: 504, and the upstream is released."""
    gw = await make_gateway(gateway_toml(cancelling_mock.base_url).replace("idle_timeout = 2", "idle_timeout = 0.3"))
    path, payload = PATHS[dialect]
    r = await gw.post(path, headers={**AUTH[dialect], "x-mock-stall-after": "0"}, json={**payload, "stream": False})
    body = await r.json()
    assert 504 == r.status
    if dialect == "anthropic":
        assert "timeout_error" == body["error"]["type"]
    else:
        assert "upstream_timeout" == body["error"]["code"]


# ------------------------------------------------------------------ client disconnect


@pytest.fixture
async def prod_gateway(cancelling_mock) -> AsyncIterator[TestClient[Any, Any]]:
    """The gateway as a worker runs it: handler_cancellation=True."""
    app = create_app(parse(gateway_toml(cancelling_mock.base_url), source=str(CONFIG_DIR / "test.toml")))
    client: TestClient[Any, Any] = TestClient(TestServer(app, host="127.0.0.1", handler_cancellation=True))
    await client.start_server()
    yield client
    await client.close()


async def wait_for_stat(mock: MockUpstream, name: str, value: int, timeout: float = 30.0) -> dict[str, int]:
    async with asyncio.timeout(timeout):
        while True:
            stats = await mock.stats()
            if stats.get(name, 0) >= value:
                return stats
            await asyncio.sleep(0.02)


@pytest.mark.parametrize("dialect", ["anthropic", "openai"])
async def test_client_disconnect_mid_stream_cancels_upstream(prod_gateway, cancelling_mock, dialect):
    """A client that goes away mid-stream cancels the upstream request (it never completes)."""
    path, payload = PATHS[dialect]
    url = prod_gateway.make_url(path)
    headers = {**AUTH[dialect], "x-mock-chunks": "400", "x-mock-chunk-gap-ms": "50"}
    async with aiohttp.ClientSession() as s:
        r = await s.post(url, headers=headers, json=payload)
        assert 200 == r.status
        await r.content.readany()  # the stream has started
        r.close()  # the client goes away
    stats = await wait_for_stat(cancelling_mock, "streams_cancelled", 1)
    assert 0 == stats.get("streams_completed", 0)


async def test_client_disconnect_before_first_byte_cancels_upstream(prod_gateway, cancelling_mock):
    """A client that gives up while the upstream is still thinking cancels the upstream call too."""
    url = prod_gateway.make_url("/v1/messages")
    headers = {**AUTH["anthropic"], "x-mock-latency-ms": "20000"}
    async with aiohttp.ClientSession() as s:
        task = asyncio.ensure_future(s.post(url, headers=headers, json=MSG))
        await wait_for_stat(cancelling_mock, "requests", 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    # The gateway closed its upstream connection: the mock's handler was cancelled mid-wait.
    stats = await wait_for_stat(cancelling_mock, "requests_cancelled", 1)
    assert 1 == stats["requests"]


async def test_gateway_keeps_serving_after_disconnects(prod_gateway):
    """Disconnects leave no broken state: the next stream completes normally."""
    status, raw = await stream(prod_gateway, "anthropic")
    assert 200 == status
    assert b"event: message_stop" in raw


@pytest.mark.parametrize("dialect", ["anthropic", "openai"])
async def test_events_are_relayed_as_they_arrive_not_buffered(gateway, mock_upstream, dialect):
    """The client reads the first events while the upstream is still generating the rest."""
    path, payload = PATHS[dialect]
    r = await gateway.post(
        path, headers={**AUTH[dialect], "x-mock-chunks": "10", "x-mock-chunk-gap-ms": "50"}, json=payload
    )
    assert 200 == r.status
    first = await r.content.readany()
    assert first.startswith(b"event: message_start" if dialect == "anthropic" else b"data: {")
    assert 0 == (await mock_upstream.stats()).get("streams_completed", 0)
    rest = await r.read()
    assert (b"message_stop" if dialect == "anthropic" else b"[DONE]") in rest
