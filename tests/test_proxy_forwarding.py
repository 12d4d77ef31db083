"""Forwarding over real HTTP: both dialects, streaming and not, /ak/ paths, key precedence.

The gateway runs in-process against the real mock upstream; what the upstream
received is read back from ``GET /_mock/requests``.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from tests.conftest import OTHER_KEY, TEST_KEY, gateway_toml

AV = {"anthropic-version": "2023-06-01"}
MSG = {"model": "demo-claude", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}
CHAT = {"model": "demo-gpt", "messages": [{"role": "user", "content": "hi"}]}
EXACT_ROUTES = """
[[routes]]
match = "demo-allowed-listed"
deployments = [{ upstream = "mock-openai" }]

[[routes]]
match = "demo-hidden"
deployments = [{ upstream = "mock-anthropic" }]
"""


def sse_events(raw: bytes) -> list[tuple[str, bytes]]:
    """(event name, data) pairs of an SSE body; the name is '' for OpenAI's data-only events."""
    out = []
    for block in raw.replace(b"\r\n", b"\n").split(b"\n\n"):
        if not block.strip():
            continue
        name, data = "", b""
        for line in block.split(b"\n"):
            if line.startswith(b"event:"):
                name = line[6:].strip().decode()
            elif line.startswith(b"data:"):
                data = line[5:].strip()
        out.append((name, data))
    return out


async def last_seen(mock_upstream) -> dict[str, Any]:
    return (await mock_upstream.requests())[-1]


# ------------------------------------------------------------------ Anthropic


async def test_anthropic_messages_non_streaming_relays_upstream_body_and_usage(gateway, mock_upstream):
    """POST /v1/messages returns the upstream JSON untouched, with gateway headers added."""
    r = await gateway.post("/v1/messages", headers={"x-api-key": TEST_KEY, **AV}, json=MSG)
    body = await r.json()
    assert 200 == r.status
    assert "message" == body["type"]
    assert 5 == body["usage"]["output_tokens"]
    assert r.headers["request-id"].startswith("req_mock_msg_mock")
    assert r.headers["x-request-id"].startswith("req_")
    assert r.headers["server-timing"].startswith("gateway;dur=")
    seen = await last_seen(mock_upstream)
    assert "/v1/messages" == seen["path"]
    assert MSG == seen["body"]


async def test_anthropic_body_is_forwarded_byte_for_byte(gateway, mock_upstream):
    """The request body goes upstream as received: no re-serialisation (key order, spacing)."""
    raw = b'{ "stream":false,"model" : "demo-claude",  "max_tokens":3, "messages":[{"role":"user","content":"h\\u00e9"}]}'
    r = await gateway.post(
        "/v1/messages", headers={"x-api-key": TEST_KEY, "content-type": "application/json", **AV}, data=raw
    )
    assert 200 == r.status
    # The mock records the parsed body; compare through its content-length.
    seen = await last_seen(mock_upstream)
    assert str(len(raw)) == seen["headers"]["content-length"]
    assert orjson.loads(raw) == seen["body"]


async def test_anthropic_messages_streaming_relays_the_full_event_sequence(gateway):
    """A streamed /v1/messages relays every SSE event, ending with message_stop."""
    r = await gateway.post("/v1/messages", headers={"x-api-key": TEST_KEY, **AV}, json={**MSG, "stream": True})
    raw = await r.read()
    assert 200 == r.status
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["x-request-id"].startswith("req_")
    names = [n for n, _ in sse_events(raw)]
    assert ["message_start", "content_block_start", "ping"] + ["content_block_delta"] * 5 + [
        "content_block_stop", "message_delta", "message_stop"
    ] == names
    assert b"event: error" not in raw


async def test_count_tokens_is_forwarded(gateway, mock_upstream):
    """POST /v1/messages/count_tokens reaches the upstream's count_tokens path."""
    r = await gateway.post("/v1/messages/count_tokens", headers={"x-api-key": TEST_KEY, **AV}, json=MSG)
    body = await r.json()
    assert 200 == r.status
    assert body["input_tokens"] >= 1
    assert "/v1/messages/count_tokens" == (await last_seen(mock_upstream))["path"]


