"""Push-mode relay: flow control and a vanishing client, end to end over real sockets.

Streams are relayed by the upstream client's read callback straight to the
client's transport.  These tests pin what that must keep from a read loop:
a client that reads slower than the upstream writes holds the upstream back
(the gateway does not swallow the stream into memory), still gets every byte
in order, and its slowness is not taken for an upstream stall; a client that
goes away mid-stream (no handler cancellation: the relay notices at its next
write) frees the upstream connection.
"""

from __future__ import annotations

import asyncio
import socket
import textwrap
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.conftest import TEST_KEY, gateway_toml

EVENTS = 768
TEXT = 64 * 1024  # bytes of text per delta event: ~48 MiB in all, more than the sockets between can hold


def sse(event: str, doc: dict[str, Any]) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(doc) + b"\n\n"


def delta_text(i: int) -> str:
    return f"{i:06d}" + "x" * (TEXT - 6)


class BigUpstream:
    """An Anthropic-shaped upstream streaming EVENTS large deltas; counts what it managed to write."""

    def __init__(self) -> None:
        self.written = 0
        self.done = False
        self.cut = False

    async def messages(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        sock = request.transport.get_extra_info("socket") if request.transport else None
        if sock is not None:  # small kernel buffers: what is held back shows here, not in the kernel
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        start = {"type": "message_start", "message": {"id": "msg_big", "type": "message", "role": "assistant",
                                                      "model": "big", "content": [],
                                                      "usage": {"input_tokens": 7, "output_tokens": 1}}}
        try:
            await resp.write(sse("message_start", start) + sse(
                "content_block_start", {"type": "content_block_start", "index": 0,
                                        "content_block": {"type": "text", "text": ""}}))
            for i in range(EVENTS):
                data = sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                   "delta": {"type": "text_delta", "text": delta_text(i)}})
                await resp.write(data)
                self.written += len(data)
            await resp.write(
                sse("content_block_stop", {"type": "content_block_stop", "index": 0})
                + sse("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                                        "usage": {"output_tokens": EVENTS}})
                + sse("message_stop", {"type": "message_stop"})
            )
            await resp.write_eof()
        except ConnectionError:  # the gateway closed the connection
            self.cut = True
            return resp
        self.done = True
        return resp


@pytest.fixture
async def big_upstream() -> AsyncIterator[tuple[BigUpstream, str]]:
    up = BigUpstream()
    app = web.Application()
    app.router.add_post("/v1/messages", up.messages)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield up, f"http://127.0.0.1:{server.port}"
    await server.close()


def big_toml(base_url: str) -> str:
    # The real mock is not needed: the big upstream is its own route, with a short idle bound
    # so that a slow client held longer than it shows that backpressure is not a stall.
    return gateway_toml("http://127.0.0.1:9", extra=textwrap.dedent(f"""
        [upstreams.big]
        provider = "anthropic"
        base_url = "{base_url}"
        api_key_env = "TEST_ANTHROPIC_KEY"
        first_byte_timeout = 5
        idle_timeout = 0.5

        [[routes]]
        match = "big-*"
        deployments = [{{ upstream = "big" }}]
        """))


async def open_stream(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """POST a streamed request on a raw socket with a small receive buffer; return once it is sent."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=64 * 1024)
    body = orjson.dumps({"model": "big-model", "max_tokens": 10, "stream": True,
                         "messages": [{"role": "user", "content": "hi"}]})
    writer.write(
        b"POST /v1/messages HTTP/1.1\r\nHost: gw\r\nx-api-key: " + TEST_KEY.encode()
        + b"\r\nanthropic-version: 2023-06-01\r\ncontent-type: application/json\r\ncontent-length: "
        + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    return reader, writer


async def read_chunked(reader: asyncio.StreamReader) -> bytes:
    parts = []
    while True:
        size = int((await reader.readuntil(b"\r\n"))[:-2], 16)
        if size == 0:
            await reader.readuntil(b"\r\n")
            return b"".join(parts)
        parts.append(await reader.readexactly(size))
        await reader.readexactly(2)


async def until_still(up: BigUpstream, quiet: float, timeout: float = 60.0) -> None:
    """Until the upstream has written nothing more for ``quiet`` seconds (it is held back)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    seen, since = -1, loop.time()
    while True:
        now = loop.time()
        if up.written != seen:
            seen, since = up.written, now
        elif now - since >= quiet:
            return
        assert now < deadline, "the upstream never stopped writing"
        await asyncio.sleep(0.05)


async def test_slow_client_holds_the_upstream_back_and_still_gets_every_byte_in_order(make_gateway, big_upstream):
    """A client that stops reading: the upstream is paused (not buffered by the gateway), longer than
    idle_timeout without being called stalled; then it reads on and gets every event, in order."""
    up, base_url = big_upstream
    gw = await make_gateway(big_toml(base_url))
    reader, writer = await open_stream(gw.port)
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        assert b"transfer-encoding: chunked" in head.lower()
        await until_still(up, quiet=1.0)  # twice the idle bound: a paused upstream is not a stall
        total = EVENTS * len(sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                          "delta": {"type": "text_delta", "text": delta_text(0)}}))
        # Held back by the gateway's flow control: at most what the sockets between and one
        # upstream read hold, far from the whole stream.
        assert up.written < total // 2
        assert not up.done
        raw = await asyncio.wait_for(read_chunked(reader), 60)
    finally:
        writer.transport.abort()
    texts = []
    for line in raw.split(b"\n"):
        if line.startswith(b"data:"):
            doc = orjson.loads(line[5:])
            if doc["type"] == "content_block_delta":
                texts.append(doc["delta"]["text"])
    assert [delta_text(i) for i in range(EVENTS)] == texts
    assert raw.endswith(b"event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n")
    assert up.done


