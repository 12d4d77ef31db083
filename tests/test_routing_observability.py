"""What served a request, told everywhere: response headers, the request log line of a real
``llm-gateway serve`` process, and the per-upstream metrics (attempts, retries, hedges, wins)."""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson

from tests.conftest import TEST_KEY
from tests.fixtures.routing import (  # noqa: F401 - fixture
    fallbacks,
    mocks,
    pair,
    routing_toml,
    upstream_toml,
)
from tests.test_ops_metrics import total

AUTH = {"authorization": f"Bearer {TEST_KEY}"}


def toml(a: str, b: str) -> str:
    ups = upstream_toml("a", a, retries=2, retry_base_ms=1) + upstream_toml("b", b)
    return routing_toml(ups, f"""
        [[routes]]
        match = "demo-o"
        deployments = {pair(["a"], model="demo-served")}
        fallbacks = {fallbacks(["b"])}

        [[routes]]
        match = "demo-h"
        deployments = {pair(["a"])}
        fallbacks = {fallbacks(["b"])}
        hedge_after_ms = 50
        """)


async def test_metrics_count_attempts_retries_hedges_and_wins_per_upstream(make_gateway, mocks):  # noqa: F811
    a, b = await mocks(), await mocks()
    # Request 1: a 503 once then ok (1 retry, a wins).  Request 2: a 503 three times -> b wins.
    # Request 3 (hedged): a slow to its first token, b wins the hedge.  (The retry budget starts with
    # 3 tokens and gains 0.2 a request: these 3 retries fit.)
    s503 = {"x-mock-status": "503"}
    await a.faults(steps=[s503, {}, s503, s503, s503], then={"x-mock-first-delta-ms": "2000"})
    gw = await make_gateway(toml(a.base_url, b.base_url))
    got = []
    for model, stream in (("demo-o", False), ("demo-o", False), ("demo-h", True)):
        r = await gw.post("/v1/chat/completions", headers=AUTH, json={"model": model, "stream": stream, "messages": []})
        await r.read()
        assert 200 == r.status
        got.append((r.headers["x-gateway-upstream"], r.headers["x-gateway-attempts"]))
    assert [("a-openai", "2"), ("b-openai", "4"), ("b-openai", "2")] == got
    text = await (await gw.get("/metrics")).text()

    def ev(upstream: str, event: str) -> float:
        return total(text, "gateway_upstream_events_total", upstream=upstream, event=event)

    assert (6.0, 3.0, 1.0, 0.0) == (ev("a-openai", "attempts"), ev("a-openai", "retries"), ev("a-openai", "wins"),
                                    ev("a-openai", "hedges"))
    assert (2.0, 2.0, 1.0, 1.0) == (ev("b-openai", "attempts"), ev("b-openai", "wins"), ev("b-openai", "hedges"),
                                    ev("b-openai", "hedge_wins"))


async def test_request_log_line_names_upstream_served_model_attempts_retries_hedges(serve, mocks):  # noqa: F811
    """A real serve process: the request line carries upstream, served_model, attempts, retries, hedges."""
    a, b = await mocks(), await mocks()
    await a.faults(steps=[{"x-mock-status": "500"}])
    gw = serve(toml(a.base_url, b.base_url), workers=1)
    async with aiohttp.ClientSession() as s, s.post(
        gw.base_url + "/v1/chat/completions", headers=AUTH, json={"model": "demo-o", "messages": []}
    ) as r:
        await r.read()
        assert 200 == r.status
        rid = r.headers["x-request-id"]
        assert ("a-openai", "demo-served", "2") == (
            r.headers["x-gateway-upstream"], r.headers["x-gateway-model"], r.headers["x-gateway-attempts"])
    gw.stop()
    lines: list[dict[str, Any]] = [orjson.loads(x) for x in gw.log_text().splitlines()
                                   if '"event":"request"' in x]
    line = next(x for x in lines if x["request_id"] == rid)
    assert ("demo-o", "a-openai", "demo-served", 2, 1, 0) == (
        line["model"], line["upstream"], line["served_model"], line["attempts"], line["retries"], line["hedges"])