async def test_beta_query_string_is_passed_upstream(gateway, mock_upstream):
    """Claude Code's /v1/messages?beta=true matches the route and keeps its query string."""
    r = await gateway.post("/v1/messages?beta=true", headers={"x-api-key": TEST_KEY, **AV}, json=MSG)
    assert 200 == r.status
    assert "/v1/messages?beta=true" == (await last_seen(mock_upstream))["path"]


# ------------------------------------------------------------------ OpenAI


async def test_chat_completions_non_streaming(gateway, mock_upstream):
    """POST /v1/chat/completions returns the upstream completion with its usage."""
    r = await gateway.post("/v1/chat/completions", headers={"authorization": f"Bearer {TEST_KEY}"}, json=CHAT)
    body = await r.json()
    assert 200 == r.status
    assert "chat.completion" == body["object"]
    assert 5 == body["usage"]["completion_tokens"]
    assert "/v1/chat/completions" == (await last_seen(mock_upstream))["path"]


async def test_chat_completions_streaming_ends_with_done(gateway):
    """A streamed chat completion relays every chunk and ends with data: [DONE]."""
    r = await gateway.post(
        "/v1/chat/completions", headers={"authorization": f"Bearer {TEST_KEY}"}, json={**CHAT, "stream": True}
    )
    raw = await r.read()
    assert 200 == r.status
    events = sse_events(raw)
    assert b"[DONE]" == events[-1][1]
    chunks = [orjson.loads(d) for _, d in events[:-1]]
    assert 7 == len(chunks)  # role, 5 deltas, finish
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)


async def test_embeddings_are_forwarded(gateway, mock_upstream):
    """POST /v1/embeddings returns the upstream vectors and usage."""
    r = await gateway.post(
        "/v1/embeddings", headers={"authorization": f"Bearer {TEST_KEY}"},
        json={"model": "demo-embed", "input": ["a", "b"]},
    )
    body = await r.json()
    assert 200 == r.status
    assert 2 == len(body["data"])
    assert body["usage"]["prompt_tokens"] >= 1
    assert "/v1/embeddings" == (await last_seen(mock_upstream))["path"]


# ------------------------------------------------------------------ /v1/models


@pytest.fixture
async def listed_gateway(make_gateway, mock_upstream):
    return await make_gateway(gateway_toml(mock_upstream.base_url, extra=EXACT_ROUTES))


async def test_models_openai_shape_lists_exact_routes(listed_gateway):
    """GET /v1/models without anthropic-version answers OpenAI's list shape."""
    r = await listed_gateway.get("/v1/models", headers={"authorization": f"Bearer {TEST_KEY}"})
    body = await r.json()
    assert 200 == r.status
    assert r.headers["x-request-id"].startswith("req_")
    assert "list" == body["object"]
    assert ["demo-allowed-listed", "demo-hidden"] == [m["id"] for m in body["data"]]
    assert {"model"} == {m["object"] for m in body["data"]}


async def test_models_anthropic_shape_with_anthropic_version(listed_gateway):
    """GET /v1/models with anthropic-version answers Anthropic's paginated shape."""
    r = await listed_gateway.get("/v1/models", headers={"x-api-key": TEST_KEY, **AV})
    body = await r.json()
    assert 200 == r.status
    assert ["demo-allowed-listed", "demo-hidden"] == [m["id"] for m in body["data"]]
    assert {"model"} == {m["type"] for m in body["data"]}
    assert body["has_more"] is False
    assert "demo-allowed-listed" == body["first_id"]
    assert "demo-hidden" == body["last_id"]


async def test_models_are_filtered_by_the_keys_allowed_models(listed_gateway):
    """A key limited to demo-allowed-* sees only the models it may use."""
    r = await listed_gateway.get("/v1/models", headers={"authorization": f"Bearer {OTHER_KEY}"})
    body = await r.json()
    assert ["demo-allowed-listed"] == [m["id"] for m in body["data"]]


