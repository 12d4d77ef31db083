"""A whole answer leaves in one write (server/response.py), and says what aiohttp's own Response would;
a stream's head leaves with its first events (``StreamHead``), and says what aiohttp's StreamResponse would.

Over real sockets: the gateway's relayed JSON answers on a kept-alive
connection, a client that asks to close, an HTTP/1.0 client; and a
differential property against aiohttp's ``web.Response`` served by the same
application: same status line, same headers (but ``Date``), same body, and
the same refusal of a header that would split the head.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import threading
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from gateway.server.hygiene import PrepareHook
from gateway.server.response import StreamHead, WholeResponse
from tests.conftest import TEST_KEY

CHAT = orjson.dumps({"model": "demo-gpt", "messages": [{"role": "user", "content": "hi"}]})


def _request(extra: str = "", version: str = "1.1") -> bytes:
    return (
        f"POST /v1/chat/completions HTTP/{version}\r\nHost: x\r\nAuthorization: Bearer {TEST_KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(CHAT)}\r\n{extra}\r\n"
    ).encode() + CHAT


async def _read_answer(reader: asyncio.StreamReader) -> tuple[str, list[tuple[str, str]], bytes]:
    head = (await reader.readuntil(b"\r\n\r\n")).decode("utf-8")
    status, *lines = head[:-4].split("\r\n")
    headers = [(name, value) for name, _, value in (line.partition(": ") for line in lines)]
    length = [int(v) for n, v in headers if n.lower() == "content-length"]
    assert len(length) == 1, headers
    return status, headers, await reader.readexactly(length[0])


def _names(headers: list[tuple[str, str]]) -> list[str]:
    return [n.lower() for n, _ in headers]


async def test_relayed_answers_on_one_kept_alive_connection(gateway: Any) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    try:
        ids = []
        for _ in range(3):
            writer.write(_request())
            status, headers, body = await _read_answer(reader)
            assert status == "HTTP/1.1 200 OK"
            names = _names(headers)
            for once in ("content-length", "date", "content-type", "x-request-id", "server-timing"):
                assert names.count(once) == 1, (once, headers)
            assert "server" not in names and "connection" not in names and "transfer-encoding" not in names
            assert orjson.loads(body)["object"] == "chat.completion"
            ids.append({n.lower(): v for n, v in headers}["x-request-id"])
        assert len(set(ids)) == 3
        # A client that asks to close gets Connection: close, and the server closes.
        writer.write(_request("Connection: close\r\n"))
        status, headers, body = await _read_answer(reader)
        assert status == "HTTP/1.1 200 OK"
        assert ("Connection", "close") in headers
        assert await asyncio.wait_for(reader.read(), 30) == b""
    finally:
        writer.close()


async def test_an_http_1_0_client_gets_aiohttp_s_own_answer(gateway: Any) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    try:
        writer.write(_request(version="1.0"))
        status, headers, body = await _read_answer(reader)
        assert status == "HTTP/1.0 200 OK"
        assert "server" not in _names(headers)  # the application's hook ran on aiohttp's path too
        assert orjson.loads(body)["object"] == "chat.completion"
        assert await asyncio.wait_for(reader.read(), 30) == b""  # HTTP/1.0 without keep-alive: closed
    finally:
        writer.close()


# ---------------------------------------------------------------- differential: WholeResponse vs web.Response

_CASES: dict[str, tuple[int, list[tuple[str, str]], bytes]] = {}
_IDS = itertools.count()


async def _serve(request: web.Request) -> web.StreamResponse:
    status, headers, body = _CASES.pop(request.match_info["id"])
    kind = request.match_info["kind"]
    if kind == "whole":
        return WholeResponse(status, body, CIMultiDict(headers))
    if kind == "stock":
        return web.Response(status=status, body=body, headers=CIMultiDict(headers))
    # A stream: the body in pieces of up to 700 bytes (an empty first piece when the body is empty).
    pieces = [body[i : i + 700] for i in range(0, len(body), 700)] or [b""]
    if kind == "streamhead":
        head = StreamHead(status, CIMultiDict(headers))
        await head.prepare(request)
        assert head.begin(pieces[0])  # the lean path: HTTP/1.1, the application's one hook
        for piece in pieces[1:-1]:
            await head.write(piece)
        await head.finish(pieces[-1] if len(pieces) > 1 else b"")  # the last piece and the end, one write
        return head
    stream = web.StreamResponse(status=status, headers=CIMultiDict(headers))
    await stream.prepare(request)
    await stream.write(pieces[0])
    for piece in pieces[1:]:
        await stream.write(piece)
    await stream.write_eof()
    return stream


@pytest.fixture(scope="module")
def differential_server() -> Iterator[int]:
    """An aiohttp app with the gateway's prepare hook, serving both kinds of answer, in its own thread."""
    loop = asyncio.new_event_loop()
    app = web.Application()
    app.on_response_prepare.append(PrepareHook([False]))
    app.router.add_get("/{kind}/{id}", _serve)
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    site = web.SockSite(runner, sock)
    loop.run_until_complete(site.start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield sock.getsockname()[1]
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        loop.close()


def _fetch(port: int, kind: str, case: tuple[int, list[tuple[str, str]], bytes]) -> bytes:
    """The raw answer (head and body), or b"" when the server closed without one."""
    case_id = str(next(_IDS))
    _CASES[case_id] = case
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(f"GET /{kind}/{case_id} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    _CASES.pop(case_id, None)
    return b"".join(chunks)


def _parsed(raw: bytes) -> tuple[bytes, list[tuple[bytes, bytes]], bytes] | None:
    if not raw:
        return None
    head, _, body = raw.partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    fields = sorted(
        (name.lower(), value) for name, _, value in (line.partition(b": ") for line in lines)
        if name.lower() != b"date"
    )
    return status, fields, body


_TOKEN = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_", min_size=1, max_size=20)
_NAME = _TOKEN.filter(lambda n: n.lower() not in {"content-length", "transfer-encoding", "date", "connection", "server"})
_VALUE = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF, blacklist_characters="\x7f"), max_size=40)
_BAD_VALUE = st.builds(lambda a, brk, b: a + brk + b, _VALUE, st.sampled_from(["\r\n", "\n", "\r", "\r\nX-Injected: 1"]), _VALUE)
_STATUS = st.integers(200, 599).filter(lambda s: s not in (204, 304))
# An answer to serve both ways: status, headers, body, and maybe a header that would split the head.
_ANSWERS = settings(max_examples=150, deadline=None)(given(
    status=_STATUS,
    headers=st.lists(st.tuples(_NAME, _VALUE), max_size=8),
    body=st.binary(max_size=3000),
    bad=st.one_of(st.none(), st.tuples(_NAME, _BAD_VALUE)),
))


