"""The lean upstream client (gateway/upstream/client.py) against aiohttp's, and against broken servers.

Differential: the same requests to the same real mock upstream through both
clients give byte-identical bodies and the same status and headers (Date aside).
Faults: a raw TCP server answers truncated, oversized, malformed and slow
responses; the lean client raises the error classes the failure classifier
knows (aiohttp.ClientError family, TimeoutError) and never hangs.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from yarl import URL

from gateway.upstream import client
from gateway.upstream.client import LeanSession

BODIES = {
    "/v1/messages": {"model": "demo-claude", "max_tokens": 32, "messages": [{"role": "user", "content": "hi"}]},
    "/v1/chat/completions": {"model": "demo-gpt", "messages": [{"role": "user", "content": "hi"}]},
}
CASES = [
    ("/v1/messages", False, {}),
    ("/v1/messages", True, {}),
    ("/v1/chat/completions", False, {}),
    ("/v1/chat/completions", True, {"x-mock-chunks": "40"}),
    ("/v1/messages", False, {"x-mock-status": "429"}),
    ("/v1/chat/completions", False, {"x-mock-status": "500"}),
    ("/v1/messages", True, {"x-mock-chunk-gap-ms": "2", "x-mock-chunks": "8"}),
    ("/v1/chat/completions", False, {"x-mock-gzip": "1"}),
]
SKIP_HEADERS = {"date"}


def _headers(extra: dict[str, str]) -> dict[str, str]:
    return {"content-type": "application/json", "x-api-key": "sk-test", "anthropic-version": "2023-06-01",
            "accept-encoding": "identity", **extra}


async def _via_aiohttp(base: str, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession(auto_decompress=False) as s, s.post(base + path, data=body, headers=headers) as r:
        data = await r.read()
        return r.status, {k.lower(): v for k, v in r.headers.items() if k.lower() not in SKIP_HEADERS}, data


async def _via_lean(session: LeanSession, base: str, path: str, body: bytes,
                    headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    r = await session.request("POST", URL(base + path), data=body, headers=headers,
                              timeout=aiohttp.ClientTimeout(total=30, sock_connect=5))
    chunks = []
    while True:
        chunk = await r.content.readany()
        if not chunk:
            break
        chunks.append(chunk)
    r.release()
    return r.status, {k.lower(): v for k, v in r.headers.items() if k.lower() not in SKIP_HEADERS}, b"".join(chunks)


def _normalise(body: bytes) -> bytes:
    """The mock stamps ids and times per answer: compare the shape, not those values."""
    out = []
    for line in body.split(b"\n"):
        if line.startswith(b"data: {"):
            doc = json.loads(line[6:])
            out.append(b"data: " + json.dumps(_strip(doc), sort_keys=True).encode())
        else:
            out.append(line)
    if body.startswith(b"{"):
        return json.dumps(_strip(json.loads(body)), sort_keys=True).encode()
    return b"\n".join(out)


def _strip(doc: Any) -> Any:
    if isinstance(doc, dict):
        return {k: ("<id>" if k in ("id", "created") else _strip(v)) for k, v in doc.items()}
    if isinstance(doc, list):
        return [_strip(v) for v in doc]
    return doc


@pytest.mark.parametrize(("path", "stream", "extra"), CASES)
async def test_lean_client_answers_what_aiohttp_answers_from_the_same_mock(
    mock_upstream: Any, path: str, stream: bool, extra: dict[str, str]
) -> None:
    """Status, headers (Date aside) and body bytes match aiohttp's client, JSON and SSE, errors, gzip."""
    body = json.dumps({**BODIES[path], "stream": stream}).encode()
    headers = _headers(extra)
    expected = await _via_aiohttp(mock_upstream.base_url, path, body, headers)
    session = LeanSession()
    try:
        got = await _via_lean(session, mock_upstream.base_url, path, body, headers)
    finally:
        await session.close()
    assert expected[0] == got[0]
    assert set(expected[1]) == set(got[1])
    assert {k: v for k, v in expected[1].items() if k not in ("content-length", "request-id", "x-request-id")} == {
        k: v for k, v in got[1].items() if k not in ("content-length", "request-id", "x-request-id")}
    if "x-mock-gzip" in extra:
        assert expected[2][:2] == got[2][:2] == b"\x1f\x8b"  # relayed as sent, never decoded
    else:
        assert _normalise(expected[2]) == _normalise(got[2])


