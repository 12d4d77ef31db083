"""What crosses the gateway's edge besides bodies: request headers upstream (allow-list),
the raw query string, and the headers every answer gets or loses (Server, no-store, nosniff)."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
from hypothesis import given
from hypothesis import strategies as st
from yarl import URL

from gateway.config import ConfigError, parse
from gateway.proxy.headers import ALLOWED_NAMES, HeaderPolicy, forward_header_errors, never_forwarded
from tests.conftest import CONFIG_DIR, TEST_KEY, gateway_toml
from tests.fixtures.control_plane import ADMIN, PASSWORD, bearer, create_user, login

AV = {"anthropic-version": "2023-06-01"}
MSG = {"model": "demo-claude", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}
CHAT = {"model": "demo-gpt", "messages": [{"role": "user", "content": "hi"}]}

# Everything a client, an SDK or a reverse proxy in front of the gateway may send.
CLIENT_HEADERS = {
    "content-type": "application/json",
    "accept": "application/json",
    "user-agent": "Anthropic/Python 1.0",
    "anthropic-beta": "prompt-caching-2024-07-31",
    "openai-organization": "org-1",
    "x-stainless-lang": "python",
    "x-stainless-retry-count": "0",
    "idempotency-key": "idem-1",
    "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    "tracestate": "congo=t61rcWkgMzE",
    # never forwarded:
    "api-key": TEST_KEY,  # Azure style, carrying the gateway key
    "x-real-ip": "203.0.113.7",
    "x-forwarded-for": "203.0.113.7",
    "x-forwarded-host": "gw.example.com",
    "x-forwarded-proto": "https",
    "forwarded": "for=203.0.113.7",
    "true-client-ip": "203.0.113.7",
    "cf-connecting-ip": "203.0.113.7",
    "via": "1.1 proxy",
    "cookie": "session=abc",
    "x-custom-secret": "s3cr3t",
    "x-amz-security-token": "tok",
    "origin": "https://evil.example",
    "referer": "https://evil.example/page",
    "accept-language": "en",
    "dnt": "1",
    "anthropic-api-key": TEST_KEY,  # credential-shaped under an allowed prefix
    "openai-secret": "s",
    "x-stainless-authorization": "s",
}
EXPECTED_UPSTREAM = {
    "content-type", "accept", "user-agent", "anthropic-beta", "openai-organization", "x-stainless-lang",
    "x-stainless-retry-count", "idempotency-key", "traceparent", "tracestate",
    # set by the gateway itself:
    "host", "content-length", "accept-encoding",
}


@pytest.mark.parametrize(
    ("path", "auth", "payload", "provider_auth"),
    [
        ("/v1/messages", {"x-api-key": TEST_KEY, **AV}, MSG, "x-api-key"),
        ("/v1/chat/completions", {"authorization": f"Bearer {TEST_KEY}"}, CHAT, "authorization"),
        (f"/ak/{TEST_KEY}/v1/messages", AV, MSG, "x-api-key"),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
async def test_upstream_receives_exactly_the_allow_list(gateway, mock_upstream, path, auth, payload, provider_auth,
                                                        stream):
    """Upstream sees the allowed client headers, the gateway's own and the provider key: nothing else."""
    headers = {**CLIENT_HEADERS, **auth}
    r = await gateway.post(path, headers=headers, json={**payload, "stream": stream})
    assert 200 == r.status, await r.text()
    await r.read()
    seen = (await mock_upstream.requests())[-1]["headers"]
    expected = EXPECTED_UPSTREAM | {provider_auth} | ({"anthropic-version"} if "anthropic-version" in auth else set())
    assert expected == set(seen)
    assert TEST_KEY not in str(seen)


async def test_operator_added_headers_pass_and_others_do_not(make_gateway, mock_upstream):
    """server.forward_headers adds exact names and prefixes; nothing else unknown passes."""
    toml = gateway_toml(mock_upstream.base_url).replace(
        'forward_headers = ["x-mock-*"]', 'forward_headers = ["x-mock-*", "x-portkey-*", "X-Tenant"]'
    )
    gw = await make_gateway(toml)
    r = await gw.post("/v1/messages", json=MSG, headers={
        "x-api-key": TEST_KEY, **AV, "x-portkey-trace": "1", "x-tenant": "t1", "x-tenant-2": "no", "x-other": "no",
    })
    assert 200 == r.status
    seen = (await mock_upstream.requests())[-1]["headers"]
    assert "1" == seen["x-portkey-trace"]
    assert "t1" == seen["x-tenant"]
    assert "x-tenant-2" not in seen
    assert "x-other" not in seen


@pytest.mark.parametrize("entry", ["api-key", "Authorization", "x-forwarded-*", "x-*", "cookie", "x-real-ip", "*",
                                   "proxy-*", "bad name", "x-api-*"])
def test_credential_or_address_headers_cannot_be_configured(entry):
    """A configuration that would forward a credential, an address or framing is refused at load."""
    with pytest.raises(ConfigError) as exc:
        parse(gateway_toml("http://127.0.0.1:1").replace('forward_headers = ["x-mock-*"]',
                                                          f'forward_headers = ["{entry}"]'),
              source=str(CONFIG_DIR / "t.toml"))
    assert any("server.forward_headers[0]" in e for e in exc.value.errors)


