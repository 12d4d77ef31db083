"""End-to-end smoke of the hot path against the in-process gateway and mock."""

from __future__ import annotations

from tests.conftest import TEST_KEY


async def test_anthropic_message_is_forwarded_with_request_id_and_timing(gateway, mock_upstream):
    """A non-streamed Anthropic call returns the upstream body plus the gateway's headers."""
    r = await gateway.post(
        "/v1/messages",
        headers={"x-api-key": TEST_KEY, "anthropic-version": "2023-06-01"},
        json={"model": "demo-claude", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]},
    )
    body = await r.json()
    assert 200 == r.status
    assert "message" == body["type"]
    assert r.headers["x-request-id"].startswith("req_")
    assert r.headers["server-timing"].startswith("gateway;dur=")
    seen = (await mock_upstream.requests())[-1]
    assert "sk-ant-upstream-secret" == seen["headers"]["x-api-key"]
    assert TEST_KEY not in str(seen["headers"])
