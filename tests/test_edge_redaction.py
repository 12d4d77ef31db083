"""No gateway key in any rendered path or header: a real ``llm-gateway serve``, raw sockets.

Every shape a key can take in a request path (any case, doubled slashes, dot
segments, a prefix before ``/ak/``, percent-encoding, a bare ``gwk_`` token)
and every malformed request aiohttp's parser refuses (oversized or broken
headers carrying a key) is sent; neither the answer nor any log line may hold
the key, parser errors are answered in JSON and logged as warnings.
"""

from __future__ import annotations

import asyncio

import orjson
import pytest

from gateway.observability.redact import redact_path
from tests.conftest import TEST_KEY, gateway_toml

UNKNOWN = "gwk_unknownKEY_" + "Z" * 32
KEYS = (TEST_KEY, UNKNOWN)

PATH_SHAPES = (
    "/ak/{k}/v1/nope",
    "//ak/{k}/v1/messages",
    "/AK/{k}/v1/messages",
    "/Ak/{k}/v1/models",
    "/./ak/{k}/v1/messages",
    "/v1/ak/{k}/v1/messages",
    "/gw/ak/{k}/v1/messages",
    "/ak//{k}/v1/messages",
    "/ak/{k}",
    "/ak/{k}/",
    "/x/{k}",
    "/admin/{k}",
    "/auth/{k}",
    "/me/{k}",
    "/ak/{k}/v1/messages/../models",
    "/%61k/{k}/v1/messages",
    "/ak%2F{k}/v1/messages",
    "/v1/messages/{k}",
    "/ak/{k}/v1/messages?key={k}",
    "/ak/{k};x=1/v1/messages",
)


async def exchange(port: int, raw: bytes) -> bytes:
    """One request over a fresh connection; everything the server sent until it closed."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(), timeout=30)
    finally:
        writer.close()


def request(method: str, path: str, headers: str = "", body: bytes = b"") -> bytes:
    return (f"{method} {path} HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n{headers}"
            f"Content-Length: {len(body)}\r\n\r\n").encode("latin-1") + body


def malformed(k: str) -> list[bytes]:
    big = "x" * 20000
    return [
        f"GET /v1/models HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {k}{big}\r\n\r\n".encode(),
        f"GET /v1/models HTTP/1.1\r\nHost: gw\r\nx-api-key: {k}{big}\r\n\r\n".encode(),
        f"GET /ak/{k}/v1/mo dels HTTP/1.1\r\nHost: gw\r\n\r\n".encode(),
        f"GET /ak/{k}/v1/models HTTP/9.9\r\nHost: gw\r\n\r\n".encode(),
        f"GET /ak/{k}/{big} HTTP/1.1\r\nHost: gw\r\n\r\n".encode(),
        f"G\x01T /ak/{k}/v1/models HTTP/1.1\r\nHost: gw\r\n\r\n".encode(),
        f"GET /v1/models HTTP/1.1\r\nHost: gw\r\nx-api-key: {k}\x01\r\n\r\n".encode(),
        f"GET /v1/models HTTP/1.1\r\nHost: gw\r\n{k}\x7f: v\r\n\r\n".encode(),
        f"GET /v1/models HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {k}\r\n continued\r\n\r\n".encode(),
        f"POST /ak/{k}/v1/messages HTTP/1.1\r\nHost: gw\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!".encode(),
        f"POST /ak/{k}/v1/messages HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{k}\r\n".encode(),
    ]


@pytest.mark.slow
async def test_no_key_shape_is_ever_rendered(serve, mock_upstream):
    """Every path shape and malformed request: the key is neither in the answer nor in the log."""
    gw = serve(gateway_toml(mock_upstream.base_url), workers=1)
    answers: list[bytes] = []
    for k in KEYS:
        for shape in PATH_SHAPES:
            path = shape.format(k=k)
            for method in ("GET", "POST"):
                answers.append(await exchange(gw.port, request(method, path, body=b'{"model":"demo-x"}')))
        for raw in malformed(k):
            answers.append(await exchange(gw.port, raw))
    for a in answers:
        assert a.startswith(b"HTTP/1."), a[:80]
        head, _, body = a.partition(b"\r\n\r\n")
        for k in KEYS:
            assert k.encode() not in a, a[:300]
        if body and b" 200 " not in head.split(b"\r\n")[0]:
            orjson.loads(body)  # every error answer is JSON
    metrics = await exchange(gw.port, request("GET", "/metrics"))
    assert metrics.startswith(b"HTTP/1.1 200")
    for k in KEYS:
        assert k.encode() not in metrics  # no key in any metric label
    assert 0 == gw.stop()
    text = gw.log_text()
    for k in KEYS:
        assert k not in text, "a key leaked into the log"
        assert k[4:] not in text
    lines = [orjson.loads(line) for line in text.splitlines() if line.strip()]
    bad = [ln for ln in lines if ln.get("event") == "malformed request"]
    assert len(bad) >= 2 * len(malformed(TEST_KEY)) - 2  # one per refused request (first-byte method errors: debug)
    assert all("warning" == ln["level"] for ln in bad)
    assert [] == [ln for ln in lines if ln.get("level") == "error"]
    paths = [ln["path"] for ln in lines if ln.get("event") == "request"]
    assert 2 * len(PATH_SHAPES) * 2 + 1 == len(paths)
    assert any("/ak/***" in p.lower() for p in paths)


@pytest.mark.parametrize(("path", "expected"), [
    ("/ak/gwk_abc/v1/messages", "/ak/***/v1/messages"),
    ("//ak/gwk_abc/v1/messages", "//ak/***/v1/messages"),
    ("/AK/anything/v1", "/AK/***/v1"),
    ("/v1/ak/secret/x", "/v1/ak/***/x"),
    ("/ak//secret/x", "/ak//***/x"),
    ("/x/gwk_abc-DEF_1", "/x/gwk_***"),
    ("/GWK_ABC", "/GWK_***"),
    ("/v1/messages", "/v1/messages"),
    ("/akx/y", "/akx/y"),
    ("/ak", "/ak"),
])
def test_redact_path_table(path, expected):
    """The redaction itself, shape by shape."""
    assert expected == redact_path(path)