_NAME = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=30)


@given(name=_NAME, upper=st.booleans())
def test_allow_list_property(name, upper):
    """A header passes iff it is allowed by name or prefix and not a never-forwarded one, in any case."""
    policy = HeaderPolicy(["x-extra-*"])
    shown = name.upper() if upper else name
    expected = not never_forwarded(name) and (
        name in ALLOWED_NAMES or name.startswith(("anthropic-", "openai-", "x-stainless-", "x-extra-"))
    )
    assert expected == policy.allows(shown)
    assert policy.allows("api-key") is False
    assert policy.allows("X-Forwarded-For") is False


def test_forward_header_errors_table():
    """Valid additions pass; anything that could carry credentials or addresses does not."""
    assert [] == forward_header_errors(["x-portkey-*", "x-tenant", "helicone-auth-ignored"])
    assert 3 == len(forward_header_errors(["x-api-key", "x-forwarded-*", ""]))


# ---------------------------------------------------------------- query strings

QUERIES = ["x=%00", "x=%20y", "beta=true", "a=b&c=%2F%3F%23", "q=%E2%82%AC&q=2", "x=%25", "plus=a+b", "empty="]


@pytest.mark.parametrize("qs", QUERIES)
@pytest.mark.parametrize("prefix", ["", f"/ak/{TEST_KEY}"])
async def test_query_string_reaches_upstream_verbatim(gateway, mock_upstream, qs, prefix):
    """The client's raw query string is forwarded byte for byte, never decoded and re-sent."""
    url = URL(f"http://127.0.0.1:{gateway.server.port}{prefix}/v1/messages?{qs}", encoded=True)
    async with aiohttp.ClientSession() as s, s.post(url, headers={"x-api-key": TEST_KEY, **AV}, json=MSG) as r:
        assert 200 == r.status, await r.text()
    seen = (await mock_upstream.requests())[-1]
    assert f"/v1/messages?{qs}" == seen["raw_path"]


# ---------------------------------------------------------------- answer hygiene


async def _raw(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    out = await reader.read()  # the server closes after an error answer
    writer.close()
    return out


async def test_no_server_header_on_any_answer(cp, mock_upstream):
    """Data plane (JSON, SSE, errors), control plane, ops endpoints and parser errors: no Server header."""
    calls: list[tuple[str, str, dict[str, str], Any]] = [
        ("POST", "/v1/messages", {"x-api-key": TEST_KEY, **AV}, MSG),
        ("POST", "/v1/messages", {"x-api-key": TEST_KEY, **AV}, {**MSG, "stream": True}),
        ("POST", "/v1/messages", {"x-api-key": "gwk_nope", **AV}, MSG),
        ("POST", "/v1/messages", {"x-api-key": TEST_KEY, **AV, "x-mock-status": "500"}, MSG),
        ("GET", "/v1/nothing", {}, None),
        ("DELETE", "/v1/messages", {}, None),
        ("GET", "/healthz", {}, None),
        ("GET", "/readyz", {}, None),
        ("GET", "/metrics", {}, None),
        ("POST", "/auth/login", {}, {"email": "nobody@example.com", "password": "x" * 12}),
        ("GET", "/admin/users", ADMIN, None),
        ("GET", "/admin/users", {}, None),
        ("GET", "/openapi.json", {}, None),
    ]
    for method, path, headers, body in calls:
        r = await cp.request(method, path, headers=headers, json=body)
        await r.read()
        assert "Server" not in r.headers, (method, path, r.status)
    raw = await _raw(cp.server.port, b"GET /v1/models HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n")
    assert raw.startswith((b"HTTP/1.0 400", b"HTTP/1.1 400"))
    assert b"\r\nserver:" not in raw.lower()


async def test_secret_carrying_answers_are_not_stored_or_sniffed(cp):
    """/auth/login, /auth/refresh, POST /admin/keys, POST /me/keys (and their errors) say no-store, nosniff."""
    user = await create_user(cp, "nostore@example.com")
    tokens = await login(cp, "nostore@example.com")
    answers = [
        await cp.post("/auth/login", json={"email": "nostore@example.com", "password": PASSWORD}),
        await cp.post("/auth/login", json={"email": "nostore@example.com", "password": "wrong password!"}),
        await cp.post("/auth/refresh", json={"refresh_token": tokens["refresh_token"]}),
        await cp.post("/auth/refresh", json={"refresh_token": "nope"}),
        await cp.post("/admin/keys", headers=ADMIN, json={"user_id": user["id"]}),
        await cp.post("/me/keys", headers=bearer(tokens["access_token"]), json={"name": "mine"}),
        await cp.get("/me", headers=bearer(tokens["access_token"])),
    ]
    assert [200, 401, 200, 401, 201, 201, 200] == [r.status for r in answers]
    for r in answers:
        await r.read()
        assert "no-store" == r.headers["Cache-Control"], r.url
        assert "nosniff" == r.headers["X-Content-Type-Options"], r.url
    assert (await answers[4].json())["key"].startswith("gwk_")
