"""No key in any log line: a real ``llm-gateway serve`` with its stdout captured.

Keys travel in x-api-key, Authorization and the /ak/{key} path, on success and
on every error path; none of them, nor the provider keys, may reach the log.
"""

from __future__ import annotations

import asyncio

import aiohttp
import orjson
import pytest

from tests.conftest import TEST_KEY, gateway_toml

AV = {"anthropic-version": "2023-06-01"}
MSG = {"model": "demo-claude", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}
CHAT = {"model": "demo-gpt", "messages": [{"role": "user", "content": "hi"}]}
UNKNOWN = "gwk_unknown_" + "u" * 32
MALFORMED = (
    f"GET /ak/{TEST_KEY}/v1/mo dels HTTP/1.1\r\nHost: x\r\n\r\n",
    f"GET /ak/{TEST_KEY}/v1/models HTTP/9.9\r\nHost: x\r\n\r\n",
    f"GET /v1/models HTTP/1.1\r\nHost: x\r\nx-api-key: {TEST_KEY}\x01\r\n\r\n",
    f"GET /ak/{TEST_KEY}/v1/models HTTP/1.1\r\nHost: x\r\nX-Big: {'a' * 20000}\r\n\r\n",
)
SECRETS = (TEST_KEY, UNKNOWN, "sk-ant-upstream-secret", "sk-openai-upstream-secret", "a" * 32, "u" * 32)


@pytest.mark.slow
async def test_no_key_in_any_log_line(serve, mock_upstream):
    """Success, streams, /ak paths, 401/400/404/405, upstream errors and cut streams log no secret."""
    gw = serve(gateway_toml(mock_upstream.base_url), workers=1)
    base = gw.base_url
    calls = [
        ("POST", "/v1/messages", {"x-api-key": TEST_KEY, **AV}, MSG),
        ("POST", "/v1/messages", {"x-api-key": TEST_KEY, **AV}, {**MSG, "stream": True}),
        ("POST", f"/ak/{TEST_KEY}/v1/messages", AV, MSG),
        ("POST", f"/ak/{TEST_KEY}/v1/messages?beta=true", AV, {**MSG, "stream": True}),
        ("POST", f"/ak/{UNKNOWN}/v1/messages", AV, MSG),
        ("POST", f"/ak/{TEST_KEY}/v1/nope", AV, MSG),
        ("GET", f"/ak/{TEST_KEY}/v1/messages", AV, None),
        ("GET", f"/ak/{TEST_KEY}/v1/models", {}, None),
        ("POST", "/v1/chat/completions", {"authorization": f"Bearer {TEST_KEY}"}, CHAT),
        ("POST", "/v1/chat/completions", {"authorization": f"Bearer {UNKNOWN}"}, CHAT),
        ("POST", "/v1/chat/completions", {"authorization": f"Bearer {TEST_KEY}"}, {**CHAT, "stream": True}),
        ("POST", "/v1/chat/completions", {"authorization": f"Bearer {TEST_KEY}", "x-mock-status": "500"}, CHAT),
        ("POST", "/v1/chat/completions", {"authorization": f"Bearer {TEST_KEY}", "x-mock-drop-after": "1"},
         {**CHAT, "stream": True}),
        ("POST", "/v1/messages", {"x-api-key": TEST_KEY, **AV}, {"model": "no-route"}),
        ("POST", f"/ak/{TEST_KEY}/v1/embeddings", {}, {"model": "demo-e", "input": "x"}),
    ]
    statuses = []
    request_ids = []
    async with aiohttp.ClientSession() as s:
        for method, path, headers, body in calls:
            async with s.request(method, base + path, headers=headers, json=body) as r:
                await r.read()
                statuses.append(r.status)
                request_ids.append(r.headers["x-request-id"])
        async with s.post(base + "/v1/messages", headers={"x-api-key": TEST_KEY, **AV}, data=b"{bad") as r:
            statuses.append(r.status)
    assert [200, 200, 200, 200, 401, 404, 405, 200, 200, 401, 200, 500, 200, 404, 200, 400] == statuses
    # Malformed HTTP never reaches the middleware; aiohttp logs its parser errors itself.
    for raw in MALFORMED:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(raw.encode("latin-1"))
        assert (await reader.read(100)).startswith(b"HTTP/1.")
        writer.close()
    assert 0 == gw.stop()
    text = gw.log_text()
    lines = [line for line in text.splitlines() if line.strip()]
    assert any('"BadStatusLine"' in line for line in lines)
    for line in lines:
        orjson.loads(line)  # every line is JSON, aiohttp's and asyncio's included
    request_lines = [orjson.loads(line) for line in lines if '"event":"request"' in line]
    assert len(calls) + 1 == len(request_lines)
    for secret in SECRETS:
        assert secret not in text, f"a secret leaked into the log: {secret[:8]}..."
    ak_paths = [r["path"] for r in request_lines if r["path"].startswith("/ak/")]
    assert 7 == len(ak_paths)
    assert all(p.startswith("/ak/***/") for p in ak_paths)
    assert all(r["request_id"].startswith("req_") for r in request_lines)
    # The id the client got is the one in the log line (and the usage record).
    assert set(request_ids) <= {r["request_id"] for r in request_lines}
