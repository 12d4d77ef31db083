"""Every gateway error of DESIGN.md's table, per dialect: status, envelope, headers.

First the vocabulary itself (a table test of ``gateway.errors``), then each
situation provoked over real HTTP against the in-process gateway.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import given
from hypothesis import strategies as st

from gateway import keys
from gateway.app import create_app
from gateway.config import parse
from gateway.errors import (
    ANTHROPIC,
    OPENAI,
    ErrorKind,
    GatewayError,
    envelope,
    render,
    retry_headers,
    stream_error_event,
)
from gateway.policy.admit import Admitter, RequestFacts, Reservation
from gateway.policy.principals import Principal
from tests.conftest import CONFIG_DIR, OTHER_KEY, TEST_KEY, gateway_toml, sha
from tests.fixtures.control_plane import ADMIN
from tests.fixtures.servers import free_port

# kind -> (status on Anthropic paths, status on OpenAI paths, Anthropic type, OpenAI type, OpenAI code)
TABLE = {
    ErrorKind.AUTHENTICATION: (401, 401, "authentication_error", "invalid_request_error", "invalid_api_key"),
    ErrorKind.PERMISSION: (403, 403, "permission_error", "invalid_request_error", "permission_denied"),
    ErrorKind.INVALID_REQUEST: (400, 400, "invalid_request_error", "invalid_request_error", "invalid_request"),
    ErrorKind.TOO_LARGE: (413, 413, "request_too_large", "invalid_request_error", "request_too_large"),
    ErrorKind.NOT_FOUND: (404, 404, "not_found_error", "invalid_request_error", "model_not_found"),
    ErrorKind.RATE_LIMITED: (429, 429, "rate_limit_error", "rate_limit_error", "rate_limit_exceeded"),
    ErrorKind.BUDGET_EXCEEDED: (429, 429, "rate_limit_error", "insufficient_quota", "budget_exceeded"),
    ErrorKind.UPSTREAM_ERROR: (502, 502, "api_error", "server_error", "upstream_error"),
    ErrorKind.UNAVAILABLE: (529, 503, "overloaded_error", "server_error", "service_unavailable"),
    ErrorKind.UPSTREAM_TIMEOUT: (504, 504, "timeout_error", "server_error", "upstream_timeout"),
    # Not in DESIGN.md's table: the router's misses, and a bug of ours.
    ErrorKind.UNKNOWN_PATH: (404, 404, "not_found_error", "invalid_request_error", "not_found"),
    ErrorKind.METHOD_NOT_ALLOWED: (405, 405, "invalid_request_error", "invalid_request_error", "method_not_allowed"),
    ErrorKind.UNSUPPORTED_ENCODING: (415, 415, "invalid_request_error", "invalid_request_error",
                                     "unsupported_content_encoding"),
    ErrorKind.INTERNAL: (500, 500, "api_error", "server_error", "internal_error"),
}
NO_RETRY = {ErrorKind.AUTHENTICATION, ErrorKind.PERMISSION, ErrorKind.BUDGET_EXCEEDED}
RETRY_AFTER = {ErrorKind.RATE_LIMITED, ErrorKind.UNAVAILABLE}
AV = {"anthropic-version": "2023-06-01"}
MSG = {"model": "demo-claude", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}
CHAT = {"model": "demo-gpt", "messages": [{"role": "user", "content": "hi"}]}


# ------------------------------------------------------------------ the vocabulary


@pytest.mark.parametrize("kind", list(TABLE))
def test_table_covers_every_kind_with_designs_status_and_types(kind):
    """Each kind maps to DESIGN.md's status and types in both dialects."""
    a_status, o_status, a_type, o_type, o_code = TABLE[kind]
    assert a_status == kind.status_for(ANTHROPIC)
    assert o_status == kind.status_for(OPENAI)
    assert {"type": "error", "error": {"type": a_type, "message": "m"}} == orjson.loads(envelope(kind, "m", ANTHROPIC))
    assert {"error": {"message": "m", "type": o_type, "param": None, "code": o_code}} == orjson.loads(
        envelope(kind, "m", OPENAI)
    )


def test_every_kind_is_in_the_table():
    """The test table and the closed vocabulary list the same kinds."""
    assert set(ErrorKind) == set(TABLE)


