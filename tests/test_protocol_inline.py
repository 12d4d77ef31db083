"""Fast-dispatched requests run in the connection's own task (server/inline.py); the connection behaves as before.

Each test talks to the real server (GatewayRunner, the worker's own) over a
real socket, most of them raw, so that what is on the wire is what is
checked: pipelined answers in order, keep-alive reuse and its idle close, a
client that goes away (its handler cancelled, its usage logged once), a
request in flight while the worker drains.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient

from gateway.app import create_app
from gateway.config import parse
from gateway.observability import logging as gwlog
from gateway.server.inline import inline_supported
from gateway.server.protocol import GatewayProtocol, InlineGatewayProtocol
from gateway.worker import drain
from tests.conftest import CONFIG_DIR, TEST_KEY, MockUpstream, gateway_toml
from tests.fixtures.http import GatewayTestServer

OPENAI = {"authorization": f"Bearer {TEST_KEY}"}
ANTHROPIC = {"x-api-key": TEST_KEY, "anthropic-version": "2023-06-01"}


def chat(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}


def raw_post(path: str, doc: dict[str, Any], headers: dict[str, str]) -> bytes:
    data = orjson.dumps(doc)
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return (
        f"POST {path} HTTP/1.1\r\nHost: gw\r\n{head}content-type: application/json\r\n"
        f"content-length: {len(data)}\r\n\r\n"
    ).encode() + data


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 answer off the wire: status, headers (lower-cased names), body (content-length or chunked)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), 30)
    else:
        assert "chunked" == headers.get("transfer-encoding"), headers
        body = b""
        while True:
            size = int((await asyncio.wait_for(reader.readuntil(b"\r\n"), 30)).strip(), 16)
            chunk = await asyncio.wait_for(reader.readexactly(size + 2), 30)
            if size == 0:
                break
            body += chunk[:-2]
    return status, headers, body


async def start(app_toml: str) -> TestClient[Any, Any]:
    """A gateway on GatewayRunner; aiohttp's test server turns handler cancellation on, as a worker does."""
    app = create_app(parse(app_toml, source=str(CONFIG_DIR / "test.toml")))
    client: TestClient[Any, Any] = TestClient(GatewayTestServer(app, host="127.0.0.1"))
    await client.start_server()
    return client


@pytest.fixture
async def cancelling_gateway(cancelling_mock: MockUpstream) -> AsyncIterator[TestClient[Any, Any]]:
    client = await start(gateway_toml(cancelling_mock.base_url))
    yield client
    await client.close()


async def wait_for_stat(mock: MockUpstream, name: str, value: int) -> None:
    async with asyncio.timeout(30):
        while (await mock.stats()).get(name, 0) < value:
            await asyncio.sleep(0.01)


def test_the_installed_aiohttp_is_the_one_the_inline_loop_copies() -> None:
    """A guard for aiohttp upgrades: if this fails, the server silently fell back to aiohttp's own start().
    Re-read aiohttp's RequestHandler.start and _handle_request, bring InlineRequests.start in line with
    them, then update its digest."""
    assert inline_supported()


async def test_the_data_plane_server_runs_inline_and_tracing_keeps_aiohttps_loop(gateway, mock_upstream):
    """With the fast dispatch (tracing off) connections are inline ones; with tracing on, aiohttp's own."""
    server = gateway.server.runner.server
    assert InlineGatewayProtocol is server.protocol
    traced = await start(
        gateway_toml(
            mock_upstream.base_url,
            extra="""
            [tracing]
            enabled = true
            endpoint = "http://127.0.0.1:9/v1/traces"
            """,
        )
    )
    try:
        assert GatewayProtocol is traced.server.runner.server.protocol
        assert traced.server.runner.server.direct is None
    finally:
        await traced.close()


async def test_pipelined_requests_are_answered_in_order(gateway, mock_upstream):
    """40 requests in one write (more than aiohttp's parser queue of 32: reading pauses, then resumes),
    inline ones (exact paths) between ones in a task of their own (a query string, another path): each
    answered, in the order sent, on the one connection."""
    sent: list[tuple[str, str]] = []
    wire = b""
    for i in range(40):
        kind = ("openai", "anthropic", "query", "health")[i % 4]
        model = f"demo-pipe-{i}"
        if kind == "openai":
            wire += raw_post("/v1/chat/completions", chat(model), OPENAI)
        elif kind == "anthropic":
            wire += raw_post("/v1/messages", chat(model, max_tokens=5), ANTHROPIC)
        elif kind == "query":
            wire += raw_post("/v1/chat/completions?n=1", chat(model), OPENAI)
        else:
            wire += b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n"
            model = ""
        sent.append((kind, model))
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    try:
        writer.write(wire)
        await writer.drain()
        for kind, model in sent:
            status, headers, body = await read_answer(reader)
            assert 200 == status, (kind, model, body)
            doc = orjson.loads(body)
            if kind == "health":
                assert "model" not in doc
            else:
                assert model == doc["model"], kind
                assert ("message" if kind == "anthropic" else "chat.completion") == doc.get("type", doc.get("object"))
            assert "close" != headers.get("connection")
    finally:
        writer.close()
    assert 30 == len([r for r in await mock_upstream.requests() if r["body"].get("model", "").startswith("demo-pipe-")])