async def test_lean_client_reuses_one_keep_alive_connection(mock_upstream: Any) -> None:
    """Keep-alive: 20 sequential calls to the same upstream use one connection."""
    body = json.dumps(BODIES["/v1/messages"]).encode()
    session = LeanSession()
    try:
        for _ in range(20):
            status, _, _ = await _via_lean(session, mock_upstream.base_url, "/v1/messages", body, _headers({}))
            assert 200 == status
        pool = next(iter(session._pools.values()))
        assert 1 == len(pool._live)
        assert 20 == len(await mock_upstream.requests())
    finally:
        await session.close()


# ---------------------------------------------------------------- faults


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture
async def raw_server() -> AsyncIterator[Callable[[Handler], Awaitable[str]]]:
    servers: list[asyncio.Server] = []

    async def start(handler: Handler) -> str:
        async def wrapped(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await reader.readuntil(b"\r\n\r\n")
                await handler(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        srv = await asyncio.start_server(wrapped, "127.0.0.1", 0)
        servers.append(srv)
        return f"http://127.0.0.1:{srv.sockets[0].getsockname()[1]}"

    yield start
    for srv in servers:
        srv.close()


def _answer(raw: bytes, *, hold: bool = False) -> Handler:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(raw)
        await writer.drain()
        if hold:
            await asyncio.sleep(60)

    return handler


async def _call(base: str, total: float = 5.0) -> tuple[int, bytes]:
    session = LeanSession()
    try:
        r = await session.request("POST", URL(base + "/v1/messages"), data=b"{}", headers={},
                                  timeout=aiohttp.ClientTimeout(total=total, sock_connect=2))
        return r.status, await r.read()
    finally:
        await session.close()


@pytest.mark.parametrize(
    ("raw", "hold"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort", False),  # truncated body, then close
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n", False),  # chunked, cut
        (b"HTTP/1.1 200 OK\r\nContent-Le", False),  # cut inside the headers
        (b"", False),  # closed before a byte
        (b"NOT HTTP AT ALL\r\n\r\n", False),  # garbage status line
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n", False),  # bad chunk size
        (b"HTTP/1.1 200 OK\r\n" + b"X-Big: " + b"a" * 70_000 + b"\r\n\r\n", False),  # oversized headers
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", True),  # stalls mid-body: total timeout
        (b"", True),  # never answers: total timeout
    ],
)
async def test_broken_answers_raise_classified_errors_and_never_hang(
    raw_server: Callable[[Handler], Awaitable[str]], raw: bytes, hold: bool
) -> None:
    """Every broken answer ends, within the total timeout, in an aiohttp.ClientError or a TimeoutError."""
    base = await raw_server(_answer(raw, hold=hold))
    with pytest.raises((aiohttp.ClientError, TimeoutError)):
        await asyncio.wait_for(_call(base, total=1.0), timeout=30)


async def test_read_until_close_and_chunked_bodies_are_read_whole(
    raw_server: Callable[[Handler], Awaitable[str]],
) -> None:
    """A body without length ends at close; a chunked one is de-chunked."""
    base = await raw_server(_answer(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil close"))
    assert (200, b"until close") == await _call(base)
    base = await raw_server(_answer(b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n"
                                    b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"))
    assert (201, b"hello world") == await _call(base)


# Heads whose names change from one answer to the next: what the client reads of each (the body's
# framing, the content-type) is learnt once per set of names and must follow each answer's own.
CHANGING_HEADS = [
    (b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}", "application/json", b"{}"),
    (b"content-length: 2\r\nx-a: 1\r\nCONTENT-TYPE: text/plain\r\nContent-Type: b/c\r\n\r\nab", "text/plain",
     b"ab"),
    (b"Transfer-Encoding: chunked\r\ncontent-type: a/b\r\n\r\n2\r\nab\r\n0\r\n\r\n", "a/b", b"ab"),
    (b"x-a: 1\r\n\r\nuntil close", "", b"until close"),
    (b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}", "application/json", b"{}"),  # cached
]


async def test_each_answers_framing_and_content_type_follow_its_own_header_names(
    raw_server: Callable[[Handler], Awaitable[str]],
) -> None:
    session = LeanSession()
    try:
        for raw, content_type, body in CHANGING_HEADS:
            base = await raw_server(_answer(b"HTTP/1.1 200 OK\r\n" + raw))
            r = await session.request("POST", URL(base + "/v1/messages"), data=b"{}", headers={},
                                      timeout=aiohttp.ClientTimeout(total=5, sock_connect=2))
            assert content_type == r.content_type == r.headers.get("content-type", "")
            assert client.fields(r.parts) == list(r.headers.items())
            assert r.shape.lows == tuple(name.lower() for name, _ in r.headers.items())
            assert body == await r.read()
    finally:
        await session.close()


def test_the_head_shape_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client, "_SHAPES", {})
    for i in range(3 * client.SHAPES_MAX):
        shape = client._shape(f"x-invented-{i}\nContent-Type\nContent-Length")
        assert (True, 1, (f"x-invented-{i}", "content-type", "content-length")) == (shape.framed, shape.ctype,
                                                                                   shape.lows)
        assert len(client._SHAPES) <= client.SHAPES_MAX
    assert client._shape("").lows == ()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(garbage=st.binary(max_size=400), prefix=st.sampled_from([b"", b"HTTP/1.1 200 OK\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n"]))
def test_fuzzed_answers_end_in_an_answer_or_a_classified_error(garbage: bytes, prefix: bytes) -> None:
    """Whatever bytes a server sends, the client returns or raises a known error class, within the timeout."""

    async def run() -> None:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(prefix + garbage)
            await writer.drain()
            writer.close()

        srv = await asyncio.start_server(handler, "127.0.0.1", 0)
        base = f"http://127.0.0.1:{srv.sockets[0].getsockname()[1]}"
        try:
            status, body = await asyncio.wait_for(_call(base, total=2.0), timeout=20)
            assert 100 <= status <= 999
            assert isinstance(body, bytes)
        except (aiohttp.ClientError, TimeoutError):
            pass
        finally:
            srv.close()

    asyncio.run(run())


async def test_a_pooled_connection_the_server_closed_is_not_used_again(
    raw_server: Callable[[Handler], Awaitable[str]],
) -> None:
    """The server answers keep-alive, then closes the idle connection: the next call opens a new one."""
    served = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal served
        served += 1
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()

    base = await raw_server(handler)
    session = LeanSession()
    try:
        for expected in (1, 2, 3):
            r = await session.request("POST", URL(base + "/x"), data=b"{}", headers={})
            assert (200, b"ok") == (r.status, await r.read())
            assert expected == served
            pool = next(iter(session._pools.values()))
            conn = pool._idle[0]
            for _ in range(500):  # the server closed it: wait until the client has seen that
                if conn.closed:
                    break
                await asyncio.sleep(0.01)
            assert conn.closed
    finally:
        await session.close()


# ---------------------------------------------------------------- deadlines and cancellation


async def test_head_timeout_fails_a_silent_upstream_and_frees_the_slot(
    raw_server: Callable[[Handler], Awaitable[str]],
) -> None:
    """No head within head_timeout: TimeoutError, the connection is closed and its pool slot is free again."""
    base = await raw_server(_answer(b"", hold=True))
    session = LeanSession(limit_per_host=1)
    try:
        with pytest.raises(TimeoutError):
            await session.request("POST", URL(base + "/x"), data=b"{}", headers={}, head_timeout=0.2,
                                  timeout=aiohttp.ClientTimeout(total=30, sock_connect=2))
        pool = next(iter(session._pools.values()))
        assert 0 == len(pool._live)
        assert pool._sem is not None
        assert not pool._sem.locked()
    finally:
        await session.close()


async def test_a_cancelled_request_closes_its_connection(raw_server: Callable[[Handler], Awaitable[str]]) -> None:
    """A hedge that lost or a client that left: the request's connection is closed, not pooled."""
    base = await raw_server(_answer(b"", hold=True))
    session = LeanSession()
    try:
        task = asyncio.ensure_future(session.request("POST", URL(base + "/x"), data=b"{}", headers={}))
        await asyncio.sleep(0.1)
        pool = next(iter(session._pools.values()))
        (conn,) = pool._live
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert conn.closed
        assert not pool._live
        assert not pool._idle
    finally:
        await session.close()


async def test_idle_timeout_fails_a_stalled_body_and_read_timeout_a_late_one(
    raw_server: Callable[[Handler], Awaitable[str]],
) -> None:
    """idle_timeout: no body byte for that long fails the read; read_timeout: a deadline for reads."""
    stalled = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: 100\r\n\r\ndata: 1\n\n"
    for arm in ("idle", "deadline"):
        base = await raw_server(_answer(stalled, hold=True))
        session = LeanSession()
        try:
            r = await session.request("POST", URL(base + "/x"), data=b"{}", headers={},
                                      timeout=aiohttp.ClientTimeout(total=30))
            assert b"data: 1\n\n" == await r.content.readany()
            if arm == "idle":
                r.idle_timeout(0.3)
            else:
                r.read_timeout(0.3)
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(r.content.readany(), timeout=10)
            r.close()
        finally:
            await session.close()


async def test_trace_configs_get_start_and_end_and_can_add_headers(mock_upstream: Any) -> None:
    """Tracing on: aiohttp's request start/end signals, with headers the start hook adds sent upstream."""
    seen: list[str] = []

    async def on_start(session: Any, ctx: Any, params: aiohttp.TraceRequestStartParams) -> None:
        seen.append("start")
        params.headers["traceparent"] = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"

    async def on_end(session: Any, ctx: Any, params: aiohttp.TraceRequestEndParams) -> None:
        seen.append(f"end {params.response.status}")

    tc = aiohttp.TraceConfig()
    tc.on_request_start.append(on_start)
    tc.on_request_end.append(on_end)
    session = LeanSession(trace_configs=[tc])
    try:
        body = json.dumps(BODIES["/v1/messages"]).encode()
        status, _, _ = await _via_lean(session, mock_upstream.base_url, "/v1/messages", body, _headers({}))
        assert 200 == status
        assert ["start", "end 200"] == seen
        (req,) = await mock_upstream.requests()
        assert "traceparent" in {k.lower() for k in req["headers"]}
    finally:
        await session.close()


async def test_chunked_pieces_of_one_byte_are_all_read(raw_server: Callable[[Handler], Awaitable[str]]) -> None:
    """Several chunk frames in one read, the first and last one byte long: every byte is read.

    (llhttp hands 1-byte pieces as the same interned bytes object: an identity check for
    "one piece" would take the first piece for the whole read.)
    """
    base = await raw_server(_answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                                    b"1\r\nx\r\n3\r\nabc\r\n1\r\nx\r\n0\r\n\r\n"))
    assert (200, b"xabcx") == await _call(base)


def _dribble(pieces: list[bytes], *, end: bytes = b"0\r\n\r\n") -> Handler:
    """A chunked answer written one chunk frame at a time, with a pause between (separate reads)."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        for piece in pieces:
            await asyncio.sleep(0.02)
            writer.write(b"%x\r\n%b\r\n" % (len(piece), piece))
            await writer.drain()
        await asyncio.sleep(0.02)
        writer.write(end)
        await writer.drain()
        await asyncio.sleep(0.5)

    return handler


@pytest.mark.parametrize("cut", [False, True])
async def test_push_by_lines_hands_on_only_reads_that_end_a_line(
    raw_server: Callable[[Handler], Awaitable[str]], cut: bool
) -> None:
    """Push mode with lines: a read without a line end is held and goes with the next read that has one;
    what follows the last line end stays for held(), at the end of the body or when it is cut."""
    pieces = [b"data: a", b"b", b"c\r", b"\n\r\ndata: d", b"e\n", b"\n", b"data: f", b"g"]
    base = await raw_server(_dribble(pieces, end=b"" if cut else b"0\r\n\r\n"))
    session = LeanSession()
    try:
        r = await session.request("POST", URL(base + "/v1/chat/completions"), data=b"{}", headers={},
                                  timeout=aiohttp.ClientTimeout(total=5, sock_connect=2))
        got: list[bytes] = []
        body = r.content
        body.push(got.append, lines=True)
        while not body.is_eof() and body.failure is None:
            await body.wait()
        if cut:
            assert isinstance(body.failure, aiohttp.ClientPayloadError)
        for chunk in got:
            assert b"\n" in chunk
        assert b"data: abc\r\n\r\ndata: de\n\ndata: fg" == b"".join(got) + body.held()
        assert b"" == body.held()
        r.close()
    finally:
        await session.close()


# ---------------------------------------------------------------- the request head


async def test_request_head_sends_the_fields_in_order_without_framing_ones_for_each_set_of_names() -> None:
    """What an upstream receives, request after request on one connection: the given fields in
    order, minus those the client frames itself (any spelling), whichever names came before (the
    per-names plan); a line break in a name or value is refused before anything is sent."""
    heads: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
                heads.append(head)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    srv = await asyncio.start_server(serve, "127.0.0.1", 0)
    base = f"http://127.0.0.1:{srv.sockets[0].getsockname()[1]}"
    session = LeanSession()
    sets = [
        [("x-a", "1"), ("Content-Type", "application/json")],
        [("x-a", "1"), ("HOST", "evil"), ("content-length", "99"), ("x-b", "2"), ("Connection", "close")],
        [("x-a", "1"), ("Content-Type", "application/json")],  # a known set again
        [("Transfer-Encoding", "chunked")],
        [],
    ]
    try:
        for _ in range(2):  # the second round from the plans learnt in the first
            for fields in sets:
                r = await session.request("POST", URL(base + "/v1/x"), data=b"{}", headers=dict(fields),
                                          timeout=aiohttp.ClientTimeout(total=5))
                assert (r.status, await r.read()) == (200, b"ok")
        for bad in ({"x-a": "1\r\nx-injected: 1"}, {"x-a\nb": "1"}, {"x-a": "1\r"}):
            with pytest.raises(ValueError):
                await session.request("POST", URL(base + "/v1/x"), data=b"{}", headers=bad,
                                      timeout=aiohttp.ClientTimeout(total=5))
    finally:
        await session.close()
        srv.close()
    host = base.removeprefix("http://").encode()
    expected = [
        [b"x-a: 1", b"Content-Type: application/json"],
        [b"x-a: 1", b"x-b: 2"],
        [b"x-a: 1", b"Content-Type: application/json"],
        [],
        [],
    ] * 2
    assert len(heads) == len(expected)  # nothing of the refused requests reached the upstream
    for head, fields in zip(heads, expected, strict=True):
        assert head == b"\r\n".join([b"POST /v1/x HTTP/1.1", b"Host: " + host, *fields, b"Content-Length: 2", b"", b""])
