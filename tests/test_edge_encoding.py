"""Request bodies with content-encoding: decoded within the size limit, forwarded decoded without
the header, refused in the path's dialect (or the control plane's shape) when they cannot be decoded."""

from __future__ import annotations

import gzip
import zlib

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.server import body as body_codec
from tests.conftest import TEST_KEY, gateway_toml
from tests.fixtures.control_plane import ADMIN

AV = {"anthropic-version": "2023-06-01"}
MSG = {"model": "demo-claude", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}
CHAT = {"model": "demo-gpt", "messages": [{"role": "user", "content": "hi"}]}
ANTHROPIC = ("/v1/messages", {"x-api-key": TEST_KEY, **AV}, MSG)
OPENAI = ("/v1/chat/completions", {"authorization": f"Bearer {TEST_KEY}"}, CHAT)


def raw_deflate(data: bytes) -> bytes:
    c = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return c.compress(data) + c.flush()


ENCODINGS = [
    ("gzip", gzip.compress),
    ("x-gzip", gzip.compress),
    ("deflate", zlib.compress),
    ("deflate", raw_deflate),
    ("GZIP", gzip.compress),
    ("deflate, gzip", lambda b: gzip.compress(zlib.compress(b))),
    ("identity", lambda b: b),
]


@pytest.mark.parametrize(("encoding", "encode"), ENCODINGS)
@pytest.mark.parametrize("call", [ANTHROPIC, OPENAI], ids=["anthropic", "openai"])
async def test_encoded_body_is_forwarded_decoded_without_the_header(gateway, mock_upstream, encoding, encode, call):
    """gzip/deflate bodies reach the upstream as plain JSON, with no content-encoding header."""
    path, headers, payload = call
    r = await gateway.post(path, data=encode(orjson.dumps(payload)),
                           headers={**headers, "content-encoding": encoding, "content-type": "application/json"})
    assert 200 == r.status, await r.text()
    seen = (await mock_upstream.requests())[-1]
    assert "content-encoding" not in seen["headers"]
    assert payload["model"] == seen["body"]["model"]
    assert payload["messages"] == seen["body"]["messages"]


BAD = [
    ("gzip", b"not gzip at all", 400),
    ("gzip", gzip.compress(orjson.dumps(MSG))[:-12], 400),  # truncated
    ("gzip", gzip.compress(orjson.dumps(MSG)) + b"trailing", 400),
    ("deflate", b"\x00\x01\x02garbage", 400),
    ("br", b"\x1b\x00", 415),
    ("zstd", b"\x28\xb5\x2f\xfd", 415),
    ("gzip, compress", b"x", 415),
]


@pytest.mark.parametrize(("encoding", "data", "status"), BAD)
@pytest.mark.parametrize("call", [ANTHROPIC, OPENAI], ids=["anthropic", "openai"])
async def test_undecodable_or_unsupported_bodies_are_refused_in_dialect(gateway, mock_upstream, encoding, data,
                                                                       status, call):
    """Not what the header says: 400; a coding the gateway does not speak: 415; never a 500, never upstream."""
    path, headers, _ = call
    before = len(await mock_upstream.requests())
    r = await gateway.post(path, data=data, headers={**headers, "content-encoding": encoding})
    body = await r.json()
    assert status == r.status
    if path == "/v1/messages":
        assert "error" == body["type"]
        assert "invalid_request_error" == body["error"]["type"]
    else:
        assert "invalid_request_error" == body["error"]["type"]
        assert body["error"]["code"] in ("invalid_request", "unsupported_content_encoding")
    assert before == len(await mock_upstream.requests())


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_decompression_bomb_stops_at_the_limit(make_gateway, mock_upstream, encoding):
    """A small body that expands to 50 MB is refused with 413 (the limit applies while decoding)."""
    gw = await make_gateway(gateway_toml(mock_upstream.base_url).replace("[server]", "[server]\nmax_body_bytes = 100000"))
    bomb_src = b"{" + b" " * (50 * 1024 * 1024) + b"}"
    bomb = gzip.compress(bomb_src, 9) if encoding == "gzip" else zlib.compress(bomb_src, 9)
    del bomb_src
    assert len(bomb) < 100000
    r = await gw.post("/v1/messages", data=bomb, headers={"x-api-key": TEST_KEY, **AV, "content-encoding": encoding})
    assert 413 == r.status
    assert "request_too_large" == (await r.json())["error"]["type"]


async def test_control_plane_decodes_or_refuses_encoded_bodies(cp):
    """/auth/login and /admin: gzip works, garbage is 400, an unknown coding 415, never 500."""
    login = orjson.dumps({"email": "nobody@example.com", "password": "wrong password"})
    r = await cp.post("/auth/login", data=gzip.compress(login), headers={"content-encoding": "gzip",
                                                                        "content-type": "application/json"})
    assert 401 == r.status  # decoded and evaluated
    for data, encoding, status, code in [
        (b"not gzip", "gzip", 400, "invalid_request"),
        (b"\x78\x9c garbage", "deflate", 400, "invalid_request"),
        (login, "br", 415, "unsupported_content_encoding"),
        (gzip.compress(b"{" + b" " * 200_000 + b"}"), "gzip", 413, "request_too_large"),
    ]:
        for path in ("/auth/login", "/auth/refresh", "/admin/users"):
            r = await cp.post(path, data=data, headers={"content-encoding": encoding,
                                                        "content-type": "application/json",
                                                        **ADMIN})
            assert status == r.status, (path, encoding, await r.text())
            assert code == (await r.json())["error"]["code"]


async def test_encoded_bodies_never_trip_the_breaker(gateway, mock_upstream):
    """Many gzip requests in a row (the breaker opens after 5 failures): all served, and so is the next plain one."""
    for _ in range(12):
        r = await gateway.post("/v1/messages", data=gzip.compress(orjson.dumps(MSG)),
                               headers={"x-api-key": TEST_KEY, **AV, "content-encoding": "gzip"})
        assert 200 == r.status
    r = await gateway.post("/v1/messages", json=MSG, headers={"x-api-key": TEST_KEY, **AV})
    assert 200 == r.status
    assert all("content-encoding" not in s["headers"] for s in await mock_upstream.requests())


@settings(max_examples=60, deadline=None)
@given(data=st.binary(max_size=5000), chain=st.lists(st.sampled_from(["gzip", "deflate"]), max_size=3),
       limit=st.integers(min_value=0, max_value=6000))
def test_decode_round_trip_and_limit_property(data, chain, limit):
    """decode(encode(x)) == x when x fits the limit, else TooLarge; never any other outcome."""
    encoded = data
    for name in chain:
        encoded = gzip.compress(encoded) if name == "gzip" else zlib.compress(encoded)
    header = ", ".join(chain)
    sizes = [len(data)]  # every intermediate stage must fit too
    stage = data
    for name in chain[:-1]:
        stage = gzip.compress(stage) if name == "gzip" else zlib.compress(stage)
        sizes.append(len(stage))
    if not chain:
        assert data == body_codec.decode(encoded, None, limit)  # no coding: the raw read's limit applies
    elif max(sizes) <= limit:
        assert data == body_codec.decode(encoded, header or None, limit)
    else:
        with pytest.raises(body_codec.TooLarge):
            body_codec.decode(encoded, header or None, limit)