async def test_client_gone_mid_stream_frees_the_upstream_without_handler_cancellation(make_gateway, big_upstream):
    """No handler cancellation (the in-process server's default): the relay notices the closed
    client at its next write and closes the upstream connection.  (With cancellation, as in
    production, test_proxy_disconnect pins the one 499 line with the usage up to the cut.)"""
    up, base_url = big_upstream
    gw = await make_gateway(big_toml(base_url))
    reader, writer = await open_stream(gw.port)
    await reader.readuntil(b"\r\n\r\n")
    await reader.readexactly(1024)  # the stream has started
    writer.transport.abort()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while not up.cut:
        assert loop.time() < deadline, "the upstream connection was not closed"
        await asyncio.sleep(0.02)
    assert not up.done


# ------------------------------------------------------------------ awkward reads, relayed byte for byte

ANTHROPIC_SSE = (
    sse("message_start", {"type": "message_start", "message": {"id": "m", "type": "message", "role": "assistant",
                                                             "model": "x", "content": [],
                                                             "usage": {"input_tokens": 3, "output_tokens": 1}}})
    + b"event: content_block_start\r\ndata: {\"type\":\"content_block_start\",\"index\":0}\r\n\r\n"
    + b"".join(sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                            "delta": {"type": "text_delta", "text": t}}) for t in ("Hé", "llo", "!"))
    + sse("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 4}})
    + sse("message_stop", {"type": "message_stop"})
)
_CHUNK = {"id": "c", "object": "chat.completion.chunk", "model": "x"}
OPENAI_EVENTS = [
    b"data: " + orjson.dumps({**_CHUNK, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}],
                              "usage": None}) + b"\n\n",
    *(b"data: " + orjson.dumps({**_CHUNK, "choices": [{"index": 0, "delta": {"content": t}}], "usage": None}) + b"\r\n\r\n"
      for t in ("Hé", "llo")),
    b"data: " + orjson.dumps({**_CHUNK, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                              "usage": None}) + b"\n\n",
    b"data: " + orjson.dumps({**_CHUNK, "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4,
                                                                  "total_tokens": 7}}) + b"\n\n",
    b"data: [DONE]\n\n",
]
OPENAI_SSE = b"".join(OPENAI_EVENTS)


def pieces_of(data: bytes, how: str) -> list[bytes]:
    """The stream cut into the reads an upstream may send: small pieces, cuts at and around line ends."""
    if how == "sevens":
        return [data[i : i + 7] for i in range(0, len(data), 7)]
    cuts = sorted({i + d for i, b in enumerate(data) if b in b"\r\n" for d in (0, 1)} - {0, len(data)})
    cuts = cuts[: 120]  # the first events, byte by byte around their line ends; the rest in one piece
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


