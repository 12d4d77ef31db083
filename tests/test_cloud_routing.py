"""Cloud kinds inside routes: model mapping, failover between a native and a cloud deployment of the
same model, usage recorded in Postgres with the public and the served model, priced by the served one."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tests.conftest import TEST_KEY
from tests.fixtures.clouds import BEDROCK_MODEL, bedrock_upstream, cloud_toml

AV = {"x-api-key": TEST_KEY, "anthropic-version": "2023-06-01"}
MESSAGES: list[Any] = [{"role": "user", "content": "route me somewhere"}]
SONNET = {"input": 3_000_000, "output": 15_000_000}  # config/prices.toml: micro-dollars per million tokens = pico-dollars per token


def native(name: str, base_url: str) -> str:
    return f"""
[upstreams.{name}]
provider = "anthropic"
base_url = "{base_url}"
api_key_env = "TEST_ANTHROPIC_KEY"
retries = 0
first_byte_timeout = 5
idle_timeout = 2
"""


def smart(first: str, second: str, first_model: str, second_model: str) -> str:
    return f"""
[[routes]]
match = "smart"
deployments = [{{ upstream = "{first}", model = "{first_model}", weight = 1000000 }}]
fallbacks = []
fallback_models = ["smart-backup"]

[[routes]]
match = "smart-backup"
deployments = [{{ upstream = "{second}", model = "{second_model}" }}]
"""


async def test_a_failing_native_deployment_fails_over_to_bedrock(sdk: Any, make_gateway: Any, bedrock: Any,
                                                                aws_keys: None, mock_upstream: Any) -> None:
    """smart -> the native Anthropic deployment (answering 503) -> Bedrock's id for the same model."""
    fake, url = bedrock
    ups = native("anthropic", mock_upstream.base_url + "/_mock/status/503") + bedrock_upstream("bedrock", url)
    gw = await make_gateway(cloud_toml(ups, smart("anthropic", "bedrock", "claude-sonnet-4-5", BEDROCK_MODEL)))
    r = await gw.post("/v1/messages", headers=AV, json={"model": "smart", "max_tokens": 5, "messages": MESSAGES})
    await r.read()
    assert 200 == r.status
    assert ("bedrock", BEDROCK_MODEL, "2") == (r.headers["x-gateway-upstream"], r.headers["x-gateway-model"],
                                               r.headers["x-gateway-attempts"])
    [seen] = fake.seen
    assert BEDROCK_MODEL == seen["model"] and "model" not in seen["body"]
    msg = await sdk.claude(gw).messages.create(model="smart", max_tokens=5, messages=MESSAGES)
    assert msg.content


async def test_a_throttled_bedrock_deployment_fails_over_to_the_native_one(make_gateway: Any, bedrock: Any,
                                                                          aws_keys: None, mock_upstream: Any) -> None:
    fake, url = bedrock
    fake.faults[:] = ["ThrottlingException"]
    ups = native("anthropic", mock_upstream.base_url) + bedrock_upstream("bedrock", url)
    gw = await make_gateway(cloud_toml(ups, smart("bedrock", "anthropic", BEDROCK_MODEL, "claude-sonnet-4-5")))
    r = await gw.post("/v1/messages", headers=AV,
                      json={"model": "smart", "max_tokens": 5, "messages": MESSAGES, "stream": True})
    raw = await r.read()
    assert 200 == r.status
    assert raw.rstrip().endswith(b'data: {"type":"message_stop"}')
    assert ("anthropic", "claude-sonnet-4-5") == (r.headers["x-gateway-upstream"], r.headers["x-gateway-model"])
    assert 1 == len(fake.seen)
    [native_req] = await mock_upstream.requests()
    assert "claude-sonnet-4-5" == native_req["body"]["model"]


async def _ledger(dsn: str, n: int) -> list[asyncpg.Record]:
    deadline = asyncio.get_running_loop().time() + 20
    while True:
        conn = await asyncpg.connect(dsn)
        try:
            rows = await conn.fetch("SELECT * FROM usage_ledger ORDER BY ts")
        finally:
            await conn.close()
        if len(rows) >= n or asyncio.get_running_loop().time() > deadline:
            return rows
        await asyncio.sleep(0.05)