@pytest.mark.parametrize("kind", list(TABLE))
@pytest.mark.parametrize("dialect", [ANTHROPIC, OPENAI])
def test_render_sets_retry_headers_per_kind(kind, dialect):
    """x-should-retry: false on auth/permission/budget; retry-after(-ms) on rate limit and overload."""
    resp = render(GatewayError(kind, "m", retry_after_s=2.5), dialect)
    assert "application/json" == resp.headers["content-type"]
    assert ("false" if kind in NO_RETRY else None) == resp.headers.get("x-should-retry")
    if kind in RETRY_AFTER:
        assert "3" == resp.headers["retry-after"]
        assert "2500" == resp.headers["retry-after-ms"]
    else:
        assert "retry-after" not in resp.headers
        assert "retry-after-ms" not in resp.headers


@pytest.mark.parametrize(
    ("seconds", "whole", "ms"),
    [(0.0, "1", "1"), (0.2, "1", "200"), (1.0, "1", "1000"), (2.5, "3", "2500"), (59.9, "60", "59900"),
     (60.0, "60", "60000"), (3600.0, "60", "60000"), (-5.0, "1", "1")],
)
def test_retry_headers_are_whole_seconds_at_most_60(seconds, whole, ms):
    """retry-after is whole seconds in 1..60; retry-after-ms agrees with it and is capped the same."""
    assert {"retry-after": whole, "retry-after-ms": ms} == retry_headers(seconds)


@given(st.floats(allow_nan=False, allow_infinity=True))
def test_retry_headers_property(seconds):
    """For any hint: whole seconds in 1..60, milliseconds in 1..60000, and the seconds never undercut the ms."""
    h = retry_headers(seconds)
    whole, ms = int(h["retry-after"]), int(h["retry-after-ms"])
    assert 1 <= whole <= 60
    assert 1 <= ms <= 60_000
    assert whole * 1000 >= ms


def test_rate_limit_without_hint_still_says_when_to_retry():
    """A 429 rendered without a retry hint still carries retry-after."""
    resp = render(GatewayError(ErrorKind.RATE_LIMITED, "m"), OPENAI)
    assert "1" == resp.headers["retry-after"]


def test_stream_error_events_are_dialect_shaped_and_never_terminal():
    """In-stream errors: Anthropic 'event: error', OpenAI a data line with an error object."""
    a = stream_error_event(ErrorKind.UPSTREAM_ERROR, "cut", ANTHROPIC)
    o = stream_error_event(ErrorKind.UPSTREAM_ERROR, "cut", OPENAI)
    assert a.startswith(b"event: error\ndata: ") and a.endswith(b"\n\n")
    assert "api_error" == orjson.loads(a.split(b"data: ", 1)[1])["error"]["type"]
    assert o.startswith(b"data: {") and o.endswith(b"\n\n")
    assert "upstream_error" == orjson.loads(o[6:])["error"]["code"]
    for ev in (a, o):
        assert b"message_stop" not in ev and b"[DONE]" not in ev


def test_metric_labels_are_stable_lowercase_names():
    """Each kind's metric label is its lowercase name (never user input)."""
    assert {k.name.lower() for k in ErrorKind} == {k.label for k in ErrorKind}


# ------------------------------------------------------------------ over HTTP


def check_error(r: Any, body: bytes, kind: ErrorKind, dialect: str) -> dict[str, Any]:
    """Assert status, envelope and headers of a gateway error response; return the error object."""
    a_status, o_status, a_type, o_type, o_code = TABLE[kind]
    doc = orjson.loads(body)
    assert (a_status if dialect == ANTHROPIC else o_status) == r.status, body
    assert r.headers["x-request-id"].startswith("req_")
    assert r.headers["server-timing"].startswith("gateway;dur=")
    assert r.headers["content-type"].startswith("application/json")
    if dialect == ANTHROPIC:
        assert "error" == doc["type"]
        assert a_type == doc["error"]["type"]
    else:
        assert o_type == doc["error"]["type"]
        assert o_code == doc["error"]["code"]
        assert doc["error"]["param"] is None
    assert isinstance(doc["error"]["message"], str) and doc["error"]["message"]
    assert ("false" if kind in NO_RETRY else None) == r.headers.get("x-should-retry")
    if kind in RETRY_AFTER:
        assert 1 <= int(r.headers["retry-after"]) <= 60
        assert int(r.headers["retry-after-ms"]) >= 1
    return doc["error"]  # type: ignore[no-any-return]