@_ANSWERS
def test_whole_response_says_what_aiohttp_would(
    differential_server: int, status: int, headers: list[tuple[str, str]], body: bytes,
    bad: tuple[str, str] | None,
) -> None:
    if bad is not None:
        headers = [*headers, bad]
    case = (status, headers, body)
    stock = _parsed(_fetch(differential_server, "stock", case))
    whole = _parsed(_fetch(differential_server, "whole", case))
    assert whole == stock
    assert (whole is None) == (bad is not None)  # a header that would split the head: no answer at all


@_ANSWERS
def test_stream_head_says_what_aiohttp_would(
    differential_server: int, status: int, headers: list[tuple[str, str]], body: bytes,
    bad: tuple[str, str] | None,
) -> None:
    """Same status line, headers (but Date) and chunked body bytes as aiohttp's StreamResponse, and
    the same refusal of a header that would split the head: aiohttp's own 500 instead (its framing is
    aiohttp's: chunked after its failed prepare, not after ours), never the header."""
    if bad is not None:
        headers = [*headers, bad]
    case = (status, headers, body)
    stock = _parsed(_fetch(differential_server, "stream", case))
    lean = _parsed(_fetch(differential_server, "streamhead", case))
    assert lean is not None and stock is not None
    if bad is None:
        assert lean == stock
        assert (b"transfer-encoding", b"chunked") in lean[1]
    else:
        for answer in (lean, stock):
            assert answer[0] == b"HTTP/1.1 500 Internal Server Error"
            assert b"x-injected" not in [name for name, _ in answer[1]]


def _dechunk(raw: bytes) -> bytes:
    out, pos = [], 0
    while True:
        end = raw.index(b"\r\n", pos)
        size = int(raw[pos:end], 16)
        if size == 0:
            assert raw[end:] == b"\r\n\r\n"
            return b"".join(out)
        out.append(raw[end + 2 : end + 2 + size])
        assert raw[end + 2 + size : end + 4 + size] == b"\r\n"
        pos = end + 4 + size


async def _read_stream(reader: asyncio.StreamReader) -> tuple[str, list[tuple[str, str]], bytes]:
    head = (await reader.readuntil(b"\r\n\r\n")).decode("utf-8")
    status, *lines = head[:-4].split("\r\n")
    headers = [(name, value) for name, _, value in (line.partition(": ") for line in lines)]
    raw = b""
    while not raw.endswith(b"\r\n0\r\n\r\n"):
        raw += await reader.read(65536)
    return status, headers, _dechunk(raw)


async def test_relayed_streams_on_one_kept_alive_connection(gateway: Any) -> None:
    """Streams through the lean head: one framing header each, the stream whole, the connection reused."""
    doc = orjson.dumps({"model": "demo-gpt", "stream": True, "messages": [{"role": "user", "content": "hi"}]})
    request = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TEST_KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(doc)}\r\n\r\n"
    ).encode() + doc
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    try:
        ids = []
        for _ in range(3):
            writer.write(request)
            status, headers, body = await asyncio.wait_for(_read_stream(reader), 30)
            assert status == "HTTP/1.1 200 OK"
            names = _names(headers)
            for once in ("transfer-encoding", "date", "content-type", "x-request-id", "server-timing"):
                assert names.count(once) == 1, (once, headers)
            assert "server" not in names and "connection" not in names and "content-length" not in names
            assert {n.lower(): v for n, v in headers}["content-type"].startswith("text/event-stream")
            assert body.endswith(b"data: [DONE]\n\n") and body.count(b"data: {") >= 2
            ids.append({n.lower(): v for n, v in headers}["x-request-id"])
        assert len(set(ids)) == 3
    finally:
        writer.close()


async def test_an_http_1_0_client_gets_its_stream_through_aiohttp(gateway: Any) -> None:
    """No chunked framing for HTTP/1.0: aiohttp's own path, the body until the server closes."""
    doc = orjson.dumps({"model": "demo-gpt", "stream": True, "messages": [{"role": "user", "content": "hi"}]})
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    try:
        writer.write((
            f"POST /v1/chat/completions HTTP/1.0\r\nHost: x\r\nAuthorization: Bearer {TEST_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(doc)}\r\n\r\n"
        ).encode() + doc)
        raw = await asyncio.wait_for(reader.read(-1), 30)  # until the server closes
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200 OK\r\n")
    names = [line.partition(b":")[0].lower() for line in head.split(b"\r\n")[1:]]
    assert b"transfer-encoding" not in names and b"server" not in names
    assert body.startswith(b"data: {") and body.endswith(b"data: [DONE]\n\n")
