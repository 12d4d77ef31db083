"""provider = "vertex": the anthropic SDK -> gateway -> a Vertex AI fake behind a fake OAuth endpoint.

The gateway's google-auth credentials (a service-account file whose
token_uri is the fake) sign a JWT assertion the fake verifies with the
account's public key; Vertex accepts only the bearer tokens it issued, not
expired.  The client sees the Anthropic API.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import anthropic
import pytest

from tests.conftest import TEST_KEY
from tests.fixtures.cloud_common import anthropic_events, sse
from tests.fixtures.clouds import cloud_toml

AV = {"x-api-key": TEST_KEY, "anthropic-version": "2023-06-01"}
MODEL = "claude-sonnet-4-5@20250929"
MESSAGES: list[Any] = [{"role": "user", "content": "hi from the vertex test"}]
ROUTE = """
[[routes]]
match = "claude-*@*"
deployments = [{ upstream = "vertex" }]
"""


def vertex_upstream(url: str, creds: Path | str, *, project: str = "test-project", name: str = "vertex") -> str:
    return f"""
[upstreams.{name}]
provider = "vertex"
project = "{project}"
region = "us-east5"
base_url = "{url}"
credentials_file = "{creds}"
retries = 0
first_byte_timeout = 5
idle_timeout = 2
"""


async def test_sdk_message_through_vertex_with_an_oauth_token(sdk: Any, make_gateway: Any, vertex: Any) -> None:
    """rawPredict with a bearer token the fake issued for a verified service-account assertion."""
    fake, url, creds = vertex
    gw = await make_gateway(cloud_toml(vertex_upstream(url, creds), ROUTE))
    msg = await sdk.claude(gw).messages.create(model=MODEL, max_tokens=20, messages=MESSAGES,
                                               extra_headers={"anthropic-beta": "b1,b2"})
    assert "Hello from the cloud fake." == msg.content[0].text  # type: ignore[union-attr]
    [seen] = fake.seen
    assert "/v1/projects/test-project/locations/us-east5/publishers/anthropic/models/claude-sonnet-4-5@20250929:rawPredict" == seen["path"]
    assert "vertex-2023-10-16" == seen["body"]["anthropic_version"]
    assert ["b1", "b2"] == seen["body"]["anthropic_beta"]
    assert "model" not in seen["body"]
    assert 1 == fake.token_requests and [] == fake.refused


async def test_stream_through_vertex_is_relayed_byte_for_byte(sdk: Any, make_gateway: Any, vertex: Any) -> None:
    fake, url, creds = vertex
    gw = await make_gateway(cloud_toml(vertex_upstream(url, creds), ROUTE))
    r = await gw.post("/v1/messages", headers=AV,
                      json={"model": MODEL, "max_tokens": 20, "messages": MESSAGES, "stream": True})
    raw = await r.read()
    assert 200 == r.status
    [seen] = fake.seen
    assert "streamRawPredict" == seen["method"] and seen["body"]["stream"] is True
    assert b"".join(sse(e) for e in anthropic_events(seen["body"], MODEL, "msg_vrtx_000001")) == raw
    async with sdk.claude(gw).messages.stream(model=MODEL, max_tokens=20, messages=MESSAGES) as stream:
        final = await stream.get_final_message()
    assert 6 == final.usage.output_tokens


async def test_count_tokens_goes_to_the_count_tokens_model(make_gateway: Any, vertex: Any) -> None:
    fake, url, creds = vertex
    gw = await make_gateway(cloud_toml(vertex_upstream(url, creds), ROUTE))
    r = await gw.post("/v1/messages/count_tokens", headers=AV, json={"model": MODEL, "messages": MESSAGES})
    assert 200 == r.status
    assert {"input_tokens"} == set((await r.json()).keys())
    [seen] = fake.seen
    assert seen["path"].endswith("/models/count-tokens:rawPredict")
    assert MODEL == seen["body"]["model"]


@pytest.mark.parametrize(
    ("fault", "status", "etype"),
    [
        ((429, "RESOURCE_EXHAUSTED"), 429, "rate_limit_error"),
        ((400, "INVALID_ARGUMENT"), 400, "invalid_request_error"),
        ((404, "NOT_FOUND"), 404, "not_found_error"),
    ],
)
async def test_google_errors_become_anthropic_errors(make_gateway: Any, vertex: Any, fault: tuple[int, str],
                                                     status: int, etype: str) -> None:
    fake, url, creds = vertex
    fake.faults[:] = [fault]
    gw = await make_gateway(cloud_toml(vertex_upstream(url, creds), ROUTE))
    r = await gw.post("/v1/messages", headers=AV, json={"model": MODEL, "max_tokens": 5, "messages": MESSAGES})
    assert status == r.status
    assert {"type": "error", "error": {"type": etype, "message": f"Vertex AI {fault[1]}: fake {fault[1]}"}} == await r.json()


async def test_model_errors_in_anthropic_shape_pass_through(make_gateway: Any, vertex: Any) -> None:
    """An error the model itself returns (Anthropic's shape) is relayed unchanged."""
    fake, url, creds = vertex
    gw = await make_gateway(cloud_toml(vertex_upstream(url, creds), ROUTE))
    r = await gw.post("/v1/messages", headers={**AV}, json={"model": MODEL, "max_tokens": 5, "messages": MESSAGES,
                                                           "anthropic_version": "2023-06-01"})
    assert 400 == r.status
    assert {"type": "error", "error": {"type": "invalid_request_error", "message": "anthropic_version: invalid"}} == await r.json()


async def test_permission_denied_is_the_gateways_fault_and_fails_over(make_gateway: Any, vertex: Any) -> None:
    """Vertex refusing the gateway's account (403) is never relayed as the caller's fault: next deployment."""
    fake, url, creds = vertex
    ups = vertex_upstream(url, creds, project="other-project") + vertex_upstream(url, creds, name="vertex-2")
    route = """
[[routes]]
match = "claude-*@*"
deployments = [{ upstream = "vertex" }]
fallbacks = ["vertex-2"]
"""
    gw = await make_gateway(cloud_toml(ups, route))
    r = await gw.post("/v1/messages", headers=AV, json={"model": MODEL, "max_tokens": 5, "messages": MESSAGES})
    assert 200 == r.status, await r.text()
    assert ["test-project"] == [s["path"].split("/")[3] for s in fake.seen]


async def test_tokens_are_refreshed_before_they_expire(sdk: Any, make_gateway: Any, vertex: Any) -> None:
    """Tokens that live 302 s are renewed 5 min before expiry (2 s later): a new token, no request waiting."""
    fake, url, creds = vertex
    fake.expires_in = 302
    gw = await make_gateway(cloud_toml(vertex_upstream(url, creds), ROUTE))
    await sdk.claude(gw).messages.create(model=MODEL, max_tokens=5, messages=MESSAGES)
    first = fake.seen[-1]["token"]
    fake.expires_in = 3600
    deadline = time.monotonic() + 30
    while fake.token_requests < 2 and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert 2 == fake.token_requests
    deadline = time.monotonic() + 10
    while True:
        await sdk.claude(gw).messages.create(model=MODEL, max_tokens=5, messages=MESSAGES)
        if fake.seen[-1]["token"] != first or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    assert first != fake.seen[-1]["token"]
    assert [] == fake.refused


async def test_unreadable_credentials_fail_readiness_and_answer_502(make_gateway: Any, vertex: Any,
                                                                    tmp_path: Path) -> None:
    fake, url, _ = vertex
    gw = await make_gateway(cloud_toml(vertex_upstream(url, tmp_path / "missing.json"), ROUTE))
    r = await gw.get("/readyz")
    assert 503 == r.status
    state = (await r.json())["checks"]["credentials"]["upstreams"]["vertex"]
    assert {"status": "down", "error": "Google access token: cannot read credentials_file: No such file or directory"} == state
    r = await gw.post("/v1/messages", headers=AV, json={"model": MODEL, "max_tokens": 5, "messages": MESSAGES})
    assert 502 == r.status
    assert "api_error" == (await r.json())["error"]["type"]


async def test_a_key_the_token_endpoint_rejects_is_reported(sdk: Any, make_gateway: Any, vertex: Any,
                                                            tmp_path: Path) -> None:
    """The fake really verifies the assertion: another account's key gets invalid_grant -> unready, 502."""
    fake, url, creds = vertex
    other = type(fake)(base_url=url)
    bad = other.service_account_file(tmp_path / "other.json")  # same token_uri, a key the fake does not know
    gw = await make_gateway(cloud_toml(vertex_upstream(url, bad), ROUTE))
    r = await gw.get("/readyz")
    state = (await r.json())["checks"]["credentials"]["upstreams"]["vertex"]
    assert "down" == state["status"]
    assert "RefreshError" in state["error"] and "invalid_grant" in state["error"]
    assert ["assertion: InvalidSignatureError"] == fake.refused
    with pytest.raises(anthropic.InternalServerError):
        await sdk.claude(gw).messages.create(model=MODEL, max_tokens=5, messages=MESSAGES)


async def test_a_revoked_token_is_replaced_after_the_first_refusal(sdk: Any, make_gateway: Any, vertex: Any) -> None:
    """Vertex stops accepting the token before its expiry: that request gets the gateway's 502 (never
    Google's 401), a new token is fetched in the background, and the next requests use it.  Further
    refusals within 30 s fetch nothing more."""
    fake, url, creds = vertex
    gw = await make_gateway(cloud_toml(vertex_upstream(url, creds), ROUTE))
    await sdk.claude(gw).messages.create(model=MODEL, max_tokens=5, messages=MESSAGES)
    fake.tokens.clear()  # revoked
    r = await gw.post("/v1/messages", headers=AV, json={"model": MODEL, "max_tokens": 5, "messages": MESSAGES})
    assert 502 == r.status
    deadline = time.monotonic() + 10
    while fake.token_requests < 2 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert 2 == fake.token_requests
    deadline = time.monotonic() + 10
    while True:  # the new token is handed over once its fetch completes
        r = await gw.post("/v1/messages", headers=AV, json={"model": MODEL, "max_tokens": 5, "messages": MESSAGES})
        await r.read()
        if r.status == 200 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    assert 200 == r.status
    fake.tokens.clear()
    for _ in range(3):
        r = await gw.post("/v1/messages", headers=AV, json={"model": MODEL, "max_tokens": 5, "messages": MESSAGES})
        assert 502 == r.status
    assert 2 == fake.token_requests
