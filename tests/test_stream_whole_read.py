"""A stream that reaches the gateway whole, in one read (a short answer, or an upstream that sends
it at once): nothing is waited for, the client gets the head, the events and the end of the body
together (proxy/streaming.py ``_push``, server/response.py ``StreamHead.finish``), and a stream
that arrives whole but cut still ends with the dialect's error event after the events it holds.

The upstream is a raw socket server that writes each answer, head and body, in one write.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import orjson
import pytest

from tests.conftest import TEST_KEY, GatewayFactory, gateway_toml

OAI = {"authorization": f"Bearer {TEST_KEY}"}
ANTH = {"x-api-key": TEST_KEY, "anthropic-version": "2023-06-01"}
CHAT = {"model": "demo-gpt", "messages": [{"role": "user", "content": "hi"}], "stream": True}
MSG = {"model": "demo-claude", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}], "stream": True}


def _openai(n: int, *, finish: bool, done: bool) -> bytes:
    chunks = [{"id": "c1", "object": "chat.completion.chunk", "model": "demo-gpt",
               "choices": [{"index": 0, "delta": {"content": f"w{i} "}, "finish_reason": None}]} for i in range(n)]
    if finish:
        chunks.append({"id": "c1", "object": "chat.completion.chunk", "model": "demo-gpt",
                       "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        chunks.append({"id": "c1", "object": "chat.completion.chunk", "model": "demo-gpt", "choices": [],
                       "usage": {"prompt_tokens": 4, "completion_tokens": n, "total_tokens": 4 + n}})
    body = b"".join(b"data: " + orjson.dumps(c) + b"\n\n" for c in chunks)
    return body + (b"data: [DONE]\n\n" if done else b"")


def _anthropic(n: int, *, stop: bool) -> bytes:
    events = [("message_start", {"type": "message_start", "message": {"id": "m1", "usage": {"input_tokens": 4}}}),
              ("content_block_start", {"type": "content_block_start", "index": 0})]
    events += [("content_block_delta", {"type": "content_block_delta", "index": 0,
                                        "delta": {"type": "text_delta", "text": f"w{i} "}}) for i in range(n)]
    if stop:
        events += [("content_block_stop", {"type": "content_block_stop", "index": 0}),
                   ("message_delta", {"type": "message_delta", "usage": {"output_tokens": n}}),
                   ("message_stop", {"type": "message_stop"})]
    return b"".join(b"event: " + e.encode() + b"\ndata: " + orjson.dumps(d) + b"\n\n" for e, d in events)


class WholeUpstream:
    """Answers each request with the next body of its script: head and body in one write."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.server: asyncio.Server | None = None
        self.url = ""
        self.connections = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                await reader.readexactly(length)
                body = self.bodies.pop(0)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: %d\r\n\r\n%b"
                             % (len(body), body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def whole_upstream() -> AsyncIterator[WholeUpstream]:
    up = WholeUpstream()
    await up.start()
    yield up
    assert up.server is not None
    up.server.close()
    await up.server.wait_closed()


async def test_openai_streams_in_one_read(make_gateway: GatewayFactory, whole_upstream: WholeUpstream) -> None:
    """Whole: the events as sent, the usage chunk the client did not ask for dropped, [DONE] last; the
    same connections serve the next answers.  Cut (no finish, no [DONE]): the events, then the error."""
    gw = await make_gateway(gateway_toml(whole_upstream.url))
    whole = _openai(6, finish=True, done=True)
    usage_chunk = whole.split(b"\n\n")[-3] + b"\n\n"
    for _ in range(3):
        whole_upstream.bodies.append(whole)
        r = await gw.post("/v1/chat/completions", json=CHAT, headers=OAI)
        assert r.status == 200
        assert await r.read() == whole.replace(usage_chunk, b"")
    cut = _openai(3, finish=False, done=False)
    whole_upstream.bodies.append(cut)
    r = await gw.post("/v1/chat/completions", json=CHAT, headers=OAI)
    raw = await r.read()
    assert r.status == 200
    assert raw.startswith(cut)
    error = orjson.loads(raw[len(cut):].removeprefix(b"data: ").strip())
    assert "incomplete" in error["error"]["message"]
    assert whole_upstream.connections == 1  # kept alive throughout (a cut stream's body was whole)


async def test_anthropic_streams_in_one_read(make_gateway: GatewayFactory, whole_upstream: WholeUpstream) -> None:
    gw = await make_gateway(gateway_toml(whole_upstream.url))
    whole = _anthropic(5, stop=True)
    whole_upstream.bodies.append(whole)
    r = await gw.post("/v1/messages", json=MSG, headers=ANTH)
    assert r.status == 200
    assert await r.read() == whole
    cut = _anthropic(2, stop=False)
    whole_upstream.bodies.append(cut)
    r = await gw.post("/v1/messages", json=MSG, headers=ANTH)
    raw = await r.read()
    assert raw.startswith(cut)
    assert raw[len(cut):].startswith(b"event: error\ndata: ")