async def call(client: TestClient[Any, Any], dialect: str, *, key: str | None = TEST_KEY, **kw: Any) -> tuple[Any, bytes]:
    """POST a chat in the dialect, authenticating like that dialect's SDK."""
    if dialect == ANTHROPIC:
        headers = {**AV, **({"x-api-key": key} if key else {}), **kw.pop("headers", {})}
        r = await client.post("/v1/messages", headers=headers, **({} if "data" in kw or "json" in kw else {"json": MSG}), **kw)
    else:
        headers = {**({"authorization": f"Bearer {key}"} if key else {}), **kw.pop("headers", {})}
        r = await client.post("/v1/chat/completions", headers=headers, **({} if "data" in kw or "json" in kw else {"json": CHAT}), **kw)
    return r, await r.read()


DIALECTS = pytest.mark.parametrize("dialect", [ANTHROPIC, OPENAI])


@DIALECTS
async def test_missing_key_is_401(gateway, dialect):
    r, body = await call(gateway, dialect, key=None)
    check_error(r, body, ErrorKind.AUTHENTICATION, dialect)


@DIALECTS
async def test_unknown_key_is_401(gateway, dialect):
    r, body = await call(gateway, dialect, key="gwk_" + "z" * 40)
    err = check_error(r, body, ErrorKind.AUTHENTICATION, dialect)
    assert "gwk_" not in err["message"]


@DIALECTS
async def test_expired_key_is_401(make_gateway, mock_upstream, dialect):
    expired = "gwk_expired_" + "e" * 32
    gw = await make_gateway(
        gateway_toml(mock_upstream.base_url)
        + f'\n[[keys]]\nname = "old"\nkey_sha256 = "{sha(expired)}"\nexpires_at = "2020-01-01T00:00:00Z"\n'
    )
    r, body = await call(gw, dialect, key=expired)
    check_error(r, body, ErrorKind.AUTHENTICATION, dialect)


async def test_expired_key_cannot_list_models(make_gateway, mock_upstream):
    expired = "gwk_expired_" + "e" * 32
    gw = await make_gateway(
        gateway_toml(mock_upstream.base_url)
        + f'\n[[keys]]\nname = "old"\nkey_sha256 = "{sha(expired)}"\nexpires_at = "2020-01-01T00:00:00Z"\n'
    )
    r = await gw.get("/v1/models", headers={"authorization": f"Bearer {expired}"})
    check_error(r, await r.read(), ErrorKind.AUTHENTICATION, OPENAI)
    r = await gw.get("/v1/models", headers={"x-api-key": expired, **AV})
    check_error(r, await r.read(), ErrorKind.AUTHENTICATION, ANTHROPIC)


@DIALECTS
async def test_model_not_allowed_is_403(gateway, dialect):
    r, body = await call(gateway, dialect, key=OTHER_KEY)
    check_error(r, body, ErrorKind.PERMISSION, dialect)


@DIALECTS
async def test_ip_not_allowed_is_403(make_gateway, mock_upstream, dialect):
    fenced = "gwk_fenced_" + "f" * 32
    gw = await make_gateway(
        gateway_toml(mock_upstream.base_url)
        + f'\n[[keys]]\nname = "fenced"\nkey_sha256 = "{sha(fenced)}"\nlimits = {{ allowed_ips = ["10.0.0.0/8"] }}\n'
    )
    r, body = await call(gw, dialect, key=fenced)
    check_error(r, body, ErrorKind.PERMISSION, dialect)


@DIALECTS
@pytest.mark.parametrize(
    "payload",
    [b"{not json", b"[1, 2]", b'{"messages": []}', b'{"model": ""}', b'{"model": 5}',
     b'{"model": "demo-x", "stream": "yes"}', b'{"model": "demo-x", "max_tokens": -1}',
     b'{"model": "demo-x", "max_tokens": true}', b""],
)
async def test_malformed_request_is_400(gateway, mock_upstream, dialect, payload):
    """Bad JSON, a missing model or a bad field is the caller's 400, never forwarded."""
    r, body = await call(gateway, dialect, data=payload, headers={"content-type": "application/json"})
    check_error(r, body, ErrorKind.INVALID_REQUEST, dialect)
    assert 0 == (await mock_upstream.stats()).get("requests", 0)


