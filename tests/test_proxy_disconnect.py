"""A client that goes away is an ordinary outcome, never a server error in the log.

A real ``llm-gateway serve`` (handler cancellation on, as in production) with
its log captured; clients on raw sockets that close before the answer (while
the upstream thinks), mid-stream, or at random moments around the response
headers.  Each such request ends as one request line with status 499 and
``error: client_closed``, its usage is recorded exactly once, and no line of
the log is at error level (aiohttp's "Error handling request" included).
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import pytest

from tests.conftest import TEST_KEY, MockUpstream, gateway_toml

AUTH = {
    "anthropic": {"x-api-key": TEST_KEY, "anthropic-version": "2023-06-01"},
    "openai": {"authorization": f"Bearer {TEST_KEY}"},
}
PATHS = {"anthropic": "/v1/messages", "openai": "/v1/chat/completions"}


def body(dialect: str, model: str, stream: bool) -> dict[str, Any]:
    doc: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    if dialect == "anthropic":
        doc["max_tokens"] = 10
    return doc


async def send_then_close(
    port: int, dialect: str, doc: dict[str, Any], headers: dict[str, str],
    until: Callable[[asyncio.StreamReader], Awaitable[None]],
) -> None:
    """POST over a raw socket, wait for ``until``, then reset the connection (no answer read)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    data = orjson.dumps(doc)
    head = "".join(f"{k}: {v}\r\n" for k, v in {**AUTH[dialect], **headers}.items())
    writer.write(
        f"POST {PATHS[dialect]} HTTP/1.1\r\nHost: gw\r\n{head}content-type: application/json\r\n"
        f"content-length: {len(data)}\r\n\r\n".encode() + data
    )
    try:
        await until(reader)
    finally:
        writer.transport.abort()


def log_docs(text: str) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in text.splitlines() if line.strip()]


def assert_no_error_lines(docs: list[dict[str, Any]]) -> None:
    errors = [d for d in docs if d.get("level") == "error"]
    assert [] == errors


async def wait_for_request_lines(gw: Any, n: int, timeout: float = 60.0) -> None:
    """Until the gateway has logged ``n`` request lines (it notices, settles and logs in its own time)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while sum(1 for d in log_docs(gw.log_text()) if d.get("event") == "request") < n:
        assert asyncio.get_running_loop().time() < deadline, f"fewer than {n} request lines logged"
        await asyncio.sleep(0.05)


@pytest.mark.slow
async def test_client_closing_before_or_during_the_answer_is_one_quiet_499_line(serve, mock_upstream: MockUpstream):
    """JSON and SSE, both dialects: closed while the upstream thinks, or mid-stream -> 499 client_closed, no error."""
    gw = serve(gateway_toml(mock_upstream.base_url), workers=1)

    async def upstream_has_it(_: asyncio.StreamReader) -> None:
        want = seen[0] + 1
        while (await mock_upstream.stats()).get("requests", 0) < want:
            await asyncio.sleep(0.01)
        seen[0] = want
        await asyncio.sleep(0.05)  # the gateway is now waiting on the upstream's headers

    async def first_event(reader: asyncio.StreamReader) -> None:
        got = b""
        while b"data:" not in got:
            chunk = await reader.read(4096)
            assert chunk, "the gateway closed the stream"
            got += chunk

    seen = [0]
    cases = []  # (model, dialect, stream, headers, until)
    for dialect in ("anthropic", "openai"):
        for stream in (False, True):
            cases.append((f"demo-{dialect}-{stream}-early", dialect, stream, {"x-mock-latency-ms": "3000"},
                          upstream_has_it))
        cases.append((f"demo-{dialect}-midstream", dialect, True, {"x-mock-chunk-gap-ms": "300"}, first_event))
    for model, dialect, stream, headers, until in cases:
        await send_then_close(gw.port, dialect, body(dialect, model, stream), headers, until)
    await wait_for_request_lines(gw, len(cases))
    assert 0 == gw.stop()

    docs = log_docs(gw.log_text())
    assert_no_error_lines(docs)
    requests = {d["model"]: d for d in docs if d.get("event") == "request"}
    usage = Counter(d["request_id"] for d in docs if d.get("event") == "request" and d.get("usage") is True)
    for model, _, stream, _, _ in cases:
        line = requests[model]
        assert (499, "client_closed", True) == (line["status"], line["error"], line["partial"]), model
        assert 1 == usage[line["request_id"]], f"usage of {model} must be recorded exactly once"
    assert requests["demo-openai-midstream"]["streamed"]
    assert requests["demo-anthropic-midstream"]["out_tokens"] > 0  # what was used up to the cut


@pytest.mark.slow
async def test_clients_closing_at_random_moments_never_log_an_error(serve, mock_upstream: MockUpstream):
    """Around the response headers (the race aiohttp logged as a server error): 200 or 499, one usage line each."""
    gw = serve(gateway_toml(mock_upstream.base_url), workers=1)
    rng = random.Random(7)

    # Each connection is reset only once the request has reached the upstream (so the gateway
    # has it and must log it, however slow this machine is), at a random moment around the
    # upstream's answer (it waits 0-8 ms before its headers; the reset comes 0-8 ms later).
    async def upstream_has(want: int) -> None:
        while (await mock_upstream.stats()).get("requests", 0) < want:
            await asyncio.sleep(0.005)

    def after(seen: asyncio.Task[None], delay: float) -> Callable[[asyncio.StreamReader], Awaitable[None]]:
        async def wait(_: asyncio.StreamReader) -> None:
            await seen
            await asyncio.sleep(delay)

        return wait

    n = 0
    for i in range(60):
        dialect = ("anthropic", "openai")[i % 2]
        stream = i % 4 >= 2
        seen = asyncio.ensure_future(upstream_has(n + 10))
        batch = [
            send_then_close(gw.port, dialect, body(dialect, "demo-race", stream),
                            {"x-mock-latency-ms": str(rng.randint(0, 8))}, after(seen, rng.random() * 0.008))
            for _ in range(10)
        ]
        n += len(batch)
        await asyncio.gather(*batch)
    await wait_for_request_lines(gw, n)
    assert 0 == gw.stop()

    docs = log_docs(gw.log_text())
    assert_no_error_lines(docs)
    lines = [d for d in docs if d.get("event") == "request"]
    assert n == len(lines)
    assert {200, 499} >= {d["status"] for d in lines}
    assert all(d["error"] == "client_closed" for d in lines if d["status"] == 499)
    usage = Counter(d["request_id"] for d in docs if d.get("event") == "request" and d.get("usage") is True)
    assert {d["request_id"] for d in lines if d["upstream"]} == set(usage)
    assert {1} == set(usage.values())