async def test_bedrock_usage_is_recorded_with_public_and_served_model(sdk: Any, make_gateway: Any, bedrock: Any,
                                                                     aws_keys: None, pg_env: str,
                                                                     tmp_path: Path) -> None:
    """Database mode: JSON and stream through Bedrock each leave one ledger row, model = the public name,
    served_model = Bedrock's id, priced by it (Sonnet's price)."""
    fake, url = bedrock
    route = f"""
[[routes]]
match = "smart"
deployments = [{{ upstream = "bedrock", model = "{BEDROCK_MODEL}" }}]
"""
    gw = await make_gateway(cloud_toml(bedrock_upstream("bedrock", url), route, extra=f"""
[accounting]
journal_dir = "{tmp_path / 'journal'}"
flush_ms = 50
"""))
    client = sdk.claude(gw)
    msg = await client.messages.create(model="smart", max_tokens=5, messages=MESSAGES)
    async with client.messages.stream(model="smart", max_tokens=5, messages=MESSAGES) as stream:
        final = await stream.get_final_message()
    rows = await _ledger(pg_env, 2)
    assert 2 == len(rows)
    for row, answer in zip(rows, (msg, final), strict=True):
        assert ("smart", BEDROCK_MODEL, "bedrock", 200) == (row["model"], row["served_model"], row["upstream"], row["status"])
        assert (answer.usage.input_tokens, answer.usage.output_tokens) == (row["input_tokens"], row["output_tokens"])
        # SONNET is USD per million tokens x 10^6: exactly that many pico-dollars per token.
        expected = row["input_tokens"] * SONNET["input"] + row["output_tokens"] * SONNET["output"]
        assert expected == row["cost_pico"]
        assert row["priced"] is True
    assert [False, True] == [r["streamed"] for r in rows]


async def test_vertex_behind_a_public_name(sdk: Any, make_gateway: Any, vertex: Any) -> None:
    fake, url, creds = vertex
    ups = f"""
[upstreams.vertex]
provider = "vertex"
project = "test-project"
region = "us-east5"
base_url = "{url}"
credentials_file = "{creds}"
"""
    route = """
[[routes]]
match = "smart"
deployments = [{ upstream = "vertex", model = "claude-sonnet-4-5@20250929" }]
"""
    gw = await make_gateway(cloud_toml(ups, route))
    msg = await sdk.claude(gw).messages.create(model="smart", max_tokens=5, messages=MESSAGES)
    assert msg.content
    assert fake.seen[0]["path"].endswith("/models/claude-sonnet-4-5@20250929:rawPredict")


@pytest.mark.parametrize("stream", [False, True])
async def test_azure_deployment_behind_a_public_name(sdk: Any, make_gateway: Any, azure: Any, stream: bool) -> None:
    """gpt-4o served by an Azure deployment: the upstream's `deployment` picks the URL, the route's model
    (gpt-4o, priced) is what is recorded as served."""
    fake, url = azure
    ups = f"""
[upstreams.azure]
provider = "azure-openai"
base_url = "{url}"
deployment = "gpt-4o-prod"
api_version = "2024-10-21"
api_key_env = "AZURE_TEST_KEY"
"""
    route = """
[[routes]]
match = "smart-gpt"
deployments = [{ upstream = "azure", model = "gpt-4o" }]
"""
    gw = await make_gateway(cloud_toml(ups, route))
    r = await gw.post("/v1/chat/completions", headers={"authorization": f"Bearer {TEST_KEY}"},
                      json={"model": "smart-gpt", "messages": MESSAGES, "stream": stream})
    await r.read()
    assert 200 == r.status
    assert ("azure", "gpt-4o") == (r.headers["x-gateway-upstream"], r.headers["x-gateway-model"])
    assert "/openai/deployments/gpt-4o-prod/chat/completions" == fake.seen[0]["path"]
    assert "gpt-4o" == fake.seen[0]["body"]["model"]