@DIALECTS
async def test_body_too_large_is_413(make_gateway, mock_upstream, dialect):
    """A body above server.max_body_bytes is refused, by content-length or while reading."""
    gw = await make_gateway(gateway_toml(mock_upstream.base_url).replace("[server]", "[server]\nmax_body_bytes = 1000"))
    big = orjson.dumps({**MSG, "model": "demo-x", "pad": "x" * 2000})
    r, body = await call(gw, dialect, data=big, headers={"content-type": "application/json"})
    check_error(r, body, ErrorKind.TOO_LARGE, dialect)

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(big), 100):
            yield big[i : i + 100]

    r, body = await call(gw, dialect, data=chunks(), headers={"content-type": "application/json"})
    check_error(r, body, ErrorKind.TOO_LARGE, dialect)


@DIALECTS
async def test_no_route_for_model_is_404(gateway, dialect):
    r, body = await call(gateway, dialect, json={**MSG, "model": "no-such-model"})
    err = check_error(r, body, ErrorKind.NOT_FOUND, dialect)
    assert "no-such-model" in err["message"]


@DIALECTS
async def test_upstream_unreachable_is_502(make_gateway, mock_upstream, dialect):
    gw = await make_gateway(gateway_toml(f"http://127.0.0.1:{free_port()}"))
    r, body = await call(gw, dialect)
    check_error(r, body, ErrorKind.UPSTREAM_ERROR, dialect)


@DIALECTS
async def test_upstream_timeout_is_504(make_gateway, mock_upstream, dialect):
    gw = await make_gateway(
        gateway_toml(mock_upstream.base_url).replace("first_byte_timeout = 5", "first_byte_timeout = 0.2")
    )
    r, body = await call(gw, dialect, headers={"x-mock-latency-ms": "3000"})
    check_error(r, body, ErrorKind.UPSTREAM_TIMEOUT, dialect)


@DIALECTS
async def test_open_circuit_is_529_on_anthropic_503_on_openai(make_gateway, dialect):
    """Once the only deployment's breaker is open, the gateway sheds with retry-after."""
    dead = f"http://127.0.0.1:{free_port()}"
    gw = await make_gateway(
        gateway_toml(dead)
        + "\n[upstreams.mock-anthropic.breaker]\nfailure_threshold = 1\ncooldown_seconds = 30\n"
        + "\n[upstreams.mock-openai.breaker]\nfailure_threshold = 1\ncooldown_seconds = 30\n"
    )
    r, body = await call(gw, dialect)
    check_error(r, body, ErrorKind.UPSTREAM_ERROR, dialect)
    r, body = await call(gw, dialect)
    check_error(r, body, ErrorKind.UNAVAILABLE, dialect)
    assert 29 <= int(r.headers["retry-after"]) <= 30


# (method, path, extra headers) -> (kind, surface, Allow header or None).  Surface:
# the Anthropic or OpenAI envelope, or the control plane's {"error": {"code", "message"}}.
CP = "control-plane"
KEYED = f"/ak/{TEST_KEY}"
UNMATCHED = [
    ("GET", "/v1/nope", {}, ErrorKind.UNKNOWN_PATH, OPENAI, None),
    ("POST", "/chat/completions", {}, ErrorKind.UNKNOWN_PATH, OPENAI, None),  # base_url without /v1
    ("GET", "/", {}, ErrorKind.UNKNOWN_PATH, OPENAI, None),
    ("POST", "/v1/nope", AV, ErrorKind.UNKNOWN_PATH, ANTHROPIC, None),
    ("POST", "/v1/messages/batches", {}, ErrorKind.UNKNOWN_PATH, ANTHROPIC, None),
    ("POST", f"{KEYED}/v1/nope", {}, ErrorKind.UNKNOWN_PATH, OPENAI, None),
    ("POST", f"{KEYED}/v1/messages/batches", {}, ErrorKind.UNKNOWN_PATH, ANTHROPIC, None),
    ("GET", KEYED, {}, ErrorKind.UNKNOWN_PATH, OPENAI, None),
    ("GET", "/v1/messages", {}, ErrorKind.METHOD_NOT_ALLOWED, ANTHROPIC, "POST"),
    ("GET", f"{KEYED}/v1/messages", {}, ErrorKind.METHOD_NOT_ALLOWED, ANTHROPIC, "POST"),
    ("GET", "/v1/chat/completions", {}, ErrorKind.METHOD_NOT_ALLOWED, OPENAI, "POST"),
    ("GET", f"{KEYED}/v1/embeddings", AV, ErrorKind.METHOD_NOT_ALLOWED, ANTHROPIC, "POST"),
    ("DELETE", "/v1/models", {}, ErrorKind.METHOD_NOT_ALLOWED, OPENAI, "GET"),
    ("GET", "/admin/nope", AV, ErrorKind.UNKNOWN_PATH, CP, None),
    ("GET", "/me/nope", {}, ErrorKind.UNKNOWN_PATH, CP, None),
    ("PUT", "/admin/users", {}, ErrorKind.METHOD_NOT_ALLOWED, CP, "GET,HEAD,POST"),
    ("GET", "/auth/login", {}, ErrorKind.METHOD_NOT_ALLOWED, CP, "POST"),
    ("POST", "/healthz", {}, ErrorKind.METHOD_NOT_ALLOWED, CP, "GET,HEAD"),
]