async def test_models_without_key_is_401(listed_gateway):
    """GET /v1/models needs a key like every data-plane path."""
    r = await listed_gateway.get("/v1/models")
    assert 401 == r.status
    assert "invalid_api_key" == (await r.json())["error"]["code"]


async def test_models_under_ak_path(listed_gateway):
    """GET /ak/{key}/v1/models authenticates from the path."""
    r = await listed_gateway.get(f"/ak/{TEST_KEY}/v1/models")
    assert 200 == r.status
    assert 2 == len((await r.json())["data"])


# ------------------------------------------------------------------ /ak/{key}


@pytest.mark.parametrize(
    ("path", "payload", "upstream_path"),
    [
        ("/v1/messages", MSG, "/v1/messages"),
        ("/v1/messages?beta=true", MSG, "/v1/messages?beta=true"),
        ("/v1/messages/count_tokens", MSG, "/v1/messages/count_tokens"),
        ("/v1/chat/completions", CHAT, "/v1/chat/completions"),
        ("/v1/embeddings", {"model": "demo-embed", "input": "x"}, "/v1/embeddings"),
    ],
)
async def test_ak_path_prefix_is_stripped_before_forwarding(gateway, mock_upstream, path, payload, upstream_path):
    """/ak/{key}/... authenticates from the path and forwards the provider's path only."""
    r = await gateway.post(f"/ak/{TEST_KEY}{path}", headers=AV, json=payload)
    assert 200 == r.status
    seen = await last_seen(mock_upstream)
    assert upstream_path == seen["path"]
    assert TEST_KEY not in orjson.dumps(seen).decode()


async def test_ak_path_streaming(gateway):
    """A streamed answer works under /ak/{key}/ too."""
    r = await gateway.post(f"/ak/{TEST_KEY}/v1/messages", headers=AV, json={**MSG, "stream": True})
    raw = await r.read()
    assert 200 == r.status
    assert "message_stop" == sse_events(raw)[-1][0]


# ------------------------------------------------------------------ key precedence


async def test_path_key_wins_over_headers(gateway):
    """The /ak/{key} key is used even when x-api-key and Bearer carry other values."""
    r = await gateway.post(
        f"/ak/{TEST_KEY}/v1/messages",
        headers={"x-api-key": "unused", "authorization": "Bearer also-unused", **AV}, json=MSG,
    )
    assert 200 == r.status


async def test_bad_path_key_is_not_rescued_by_a_good_header(gateway):
    """Precedence is strict: a wrong /ak/{key} is a 401 even with a valid x-api-key."""
    r = await gateway.post("/ak/gwk_wrong/v1/messages", headers={"x-api-key": TEST_KEY, **AV}, json=MSG)
    assert 401 == r.status


async def test_x_api_key_wins_over_bearer(gateway):
    """x-api-key is read before Authorization: Bearer."""
    ok = await gateway.post(
        "/v1/messages", headers={"x-api-key": TEST_KEY, "authorization": "Bearer wrong", **AV}, json=MSG
    )
    bad = await gateway.post(
        "/v1/messages", headers={"x-api-key": "wrong", "authorization": f"Bearer {TEST_KEY}", **AV}, json=MSG
    )
    assert 200 == ok.status
    assert 401 == bad.status


async def test_bearer_alone_works_on_anthropic_paths(gateway):
    """Recent Anthropic SDKs and Claude Code send Authorization: Bearer."""
    r = await gateway.post("/v1/messages", headers={"authorization": f"Bearer {TEST_KEY}", **AV}, json=MSG)
    assert 200 == r.status


async def test_bearer_scheme_is_case_insensitive(gateway):
    """'bearer' and 'BEARER' are the same scheme (RFC 9110)."""
    r = await gateway.post("/v1/chat/completions", headers={"authorization": f"bearer {TEST_KEY}"}, json=CHAT)
    assert 200 == r.status