class DribbleUpstream:
    """A raw upstream: an SSE answer in chunked frames, one per piece, each its own read (a pause between);
    ``cut``: the connection is closed after the last piece instead of ending the body."""

    def __init__(self, pieces: list[bytes], cut: bool = False) -> None:
        self.pieces = pieces
        self.cut = cut

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))
            await reader.readexactly(length)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
            for piece in self.pieces:
                writer.write(b"%x\r\n%b\r\n" % (len(piece), piece))
                await writer.drain()
                await asyncio.sleep(0.003)
            if not self.cut:
                writer.write(b"0\r\n\r\n")
                await writer.drain()
                await asyncio.sleep(0.2)
        finally:
            writer.close()


async def dribbling_gateway(make_gateway: Any, up: DribbleUpstream, provider: str) -> Any:
    server = await asyncio.start_server(up.serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = await make_gateway(gateway_toml("http://127.0.0.1:9", extra=textwrap.dedent(f"""
        [upstreams.dribble]
        provider = "{provider}"
        base_url = "http://127.0.0.1:{port}"
        api_key_env = "TEST_ANTHROPIC_KEY"
        first_byte_timeout = 5
        idle_timeout = 5

        [[routes]]
        match = "dribble-*"
        deployments = [{{ upstream = "dribble" }}]
        """)))
    client.dribble_server = server
    return client


@pytest.mark.parametrize("how", ["sevens", "line-ends"])
@pytest.mark.parametrize("case", ["anthropic", "openai-usage-asked", "openai-usage-stripped"])
async def test_any_reads_are_relayed_byte_for_byte(make_gateway, how, case):
    """However the upstream's bytes are cut into reads (a line end alone, CR and LF apart, 7-byte pieces),
    the client gets the stream byte for byte (minus the usage chunk it did not ask for)."""
    provider = "anthropic" if case == "anthropic" else "openai"
    data = ANTHROPIC_SSE if provider == "anthropic" else OPENAI_SSE
    client = await dribbling_gateway(make_gateway, DribbleUpstream(pieces_of(data, how)), provider)
    try:
        if provider == "anthropic":
            r = await client.post("/v1/messages", headers={"x-api-key": TEST_KEY, "anthropic-version": "2023-06-01"},
                                  json={"model": "dribble-a", "max_tokens": 10, "stream": True,
                                        "messages": [{"role": "user", "content": "hi"}]})
            expected = data
        else:
            body: dict[str, Any] = {"model": "dribble-o", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
            if case == "openai-usage-asked":
                body["stream_options"] = {"include_usage": True}
                expected = data
            else:
                expected = b"".join(e for e in OPENAI_EVENTS if b'"choices":[]' not in e)
            r = await client.post("/v1/chat/completions", headers={"authorization": f"Bearer {TEST_KEY}"}, json=body)
        assert 200 == r.status
        assert expected == await r.read()
    finally:
        client.dribble_server.close()


@pytest.mark.parametrize("provider", ["anthropic", "openai"])
async def test_a_stream_cut_mid_line_after_awkward_reads_ends_with_whole_lines_and_an_error_event(
    make_gateway, provider
):
    """Cut after half a line that came in several reads: the client gets the whole lines before it,
    then the dialect's error event, never the half line."""
    data = ANTHROPIC_SSE if provider == "anthropic" else OPENAI_SSE
    stop = data.index(b"llo") + 2  # inside the second delta's data line
    pieces = pieces_of(data[: stop - 9], "line-ends") + [data[stop - 9 : stop - 4], data[stop - 4 : stop]]
    assert data[:stop] == b"".join(pieces)
    client = await dribbling_gateway(make_gateway, DribbleUpstream(pieces, cut=True), provider)
    try:
        if provider == "anthropic":
            r = await client.post("/v1/messages", headers={"x-api-key": TEST_KEY, "anthropic-version": "2023-06-01"},
                                  json={"model": "dribble-a", "max_tokens": 10, "stream": True,
                                        "messages": [{"role": "user", "content": "hi"}]})
        else:
            r = await client.post("/v1/chat/completions", headers={"authorization": f"Bearer {TEST_KEY}"},
                                  json={"model": "dribble-o", "stream": True,
                                        "messages": [{"role": "user", "content": "hi"}]})
        assert 200 == r.status
        raw = await r.read()
        whole = data[: data.rindex(b"\n", 0, stop) + 1]
        assert raw.startswith(whole)
        error = raw[len(whole) :]
        assert b"llo" not in error
        assert b"incomplete" in error
        assert error.endswith(b"\n\n")
    finally:
        client.dribble_server.close()
