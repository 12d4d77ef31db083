"""Pure logic of the cloud kinds: the event-stream -> SSE converter under any split of its bytes
(hypothesis), the error tables, Entra token parsing, and the config checks of each kind."""

from __future__ import annotations

import time
from typing import Any

import jwt
import orjson
import pytest
from botocore.eventstream import EventStreamBuffer
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.config import ConfigError, parse
from gateway.providers.bedrock import ERRORS, Bedrock
from gateway.providers.credentials import CredentialError
from gateway.providers.entra import parse_token
from gateway.providers.eventstream import EventStreamToSSE
from gateway.providers.vertex import Vertex
from tests.fixtures.cloud_common import anthropic_events, chunk_frame, encode_frame, exception_frame, sse

EVENTS = anthropic_events({"messages": [{"role": "user", "content": "x"}]}, "anthropic.m", "msg_1")
FRAMES = b"".join(chunk_frame(orjson.dumps(e)) for e in EVENTS)
EXPECTED = b"".join(sse(e) for e in EVENTS)


def test_the_fake_encoder_is_what_botocore_decodes() -> None:
    """The fake's frames pass botocore's prelude and message CRC checks and carry their headers."""
    buf = EventStreamBuffer()
    buf.add_data(encode_frame({":message-type": "event", ":event-type": "chunk"}, b"payload"))
    [msg] = list(buf)
    assert ({":message-type": "event", ":event-type": "chunk"}, b"payload") == (msg.headers, msg.payload)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(FRAMES)), max_size=12))
def test_any_split_of_the_frames_gives_the_same_sse(cuts: list[int]) -> None:
    """However the bytes arrive, the SSE out is exactly the Anthropic events, in order."""
    points = sorted({0, len(FRAMES), *cuts})
    conv = EventStreamToSSE()
    out = b"".join(conv.feed(FRAMES[a:b]) for a, b in zip(points, points[1:], strict=False))
    assert EXPECTED == out
    assert "" == conv.broken


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=len(FRAMES) - 1), st.integers(min_value=1, max_value=255))
def test_a_corrupted_byte_is_never_relayed_as_an_event(pos: int, flip: int) -> None:
    """A flipped byte anywhere: the frames before it come out whole, the stream is then broken
    (CRC), and no event after the corruption is produced."""
    data = bytearray(FRAMES)
    data[pos] ^= flip
    conv = EventStreamToSSE()
    out = conv.feed(bytes(data))
    assert EXPECTED.startswith(out)
    assert out != EXPECTED
    assert conv.broken.startswith("Bedrock event stream: ")


@pytest.mark.parametrize(
    ("exception", "etype"),
    [("throttlingException", "rate_limit_error"), ("modelStreamErrorException", "api_error"),
     ("serviceUnavailableException", "overloaded_error"), ("validationException", "invalid_request_error"),
     ("somethingNewException", "api_error")],
)
def test_exception_frames_become_anthropic_error_events(exception: str, etype: str) -> None:
    out = EventStreamToSSE().feed(exception_frame(exception, "why"))
    assert b"event: error\ndata: " + orjson.dumps(
        {"type": "error", "error": {"type": etype, "message": f"Bedrock {exception}: why"}}) + b"\n\n" == out


def test_non_chunk_events_are_skipped_and_garbage_chunks_are_errors() -> None:
    conv = EventStreamToSSE()
    assert b"" == conv.feed(encode_frame({":message-type": "event", ":event-type": "initial-response"}, b"{}"))
    bad = encode_frame({":message-type": "event", ":event-type": "chunk"}, b'{"bytes":"not base64!"}')
    assert conv.feed(bad).startswith(b"event: error\n")


def _up(**fields: Any) -> Any:
    toml = "[upstreams.u]\n" + "".join(f'{k} = "{v}"\n' for k, v in fields.items())
    return parse(toml, environ={}).upstreams["u"]


@pytest.mark.parametrize(
    ("header", "classified", "client", "etype"),
    [(f"{name}:http://internal.amazon.com/coral/com.amazon.bedrock/", spec[0], spec[1], spec[2])
     for name, spec in ERRORS.items()] + [("", 418, 418, "api_error"), ("", 400, 400, "invalid_request_error")],
)
def test_bedrock_error_table(header: str, classified: int, client: int, etype: str) -> None:
    b = Bedrock("b", _up(provider="bedrock", region="us-east-1"))
    status = classified if not header else 400
    headers = {"x-amzn-errortype": header} if header else {}
    assert classified == b.upstream_status(status, headers)
    got_status, body = b.error_body(status, headers, b'{"message":"m"}')
    assert (client, etype) == (got_status, orjson.loads(body)["error"]["type"])


