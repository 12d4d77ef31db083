"""Slow clients cannot hold connections: header, body and keep-alive deadlines on a real ``serve``.

Raw sockets play the slow client (headers one line at a time, a body
trickling, an idle keep-alive connection, a connection that never speaks);
each test keeps trickling until the server closes the connection and fails
only if that never happens within a generous deadline.  Ordinary clients,
slow upstreams and long streams are not cut.
"""

from __future__ import annotations

import asyncio
import time

import orjson
import pytest

from tests.conftest import TEST_KEY, gateway_toml

LIMITS = """
header_timeout = 1.0
body_timeout = 1.0
keepalive_timeout = 2.0
"""
GIVE_UP = 30.0  # seconds: far beyond the 1-2 s limits, only there so that a regression fails instead of hanging
MSG = orjson.dumps({"model": "demo-claude", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]})


@pytest.fixture
def gw(serve, mock_upstream):
    return serve(gateway_toml(mock_upstream.base_url).replace("[server]", "[server]" + LIMITS, 1), workers=1)


async def closed(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sent until it closed the connection."""
    return await asyncio.wait_for(reader.read(), timeout=GIVE_UP)


async def trickle_until_closed(writer: asyncio.StreamWriter, reader: asyncio.StreamReader,
                               pieces: list[bytes], gap: float = 0.1) -> tuple[int, bytes]:
    """Send one piece per ``gap`` until the server hangs up; (pieces sent, what it answered)."""
    reading = asyncio.ensure_future(closed(reader))
    sent = 0
    try:
        for piece in pieces:
            if reading.done():
                break
            try:
                writer.write(piece)
                await writer.drain()
            except ConnectionError:
                break
            sent += 1
            await asyncio.wait([reading], timeout=gap)
        return sent, await reading
    finally:
        writer.close()


@pytest.mark.slow
async def test_headers_one_line_at_a_time_are_cut_off(gw):
    """Slowloris: a header line every 100 ms forever; the server answers 408 and closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    pieces = [b"POST /v1/messages HTTP/1.1\r\n"] + [f"x-pad-{i}: {i}\r\n".encode() for i in range(int(GIVE_UP * 20))]
    sent, answer = await trickle_until_closed(writer, reader, pieces)
    assert sent < len(pieces)  # closed while the client was still sending headers
    assert answer.startswith(b"HTTP/1.1 408")
    assert b"\r\nserver:" not in answer.lower()


@pytest.mark.slow
async def test_body_trickling_is_cut_off(gw):
    """A body at 10 bytes/s (it would take minutes): the connection is closed before it completes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    body = b"{" + b" " * 3000 + b"}"
    head = (f"POST /v1/messages HTTP/1.1\r\nHost: gw\r\nx-api-key: {TEST_KEY}\r\nanthropic-version: 2023-06-01\r\n"
            f"content-type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    writer.write(head)
    pieces = [body[i:i + 1] for i in range(len(body))]
    sent, _ = await trickle_until_closed(writer, reader, pieces)
    assert sent < len(pieces)


@pytest.mark.slow
async def test_idle_keep_alive_and_silent_connections_are_closed(gw):
    """After an answer, an idle kept-alive connection is closed; so is one that never sends a byte."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n")
    await writer.drain()
    answer = await closed(reader)  # read() returns only once the server closed the idle connection
    assert answer.startswith(b"HTTP/1.1 200")
    assert b"connection: close" not in answer.lower()  # it was kept alive, then closed for idling
    writer.close()
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    assert (await closed(reader)).startswith((b"", b"HTTP/1.1 408"))
    writer.close()


@pytest.mark.slow
async def test_ordinary_clients_slow_upstreams_and_long_streams_are_not_cut(gw):
    """Headers split by a pause, an upstream slower than every limit, a stream longer than them: all complete."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    head = (f"POST /v1/messages HTTP/1.1\r\nHost: gw\r\nx-api-key: {TEST_KEY}\r\nanthropic-version: 2023-06-01\r\n"
            f"x-mock-latency-ms: 1500\r\nContent-Length: {len(MSG)}\r\nConnection: close\r\n").encode()
    writer.write(head[:40])
    await writer.drain()
    await asyncio.sleep(0.2)  # a pause well inside the header deadline (not a timing assertion)
    writer.write(head[40:] + b"\r\n" + MSG)
    answer = await closed(reader)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    body = orjson.dumps({**orjson.loads(MSG), "stream": True})
    writer.write((f"POST /v1/messages HTTP/1.1\r\nHost: gw\r\nx-api-key: {TEST_KEY}\r\n"
                  f"anthropic-version: 2023-06-01\r\nx-mock-chunks: 15\r\nx-mock-chunk-gap-ms: 200\r\n"
                  f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body)
    t0 = time.monotonic()
    answer = await closed(reader)
    writer.close()
    assert time.monotonic() - t0 > 1.0  # the stream really outlasted the 1 s limits (a lower bound only)
    assert answer.startswith(b"HTTP/1.1 200")
    assert b"message_stop" in answer


@pytest.mark.slow
async def test_slow_clients_are_logged_as_warnings(gw):
    """Each cut connection leaves one warning naming the phase, never request bytes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    await trickle_until_closed(writer, reader, [b"GET /ak/gwk_secretsecret/v1/models HTTP/1.1\r\n"] +
                               [b"x: y\r\n"] * int(GIVE_UP * 10))
    assert 0 == gw.stop()
    lines = [orjson.loads(line) for line in gw.log_text().splitlines() if line.startswith("{")]
    slow = [ln for ln in lines if ln.get("event") == "slow client; connection closed"]
    assert ["header"] == [ln["phase"] for ln in slow]
    assert "warning" == slow[0]["level"]
    assert "gwk_secret" not in gw.log_text()