async def test_a_too_long_prompt_on_bedrock_takes_the_context_fallback(make_gateway: Any, bedrock: Any,
                                                                      aws_keys: None, mock_upstream: Any) -> None:
    """Bedrock's "Input is too long" ValidationException is a context-length error: with
    context_fallback_models the bigger-context route answers; without, the 400 is relayed."""
    fake, url = bedrock
    ups = native("anthropic", mock_upstream.base_url) + bedrock_upstream("bedrock", url)
    routes = f"""
[[routes]]
match = "smart"
deployments = [{{ upstream = "bedrock", model = "{BEDROCK_MODEL}" }}]
context_fallback_models = ["long"]

[[routes]]
match = "long"
deployments = [{{ upstream = "anthropic", model = "claude-sonnet-4-5-1m" }}]

[[routes]]
match = "short"
deployments = [{{ upstream = "bedrock", model = "{BEDROCK_MODEL}" }}]
"""
    gw = await make_gateway(cloud_toml(ups, routes))
    too_long = [{"role": "user", "content": "TOO-LONG"}]
    r = await gw.post("/v1/messages", headers=AV, json={"model": "smart", "max_tokens": 5, "messages": too_long})
    await r.read()
    assert 200 == r.status
    assert ("anthropic", "claude-sonnet-4-5-1m") == (r.headers["x-gateway-upstream"], r.headers["x-gateway-model"])
    r = await gw.post("/v1/messages", headers=AV, json={"model": "short", "max_tokens": 5, "messages": too_long})
    body = await r.json()
    assert 400 == r.status
    assert "invalid_request_error" == body["error"]["type"]
    assert body["error"]["message"].startswith("prompt is too long (Bedrock ValidationException: Input is too long")


async def test_a_slow_native_stream_is_hedged_to_bedrock(make_gateway: Any, bedrock: Any, aws_keys: None,
                                                         mock_upstream: Any) -> None:
    """hedge_after_ms: the native deployment has no first token after 100 ms; the hedge goes to Bedrock,
    whose converted event stream wins; the client gets one clean Anthropic stream from Bedrock."""
    fake, url = bedrock
    ups = native("anthropic", mock_upstream.base_url) + bedrock_upstream("bedrock", url)
    routes = smart("anthropic", "bedrock", "claude-sonnet-4-5", BEDROCK_MODEL).replace(
        'fallback_models = ["smart-backup"]', 'fallback_models = ["smart-backup"]\nhedge_after_ms = 100')
    gw = await make_gateway(cloud_toml(ups, routes))
    r = await gw.post("/v1/messages", headers={**AV, "x-mock-ttft-ms": "3000"},
                      json={"model": "smart", "max_tokens": 5, "messages": MESSAGES, "stream": True})
    raw = await r.read()
    assert 200 == r.status
    assert ("bedrock", BEDROCK_MODEL, "2") == (r.headers["x-gateway-upstream"], r.headers["x-gateway-model"],
                                               r.headers["x-gateway-attempts"])
    assert raw.startswith(b"event: message_start\n") and raw.endswith(b'event: message_stop\ndata: {"type":"message_stop"}\n\n')
    assert r.headers["content-type"].startswith("text/event-stream")
    assert 1 == len(fake.seen)


async def test_an_openai_client_reaches_bedrock_through_translation(sdk: Any, make_gateway: Any, bedrock: Any,
                                                                    aws_keys: None) -> None:
    """Both dialects: the openai SDK on a route whose only deployment is Bedrock gets a Chat Completion
    (JSON and streamed) translated from Bedrock's Anthropic answer; Bedrock saw a signed Messages body."""
    fake, url = bedrock
    route = f"""
[[routes]]
match = "claude-via-bedrock"
deployments = [{{ upstream = "bedrock", model = "{BEDROCK_MODEL}" }}]
"""
    gw = await make_gateway(cloud_toml(bedrock_upstream("bedrock", url), route))
    client = sdk.gpt(gw)
    done = await client.chat.completions.create(model="claude-via-bedrock", max_tokens=5,
                                                messages=[{"role": "user", "content": "route me somewhere"}])
    assert "chat.completion" == done.object
    assert done.choices[0].message.content
    assert done.usage is not None and done.usage.completion_tokens > 0
    chunks = [c async for c in await client.chat.completions.create(
        model="claude-via-bedrock", max_tokens=5, stream=True,
        messages=[{"role": "user", "content": "route me somewhere"}])]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    assert 2 == len(fake.seen)
    for seen in fake.seen:
        assert BEDROCK_MODEL == seen["model"] and "model" not in seen["body"]
        assert "messages" in seen["body"] and seen["body"]["max_tokens"] == 5
