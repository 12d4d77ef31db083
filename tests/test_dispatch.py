"""The data plane's exact paths skip aiohttp's routing (server/dispatch.py); nothing else changes.

Each request here goes through the real server (GatewayRunner, the worker's
own), to the mock upstream and back.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
from aiohttp.web_urldispatcher import UrlDispatcher

from tests.conftest import TEST_KEY

CHAT = {"model": "demo-gpt", "messages": [{"role": "user", "content": "hi"}]}
AUTH = {"authorization": f"Bearer {TEST_KEY}"}


@pytest.fixture
def resolves(monkeypatch: pytest.MonkeyPatch, gateway: Any) -> list[str]:
    """The paths the gateway's aiohttp router resolved (the mock upstream's router is not counted)."""
    seen: list[str] = []
    original = UrlDispatcher.resolve
    router = gateway.server.app.router

    async def counting(self: UrlDispatcher, request: Any) -> Any:
        if self is router:
            seen.append(request.path)
        return await original(self, request)

    monkeypatch.setattr(UrlDispatcher, "resolve", counting)
    return seen


async def test_exact_path_is_dispatched_directly_and_answers_like_the_routed_one(gateway, mock_upstream, resolves):
    answers = {}
    for target in ("/v1/chat/completions", "/v1/chat/completions?trace=1", f"/ak/{TEST_KEY}/v1/chat/completions"):
        headers = {} if target.startswith("/ak/") else AUTH
        r = await gateway.post(target, json=CHAT, headers=headers)
        body = await r.json()
        assert r.status == 200, body
        assert "Server" not in r.headers  # the app's on_response_prepare hook ran
        assert r.headers["x-request-id"].startswith("req_")
        assert r.headers["server-timing"].startswith("gateway;dur=")
        assert r.headers["x-gateway-upstream"] == "mock-openai"
        answers[target] = (body["object"], body["usage"]["prompt_tokens"])
    assert len(set(answers.values())) == 1
    # Only the query-string and /ak/ requests went through aiohttp's router.
    assert resolves == ["/v1/chat/completions", f"/ak/{TEST_KEY}/v1/chat/completions"]
    seen = [s["path"] for s in (await mock_upstream.requests())[-3:]]
    assert seen == ["/v1/chat/completions", "/v1/chat/completions?trace=1", "/v1/chat/completions"]


async def test_errors_on_a_dispatched_path_keep_their_dialect(gateway, resolves):
    r = await gateway.post("/v1/messages", json={"model": "demo-claude"}, headers={"x-api-key": "gwk_nope"})
    assert r.status == 401
    body = await r.json()
    assert body["type"] == "error" and body["error"]["type"] == "authentication_error"
    r = await gateway.post("/v1/chat/completions", data=b"{not json", headers=AUTH)
    assert r.status == 400
    assert (await r.json())["error"]["type"] == "invalid_request_error"
    assert resolves == []
    # A wrong method on a data-plane path is aiohttp's to refuse: 405 in the path's dialect.
    r = await gateway.get("/v1/chat/completions", headers=AUTH)
    assert r.status == 405
    assert r.headers["Allow"] == "POST"
    assert (await r.json())["error"]["type"] == "invalid_request_error"
    assert resolves == ["/v1/chat/completions"]


async def test_expect_100_continue_is_honoured(gateway, resolves):
    """A client that waits for ``100 Continue`` before its body gets it (aiohttp's expect handler)."""
    body = orjson.dumps(CHAT)
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    try:
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + TEST_KEY.encode() + b"\r\nExpect: 100-continue\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n"
        )
        await writer.drain()
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
        assert interim.startswith(b"HTTP/1.1 100 Continue")
        writer.write(body)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
        assert head.startswith(b"HTTP/1.1 200 ")
    finally:
        writer.close()
    assert resolves == ["/v1/chat/completions"]


@pytest.mark.parametrize("padding", [0, 3_000, 600_000])
async def test_a_request_body_reaches_the_upstream_whole_however_it_arrives(gateway, mock_upstream, padding):
    """One piece with the head, one piece after it, or many pieces with reading paused (a body over
    the reader's high-water mark): the upstream gets the same bytes each time."""
    doc = {**CHAT, "metadata": {"pad": "x" * padding}}
    body = orjson.dumps(doc)
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TEST_KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    try:
        if padding == 0:
            writer.write(head + body)
        else:
            writer.write(head)
            await writer.drain()
            for i in range(0, len(body), 1000 if padding > 3_000 else len(body)):
                writer.write(body[i : i + 1000 if padding > 3_000 else len(body)])
                await writer.drain()
        status = await reader.readuntil(b"\r\n")
        assert status == b"HTTP/1.1 200 OK\r\n"
    finally:
        writer.close()
    seen = (await mock_upstream.requests())[-1]
    assert seen["body"] == doc
