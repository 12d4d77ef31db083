"""The data plane in a real ``llm-gateway serve`` (2 workers), as production runs it."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from tests.conftest import TEST_KEY, gateway_toml

AV = {"anthropic-version": "2023-06-01"}
MSG = {"model": "demo-claude", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}], "stream": True}
CHAT = {"model": "demo-gpt", "messages": [{"role": "user", "content": "hi"}], "stream": True}


@pytest.mark.slow
async def test_serve_client_disconnect_cancels_upstream_and_streams_work(serve, cancelling_mock):
    """Under serve, a client leaving mid-stream cancels the upstream at once; both dialects stream fully."""
    gw = serve(gateway_toml(cancelling_mock.base_url), workers=2)
    async with aiohttp.ClientSession() as s:
        for path, body, headers, end in (
            ("/v1/messages", MSG, {"x-api-key": TEST_KEY, **AV}, b"event: message_stop"),
            ("/v1/chat/completions", CHAT, {"authorization": f"Bearer {TEST_KEY}"}, b"data: [DONE]"),
        ):
            async with s.post(gw.base_url + path, headers=headers, json=body) as r:
                assert 200 == r.status
                assert end in await r.read()
        r = await s.post(
            gw.base_url + "/v1/messages",
            headers={"x-api-key": TEST_KEY, **AV, "x-mock-chunks": "400", "x-mock-chunk-gap-ms": "50"},
            json=MSG,
        )
        assert 200 == r.status
        await r.content.readany()
        r.close()
    async with asyncio.timeout(10):
        while (await cancelling_mock.stats()).get("streams_cancelled", 0) < 1:
            await asyncio.sleep(0.02)
    stats = await cancelling_mock.stats()
    assert 2 == stats["streams_completed"]
    assert 0 == gw.stop()