@pytest.mark.parametrize(
    ("status", "gstatus", "client", "etype"),
    [(429, "RESOURCE_EXHAUSTED", 429, "rate_limit_error"), (503, "UNAVAILABLE", 529, "overloaded_error"),
     (400, "INVALID_ARGUMENT", 400, "invalid_request_error"), (504, "DEADLINE_EXCEEDED", 504, "timeout_error"),
     (500, "INTERNAL", 500, "api_error"), (418, "", 418, "api_error")],
)
def test_vertex_error_table(status: int, gstatus: str, client: int, etype: str) -> None:
    v = Vertex("v", _up(provider="vertex", region="us-east5", project="p"))
    body = orjson.dumps([{"error": {"code": status, "message": "m", "status": gstatus}}])
    got, out = v.error_body(status, {}, body)
    assert (client, etype) == (got, orjson.loads(out)["error"]["type"])
    assert 401 == v.upstream_status(403, {})


def test_vertex_urls_per_region() -> None:
    assert Vertex("v", _up(provider="vertex", region="global", project="p")).models.startswith(
        "https://aiplatform.googleapis.com/v1/projects/p/locations/global/")
    assert Vertex("v", _up(provider="vertex", region="europe-west1", project="p")).models.startswith(
        "https://europe-west1-aiplatform.googleapis.com/v1/projects/p/locations/europe-west1/")
    assert Vertex("v", _up(provider="vertex", region="eu", project="p")).models.startswith(
        "https://aiplatform.eu.rep.googleapis.com/v1/projects/p/locations/eu/")
    assert "https://bedrock-runtime.eu-west-3.amazonaws.com" == Bedrock("b", _up(provider="bedrock", region="eu-west-3")).base


def test_entra_token_parsing() -> None:
    exp = int(time.time()) + 1000
    token = jwt.encode({"exp": exp}, "k" * 32)
    assert (token, float(exp)) == (parse_token(token + "\n", 300).value, parse_token(token, 300).expires_at)
    az = orjson.dumps({"accessToken": "opaque-token", "expires_on": exp}).decode()
    assert ("opaque-token", float(exp)) == (parse_token(az, 300).value, parse_token(az, 300).expires_at)
    opaque = parse_token("opaque", 120)
    assert opaque.expires_at is not None and opaque.expires_at > time.time() + 119
    for bad in ("", "two words", '{"no": "token"}', "{broken"):
        with pytest.raises(CredentialError):
            parse_token(bad, 300)


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({"provider": "bedrock"}, "upstreams.u.region: required"),
        ({"provider": "vertex", "region": "us-east5"}, "upstreams.u.project: required"),
        ({"provider": "azure-openai", "base_url": "https://x", "api_key_env": "K"}, "upstreams.u.api_version: required"),
        ({"provider": "azure-openai", "base_url": "https://x", "api_version": "v"},
         "upstreams.u: set exactly one of api_key_env, token_command or token_file"),
        ({"provider": "azure-openai", "base_url": "https://x", "api_version": "v", "api_key_env": "K",
          "token_file": "/t"}, "upstreams.u: set exactly one of api_key_env, token_command or token_file"),
        ({"provider": "bedrock", "region": "us-east-1", "api_key_env": "K"},
         "upstreams.u.api_key_env: not used by provider 'bedrock'"),
        ({"provider": "openai", "base_url": "https://x", "region": "us"}, "upstreams.u.region: not used by provider 'openai'"),
        ({"provider": "bedrock", "region": "us east/1"}, "upstreams.u.region: not a region name: 'us east/1'"),
        ({"provider": "anthropic"}, "upstreams.u.base_url: required"),
    ],
)
def test_config_checks_each_kinds_fields(fields: dict[str, str], error: str) -> None:
    toml = "[upstreams.u]\n" + "".join(f'{k} = "{v}"\n' for k, v in fields.items())
    with pytest.raises(ConfigError) as err:
        parse(toml, environ={})
    assert error in err.value.errors