@pytest.mark.parametrize(("method", "path", "headers", "kind", "surface", "allow"), UNMATCHED)
async def test_unknown_paths_and_methods_answer_json_in_the_paths_dialect(
    gateway, method, path, headers, kind, surface, allow
):
    """The router's 404/405 are JSON errors shaped by the path (or anthropic-version), never echo a key, keep Allow."""
    r = await gateway.request(method, path, headers=headers)
    raw = await r.read()
    if surface == CP:
        assert kind.spec.status == r.status
        assert r.headers["x-request-id"].startswith("req_")
        assert r.headers["server-timing"].startswith("gateway;dur=")
        assert r.headers["content-type"].startswith("application/json")
        err = orjson.loads(raw)["error"]
        assert {"code", "message"} == set(err)
        assert kind.spec.openai_code == err["code"]
    else:
        err = check_error(r, raw, kind, surface)
    assert method in err["message"]
    assert TEST_KEY.encode() not in raw
    if path.startswith("/ak/"):
        assert "/ak/***" in err["message"]
    if allow is None:
        assert "Allow" not in r.headers
    else:
        assert set(allow.split(",")) == set(r.headers["Allow"].split(","))


async def test_handlers_own_404_keeps_its_body(cp):
    """A control-plane handler's own 404 (an unknown id) is not mistaken for the router's miss."""
    r = await cp.get("/admin/users/12345", headers=ADMIN)
    assert 404 == r.status
    err = (await r.json())["error"]
    assert "not_found" == err["code"]
    assert "Unknown path" not in err["message"]


# ------------------------------------------------------------------ policy answers over HTTP


class RefusingLimiter:
    """A Limiter (the policy protocol) that refuses every request with a given error."""

    def __init__(self, err: GatewayError) -> None:
        self.err = err

    async def reserve(self, principal: Principal, facts: RequestFacts) -> Reservation:
        raise self.err

    async def settle(self, *args: Any) -> None:
        return None

    async def close(self) -> None:
        return None


async def gateway_with_limiter(upstream_url: str, err: GatewayError) -> TestClient[Any, Any]:
    app = create_app(parse(gateway_toml(upstream_url), source=str(CONFIG_DIR / "test.toml")))

    async def limiter(app: web.Application) -> AsyncIterator[None]:
        app[keys.ADMITTER] = Admitter(RefusingLimiter(err))
        yield

    app.cleanup_ctx.append(limiter)
    client: TestClient[Any, Any] = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    return client


@DIALECTS
@pytest.mark.parametrize(
    ("err", "retry_after"),
    [
        (GatewayError(ErrorKind.RATE_LIMITED, "Too many requests.", retry_after_s=12.3,
                      headers={"x-ratelimit-limit-requests": "10", "x-ratelimit-remaining-requests": "0"}), "13"),
        (GatewayError(ErrorKind.RATE_LIMITED, "Too many requests.", retry_after_s=500), "60"),
        (GatewayError(ErrorKind.BUDGET_EXCEEDED, "Budget exhausted."), None),
        (GatewayError(ErrorKind.UNAVAILABLE, "Policy store down.", retry_after_s=1), "1"),
    ],
    ids=["rate", "rate-capped", "budget", "store-down"],
)
async def test_policy_refusals_render_per_dialect(mock_upstream, dialect, err, retry_after):
    """Limiter refusals: 429 with retry-after (<= 60 s), budget 429 without retry, 529/503 shedding."""
    client = await gateway_with_limiter(mock_upstream.base_url, err)
    try:
        r, body = await call(client, dialect)
        check_error(r, body, err.kind, dialect)
        assert retry_after == r.headers.get("retry-after")
        for name, value in err.headers.items():
            assert value == r.headers[name]
        assert 0 == (await mock_upstream.stats()).get("requests", 0)
    finally:
        await client.close()