async def test_a_kept_alive_connection_serves_each_request_then_closes_when_idle(mock_upstream):
    """Requests one after the other on one connection all answered; idle past the keep-alive timeout,
    the server closes it (the timer restarted after each inline request), writing nothing more."""
    gw = await start(gateway_toml(mock_upstream.base_url).replace("[server]\n", "[server]\nkeepalive_timeout = 0.5\n"))
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        try:
            for i in range(3):
                for path, doc, headers in (
                    ("/v1/chat/completions", chat(f"demo-ka-{i}"), OPENAI),
                    ("/v1/messages", chat(f"demo-ka-{i}", max_tokens=5), ANTHROPIC),
                ):
                    writer.write(raw_post(path, doc, headers))
                    status, answer_headers, body = await read_answer(reader)
                    assert 200 == status, body
                    assert "close" != answer_headers.get("connection")
            assert b"" == await asyncio.wait_for(reader.read(), 30)  # closed by the server
        finally:
            writer.close()
        assert [] == gw.server.runner.server.connections
    finally:
        await gw.close()


async def test_an_unread_body_is_drained_and_the_connection_reused(gateway):
    """A request refused before its body was read (no key): answered, the body's rest read and
    dropped (aiohttp's lingering read), and the next request on the connection served."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    try:
        body = orjson.dumps(chat("demo-gpt", padding="x" * 200_000))
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\ncontent-type: application/json\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body[:1000]
        )
        await writer.drain()
        status, _, _ = await read_answer(reader)
        assert 401 == status
        writer.write(body[1000:])
        writer.write(raw_post("/v1/chat/completions", chat("demo-after"), OPENAI))
        await writer.drain()
        status, _, answer = await read_answer(reader)
        assert 200 == status, answer
        assert "demo-after" == orjson.loads(answer)["model"]
    finally:
        writer.close()


@pytest.fixture
def request_lines(monkeypatch: pytest.MonkeyPatch) -> Callable[[], list[dict[str, Any]]]:
    """The request lines the gateway writes (the production writer, into memory, whatever an earlier test
    configured): one call returns those so far."""
    sink = io.BytesIO()
    writer = gwlog.LoopBatchedWriter(sink)
    monkeypatch.setattr(gwlog, "_writer", writer)
    monkeypatch.setattr(gwlog, "_info", True)

    def lines() -> list[dict[str, Any]]:
        writer.drain()
        return [orjson.loads(line) for line in sink.getvalue().splitlines() if line.strip()]

    return lines


@pytest.mark.parametrize("stream", [False, True])
async def test_a_client_going_away_cancels_the_inline_handler_and_its_usage_is_logged_once(
    cancelling_gateway, cancelling_mock, request_lines, stream
):
    """Handler cancellation on (as a worker runs): the client resets the connection while the upstream
    thinks (JSON) or mid-stream; the upstream request is cancelled, the request is logged once with its
    usage as a 499, and the server keeps serving."""
    headers = {**OPENAI, **({"x-mock-chunks": "400", "x-mock-chunk-gap-ms": "50"} if stream else
                            {"x-mock-latency-ms": "30000"})}
    reader, writer = await asyncio.open_connection("127.0.0.1", cancelling_gateway.port)
    writer.write(raw_post("/v1/chat/completions", chat("demo-gone", stream=stream), headers))
    await writer.drain()
    if stream:
        got = b""
        while b"data:" not in got:
            chunk = await asyncio.wait_for(reader.read(4096), 30)
            assert chunk, "the gateway closed the stream"
            got += chunk
    else:
        await wait_for_stat(cancelling_mock, "requests", 1)
    writer.transport.abort()
    await wait_for_stat(cancelling_mock, "streams_cancelled" if stream else "requests_cancelled", 1)
    async with asyncio.timeout(30):
        while not [d for d in request_lines() if d.get("model") == "demo-gone"]:
            await asyncio.sleep(0.01)
    r = await cancelling_gateway.post("/v1/chat/completions", json=chat("demo-next"), headers=OPENAI)
    assert 200 == r.status
    await r.read()
    lines = request_lines()
    assert ["demo-gone", "demo-next"] == [d["model"] for d in lines if d.get("event") == "request"]
    line = lines[0]
    assert (499, "client_closed", True, True) == (line["status"], line["error"], line["partial"], line["usage"])
    assert 0 == (await cancelling_mock.stats()).get("streams_completed", 0)


async def test_a_request_in_flight_while_the_worker_drains_is_answered(mock_upstream):
    """The worker's drain (serve's SIGTERM path) waits for an inline request in flight: it is answered
    with ``Connection: close``, an idle kept-alive connection is closed, and the drain then ends."""
    gw = await start(gateway_toml(mock_upstream.base_url))
    runner = gw.server.runner
    site = next(iter(runner.sites))
    idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", gw.port)
    busy_reader, busy_writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        idle_writer.write(raw_post("/v1/chat/completions", chat("demo-idle"), OPENAI))
        assert 200 == (await read_answer(idle_reader))[0]
        before = (await mock_upstream.stats()).get("requests", 0)
        busy_writer.write(
            raw_post("/v1/messages", chat("demo-busy", max_tokens=5), {**ANTHROPIC, "x-mock-latency-ms": "1500"})
        )
        await busy_writer.drain()
        await wait_for_stat(mock_upstream, "requests", before + 1)
        draining = asyncio.create_task(drain(gw.server.app, runner, site, 0.2))
        assert b"" == await asyncio.wait_for(idle_reader.read(), 30)  # the idle connection closed
        status, headers, body = await read_answer(busy_reader)
        assert 200 == status, body
        assert "close" == headers["connection"]
        assert "demo-busy" == orjson.loads(body)["model"]
        await asyncio.wait_for(draining, 30)
        assert b"" == await asyncio.wait_for(busy_reader.read(), 30)
    finally:
        idle_writer.close()
        busy_writer.close()
        await gw.close()
