"""Translation end to end: each official SDK through the gateway to the mock upstream of the OTHER dialect.

openai SDK -> /v1/chat/completions -> Anthropic deployment, and anthropic SDK
-> /v1/messages -> OpenAI deployment: answers, streams, tool round trips,
images, upstream errors raising the right SDK exception, refused and dropped
parameters, a cut stream, failover from one dialect to the other, and one
usage row per request in real Postgres priced by the served model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest

from tests import test_sdk
from tests.conftest import gateway_toml, sha
from tests.test_ledger_gateway import cost, ledger_toml, mock_input_tokens, wait_rows
from tests.test_sdk import claude, gpt

http = test_sdk.http  # the SDKs' shared httpx client (a fixture)

ROUTES = """
    [[routes]]
    match = "gpt-on-claude"
    deployments = [{ upstream = "mock-anthropic", model = "claude-sonnet-4-5" }]

    [[routes]]
    match = "claude-on-gpt"
    deployments = [{ upstream = "mock-openai", model = "gpt-4o" }]

    [[routes]]
    match = "lenient"
    drop_unsupported = true
    default_max_tokens = 321
    deployments = [{ upstream = "mock-anthropic", model = "claude-sonnet-4-5" }]
    """

PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
OAI_TOOLS: list[Any] = [{"type": "function", "function": {"name": "get_weather", "description": "weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
ANT_TOOLS: list[Any] = [{"name": "get_weather", "description": "weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}]
USER: list[Any] = [{"role": "user", "content": "hi"}]

# USD per million tokens as integer micro-dollars (config/prices.toml)
SONNET = {"input": 3_000_000, "output": 15_000_000, "cache_write": 3_750_000, "cache_read": 300_000}
GPT_4O = {"input": 2_500_000, "output": 10_000_000, "cache_write": 0, "cache_read": 1_250_000}


@pytest.fixture
async def gw(make_gateway, mock_upstream):
    return await make_gateway(gateway_toml(mock_upstream.base_url, extra=ROUTES))


async def last_upstream_request(mock_upstream) -> dict[str, Any]:
    return (await mock_upstream.requests())[-1]  # type: ignore[no-any-return]


# ------------------------------------------------------------------ openai SDK -> Anthropic upstream


async def test_openai_chat_served_by_anthropic(gw, http, mock_upstream):
    raw = await gpt(gw, http).chat.completions.with_raw_response.create(
        model="gpt-on-claude", messages=[{"role": "system", "content": "be brief"}, *USER], stop=["END"], user="u-7", temperature=0.3
    )
    resp = raw.parse()
    assert "lorem " * 5 == resp.choices[0].message.content
    assert "stop" == resp.choices[0].finish_reason
    assert resp.usage is not None and 5 == resp.usage.completion_tokens
    assert ("mock-anthropic", "claude-sonnet-4-5") == (raw.headers["x-gateway-upstream"], raw.headers["x-gateway-model"])
    seen = await last_upstream_request(mock_upstream)
    assert "/v1/messages" == seen["path"]
    assert "2023-06-01" == seen["headers"]["anthropic-version"]
    assert "sk-ant-upstream-secret" == seen["headers"]["x-api-key"] and "authorization" not in seen["headers"]
    assert {
        "model": "claude-sonnet-4-5", "system": "be brief", "messages": USER, "max_tokens": 4096,
        "stop_sequences": ["END"], "temperature": 0.3, "metadata": {"user_id": "u-7"},
    } == seen["body"]


async def test_openai_stream_served_by_anthropic_with_and_without_usage(gw, http):
    client = gpt(gw, http)
    stream = await client.chat.completions.create(model="gpt-on-claude", messages=USER, stream=True)
    chunks = [c async for c in stream]
    assert "lorem " * 5 == "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "stop" == chunks[-1].choices[0].finish_reason
    assert all(c.usage is None for c in chunks)
    stream = await client.chat.completions.create(
        model="gpt-on-claude", messages=USER, stream=True, stream_options={"include_usage": True}
    )
    chunks = [c async for c in stream]
    assert chunks[-1].usage is not None and 5 == chunks[-1].usage.completion_tokens and [] == chunks[-1].choices


async def test_openai_tool_round_trip_served_by_anthropic(gw, http, mock_upstream):
    """call -> tool result -> answer, streamed and not, through Anthropic's tool_use/tool_result blocks."""
    client = gpt(gw, http)
    first = await client.chat.completions.create(model="gpt-on-claude", messages=[{"role": "user", "content": "weather in Paris?"}], tools=OAI_TOOLS, tool_choice="auto")
    call = first.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert "tool_calls" == first.choices[0].finish_reason
    assert ("get_weather", '{"city":"mock-city"}') == (call.function.name, call.function.arguments)  # type: ignore[union-attr]
    # The same, streamed: argument pieces accumulate to the same JSON string.
    stream = await client.chat.completions.create(model="gpt-on-claude", messages=[{"role": "user", "content": "weather?"}], tools=OAI_TOOLS, stream=True)
    args, names, ids = "", [], []
    async for c in stream:
        for tc in c.choices[0].delta.tool_calls or () if c.choices else ():
            args += tc.function.arguments or "" if tc.function else ""
            if tc.id:
                ids.append(tc.id)
                names.append(tc.function.name if tc.function else None)
    assert ('{"city":"mock-city"}', ["get_weather"]) == (args, names)
    history: list[Any] = [
        {"role": "user", "content": "weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": call.id, "type": "function", "function": {"name": "get_weather", "arguments": call.function.arguments}}]},  # type: ignore[union-attr]
        {"role": "tool", "tool_call_id": call.id, "content": "sunny"},
    ]
    final = await client.chat.completions.create(model="gpt-on-claude", messages=history, tools=OAI_TOOLS)
    assert "tool said: sunny" == final.choices[0].message.content
    sent = (await last_upstream_request(mock_upstream))["body"]["messages"]
    assert {"type": "tool_use", "id": call.id, "name": "get_weather", "input": {"city": "mock-city"}} == sent[1]["content"][0]
    assert [{"type": "tool_result", "tool_use_id": call.id, "content": "sunny"}] == sent[2]["content"]


async def test_openai_images_reach_anthropic_as_image_sources(gw, http, mock_upstream):
    content: Any = [
        {"type": "text", "text": "what are these?"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
        {"type": "image_url", "image_url": {"url": "https://example.test/cat.jpg", "detail": "low"}},
    ]
    await gpt(gw, http).chat.completions.create(model="gpt-on-claude", messages=[{"role": "user", "content": content}])
    blocks = (await last_upstream_request(mock_upstream))["body"]["messages"][0]["content"]
    assert [
        {"type": "text", "text": "what are these?"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
        {"type": "image", "source": {"type": "url", "url": "https://example.test/cat.jpg"}},
    ] == blocks


@pytest.mark.parametrize(
    ("status", "exc", "seen_status"),
    [(429, openai.RateLimitError, 429), (400, openai.BadRequestError, 400), (529, openai.InternalServerError, 503), (500, openai.InternalServerError, 500)],
)
async def test_anthropic_upstream_errors_raise_the_openai_sdk_exception(gw, http, status, exc, seen_status):
    with pytest.raises(exc) as info:
        await gpt(gw, http, retries=0).chat.completions.create(
            model="gpt-on-claude", messages=USER, extra_headers={"x-mock-status": str(status)}
        )
    assert seen_status == info.value.status_code
    assert {"message": f"mock error {status}", "type": info.value.type, "param": None, "code": info.value.code} == info.value.body


async def test_openai_parameters_without_equivalent_are_refused_or_dropped(gw, http, mock_upstream):
    with pytest.raises(openai.BadRequestError) as info:
        await gpt(gw, http).chat.completions.create(model="gpt-on-claude", messages=USER, n=2)
    assert "n: " in info.value.message and "drop_unsupported" in info.value.message
    assert [] == await mock_upstream.requests()
    raw = await gpt(gw, http).chat.completions.with_raw_response.create(model="lenient", messages=USER, n=2, logprobs=True)
    assert "lorem " * 5 == raw.parse().choices[0].message.content
    assert "n,logprobs" == raw.headers["x-gateway-dropped"]
    seen = await last_upstream_request(mock_upstream)
    assert 321 == seen["body"]["max_tokens"] and "n" not in seen["body"]


async def test_openai_sdk_raises_on_a_cut_translated_stream(gw, http):
    stream = await gpt(gw, http).chat.completions.create(
        model="gpt-on-claude", messages=USER, stream=True, extra_headers={"x-mock-drop-after": "2"}
    )
    texts = []
    with pytest.raises(openai.APIError) as info:
        async for c in stream:
            texts.append(c.choices[0].delta.content or "")
    assert "incomplete" in info.value.message
    assert "lorem lorem " == "".join(texts)


# ------------------------------------------------------------------ anthropic SDK -> OpenAI upstream


async def test_anthropic_messages_served_by_openai(gw, http, mock_upstream):
    raw = await claude(gw, http).messages.with_raw_response.create(
        model="claude-on-gpt", max_tokens=50, system="be brief", messages=USER, stop_sequences=["END"], metadata={"user_id": "u-1"}
    )
    msg = await raw.parse()
    assert "lorem " * 5 == msg.content[0].text  # type: ignore[union-attr]
    assert ("end_turn", 5) == (msg.stop_reason, msg.usage.output_tokens)
    assert msg.usage.input_tokens > 0
    assert "gpt-4o" == raw.headers["x-gateway-model"]
    seen = await last_upstream_request(mock_upstream)
    assert "/v1/chat/completions" == seen["path"]
    assert "Bearer sk-openai-upstream-secret" == seen["headers"]["authorization"] and "x-api-key" not in seen["headers"]
    assert {
        "model": "gpt-4o", "messages": [{"role": "system", "content": "be brief"}, *USER],
        "max_completion_tokens": 50, "stop": ["END"], "user": "u-1",
    } == seen["body"]


async def test_anthropic_stream_served_by_openai(gw, http, mock_upstream):
    async with claude(gw, http).messages.stream(model="claude-on-gpt", max_tokens=10, messages=USER) as s:
        texts = [t async for t in s.text_stream]
        final = await s.get_final_message()
    assert ["lorem "] * 5 == texts
    assert ("end_turn", 5) == (final.stop_reason, final.usage.output_tokens)
    assert final.usage.input_tokens == mock_input_tokens((await last_upstream_request(mock_upstream))["body"])
    assert {"include_usage": True} == (await last_upstream_request(mock_upstream))["body"]["stream_options"]


async def test_anthropic_tool_round_trip_served_by_openai(gw, http, mock_upstream):
    client = claude(gw, http)
    first = await client.messages.create(model="claude-on-gpt", max_tokens=50, messages=[{"role": "user", "content": "weather?"}], tools=ANT_TOOLS)
    use = first.content[0]
    assert "tool_use" == first.stop_reason
    assert ("tool_use", "get_weather", {"city": "mock-city"}) == (use.type, use.name, use.input)  # type: ignore[union-attr]
    async with client.messages.stream(model="claude-on-gpt", max_tokens=50, messages=[{"role": "user", "content": "weather?"}], tools=ANT_TOOLS) as s:
        streamed = await s.get_final_message()
    assert [("tool_use", "get_weather", {"city": "mock-city"})] == [(b.type, b.name, b.input) for b in streamed.content]  # type: ignore[union-attr]
    assert "tool_use" == streamed.stop_reason
    history: list[Any] = [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": use.id, "name": "get_weather", "input": {"city": "mock-city"}}]},  # type: ignore[union-attr]
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "sunny"}]},  # type: ignore[union-attr]
    ]
    final = await client.messages.create(model="claude-on-gpt", max_tokens=50, messages=history, tools=ANT_TOOLS)
    assert "tool said: sunny" == final.content[0].text  # type: ignore[union-attr]
    sent = (await last_upstream_request(mock_upstream))["body"]["messages"]
    assert [{"id": use.id, "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"mock-city"}'}}] == sent[1]["tool_calls"]  # type: ignore[union-attr]
    assert {"role": "tool", "tool_call_id": use.id, "content": "sunny"} == sent[2]  # type: ignore[union-attr]


async def test_anthropic_image_reaches_openai_as_data_url(gw, http, mock_upstream):
    content: Any = [{"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}}, {"type": "text", "text": "what is it?"}]
    await claude(gw, http).messages.create(model="claude-on-gpt", max_tokens=10, messages=[{"role": "user", "content": content}])
    sent = (await last_upstream_request(mock_upstream))["body"]["messages"][0]["content"]
    assert [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}}, {"type": "text", "text": "what is it?"}] == sent


@pytest.mark.parametrize(
    ("status", "exc", "seen_status"),
    [(429, anthropic.RateLimitError, 429), (400, anthropic.BadRequestError, 400), (503, anthropic.InternalServerError, 529), (500, anthropic.InternalServerError, 500)],
)
async def test_openai_upstream_errors_raise_the_anthropic_sdk_exception(gw, http, status, exc, seen_status):
    with pytest.raises(exc) as info:
        await claude(gw, http, retries=0).messages.create(
            model="claude-on-gpt", max_tokens=10, messages=USER, extra_headers={"x-mock-status": str(status)}
        )
    assert seen_status == info.value.status_code
    assert f"mock error {status}" in info.value.message


async def test_anthropic_thinking_to_an_openai_model_is_refused_by_name(gw, http, mock_upstream):
    with pytest.raises(anthropic.BadRequestError) as info:
        await claude(gw, http).messages.create(
            model="claude-on-gpt", max_tokens=2000, messages=USER, thinking={"type": "enabled", "budget_tokens": 1024}
        )
    assert "thinking: " in info.value.message
    assert [] == await mock_upstream.requests()


async def test_anthropic_sdk_raises_on_a_cut_translated_stream(gw, http):
    with pytest.raises(anthropic.APIStatusError) as info:
        async with claude(gw, http).messages.stream(
            model="claude-on-gpt", max_tokens=10, messages=USER, extra_headers={"x-mock-drop-after": "2"}
        ) as s:
            async for _ in s.text_stream:
                pass
    assert "incomplete" in str(info.value)


# ------------------------------------------------------------------ routing across dialects, accounting


FAILOVER = """
    [upstreams.broken-openai]
    provider = "openai"
    base_url = "{base}/_mock/status/503"
    api_key_env = "TEST_OPENAI_KEY"
    retries = 0

    [upstreams.broken-anthropic]
    provider = "anthropic"
    base_url = "{base}/_mock/status/529"
    api_key_env = "TEST_ANTHROPIC_KEY"
    retries = 0

    [[routes]]
    match = "gpt-first"
    deployments = [{{ upstream = "broken-openai", model = "gpt-4o" }}]
    fallback_models = ["claude-backup"]

    [[routes]]
    match = "claude-backup"
    deployments = [{{ upstream = "mock-anthropic", model = "claude-sonnet-4-5" }}]

    [[routes]]
    match = "claude-first"
    deployments = [{{ upstream = "broken-anthropic", model = "claude-sonnet-4-5" }}]
    fallback_models = ["gpt-backup"]

    [[routes]]
    match = "gpt-backup"
    deployments = [{{ upstream = "mock-openai", model = "gpt-4o" }}]
    """


async def test_fallback_models_fail_over_to_the_other_dialect_translated(make_gateway, mock_upstream, http):
    """OpenAI's deployment fails -> Claude answers the openai SDK; Anthropic's fails -> GPT answers the anthropic SDK."""
    gw = await make_gateway(gateway_toml(mock_upstream.base_url, extra=FAILOVER.format(base=mock_upstream.base_url)))
    raw = await gpt(gw, http, retries=0).chat.completions.with_raw_response.create(model="gpt-first", messages=USER)
    assert "lorem " * 5 == raw.parse().choices[0].message.content
    assert ("mock-anthropic", "claude-sonnet-4-5", "2") == (raw.headers["x-gateway-upstream"], raw.headers["x-gateway-model"], raw.headers["x-gateway-attempts"])
    async with claude(gw, http, retries=0).messages.stream(model="claude-first", max_tokens=10, messages=USER) as s:
        assert ["lorem "] * 5 == [t async for t in s.text_stream]
    paths = [r["path"] for r in await mock_upstream.requests()]
    assert ["/_mock/status/503/v1/chat/completions", "/v1/messages", "/_mock/status/529/v1/messages", "/v1/chat/completions"] == paths


async def test_a_route_with_both_kinds_serves_each_client_in_its_own_dialect_untranslated(make_gateway, mock_upstream):
    """demo-* lists an Anthropic and an OpenAI deployment: each client goes to its own deployment, untranslated."""
    gw = await make_gateway(gateway_toml(mock_upstream.base_url))
    body = b'{"model":"demo-gpt",   "messages":[{"role":"user","content":"hi"}]}'
    for _ in range(5):
        r = await gw.post("/v1/chat/completions", data=body, headers={"authorization": "Bearer " + test_sdk.TEST_KEY, "content-type": "application/json"})
        assert 200 == r.status
        assert "mock-openai" == r.headers["x-gateway-upstream"]
    seen = await mock_upstream.requests()
    assert {"/v1/chat/completions"} == {r["path"] for r in seen}
    assert {"model": "demo-gpt", "messages": [{"role": "user", "content": "hi"}]} == seen[0]["body"]


async def test_translated_requests_give_one_ledger_row_each_priced_by_the_served_model(make_gateway, mock_upstream, pg_env, tmp_path: Path, http):
    gw = await make_gateway(ledger_toml(mock_upstream.base_url, tmp_path, extra=ROUTES))
    cache = {"x-mock-cache-read": "30"}
    ids = {}
    raw = await gpt(gw, http).chat.completions.with_raw_response.create(model="gpt-on-claude", messages=USER, extra_headers=cache)
    ids[raw.headers["x-request-id"]] = ("gpt-on-claude", "claude-sonnet-4-5", False, SONNET)
    stream = await gpt(gw, http).chat.completions.with_raw_response.create(model="gpt-on-claude", messages=USER, stream=True, extra_headers=cache)
    async for _ in stream.parse():
        pass
    ids[stream.headers["x-request-id"]] = ("gpt-on-claude", "claude-sonnet-4-5", True, SONNET)
    raw2 = await claude(gw, http).messages.with_raw_response.create(model="claude-on-gpt", max_tokens=10, messages=USER, extra_headers=cache)
    ids[raw2.headers["x-request-id"]] = ("claude-on-gpt", "gpt-4o", False, GPT_4O)
    async with claude(gw, http).messages.with_streaming_response.create(model="claude-on-gpt", max_tokens=10, messages=USER, stream=True, extra_headers=cache) as s:
        await s.read()
        ids[s.headers["x-request-id"]] = ("claude-on-gpt", "gpt-4o", True, GPT_4O)
    seen = await mock_upstream.requests()
    rows = await wait_rows(pg_env, 4)
    assert set(ids) == set(rows)
    for rid, (public, served, streamed, price) in ids.items():
        row = rows[rid]
        upstream_body = next(r["body"] for r in seen if r["body"].get("model") == served and bool(r["body"].get("stream")) == streamed)
        inp = mock_input_tokens(upstream_body)
        assert (public, served, streamed, False, 200) == (row["model"], row["served_model"], row["streamed"], row["partial"], row["status"])
        assert (inp, 5, 30) == (row["input_tokens"], row["output_tokens"], row["cache_read_tokens"]), rid
        assert cost(inp, 5, 0, 30, price) == row["cost_pico"]


async def test_translated_default_max_tokens_respects_the_keys_max_tokens_limit(make_gateway, mock_upstream, http):
    """An OpenAI client that sends no max_tokens to an Anthropic deployment: the route's default,
    capped by the key's max_tokens limit (never a refusal for a number the client did not send)."""
    capped = "gwk_test_" + "c" * 32
    gw = await make_gateway(gateway_toml(mock_upstream.base_url, extra=ROUTES + f"""
        [[keys]]
        name = "capped"
        key_sha256 = "{sha(capped)}"
        limits = {{ max_tokens = 100 }}
        """))
    resp = await gpt(gw, http, capped).chat.completions.create(model="gpt-on-claude", messages=USER)
    assert "lorem " * 5 == resp.choices[0].message.content
    assert 100 == (await last_upstream_request(mock_upstream))["body"]["max_tokens"]
    with pytest.raises(openai.BadRequestError):  # what the client itself asks is still checked
        await gpt(gw, http, capped).chat.completions.create(model="gpt-on-claude", messages=USER, max_tokens=500)


@pytest.mark.parametrize("sdk", ["openai", "anthropic"])
async def test_an_upstream_error_event_mid_stream_reaches_the_client_in_its_dialect(gw, http, sdk):
    """The upstream's own in-stream error (after 2 deltas) is translated: each SDK raises its API error."""
    headers = {"x-mock-error-after": "2"}
    if sdk == "openai":
        stream = await gpt(gw, http).chat.completions.create(model="gpt-on-claude", messages=USER, stream=True, extra_headers=headers)
        with pytest.raises(openai.APIError) as info:
            async for _ in stream:
                pass
        assert "mock overloaded mid-stream" == info.value.message
    else:
        with pytest.raises(anthropic.APIStatusError) as ainfo:
            async with claude(gw, http).messages.stream(model="claude-on-gpt", max_tokens=10, messages=USER, extra_headers=headers) as s:
                async for _ in s.text_stream:
                    pass
        assert "mock overloaded mid-stream" in str(ainfo.value)


@pytest.mark.slow
async def test_both_sdks_through_a_real_serve_to_the_other_dialect(serve, mock_upstream, http):
    """``llm-gateway serve`` (2 workers): the openai SDK answered by Anthropic and the anthropic SDK by
    OpenAI, JSON and streamed, with a tool call each way."""
    gw = serve(gateway_toml(mock_upstream.base_url, extra=ROUTES), workers=2)
    oai = openai.AsyncOpenAI(base_url=gw.base_url + "/v1", api_key=test_sdk.TEST_KEY, http_client=http[0], max_retries=0)
    ant = anthropic.AsyncAnthropic(base_url=gw.base_url, api_key=test_sdk.TEST_KEY, http_client=http[0], max_retries=0)
    r = await oai.chat.completions.create(model="gpt-on-claude", messages=USER)
    assert "lorem " * 5 == r.choices[0].message.content
    stream = await oai.chat.completions.create(model="gpt-on-claude", messages=USER, stream=True)
    assert "lorem " * 5 == "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    call = (await oai.chat.completions.create(model="gpt-on-claude", messages=USER, tools=OAI_TOOLS)).choices[0].message.tool_calls
    assert call is not None and '{"city":"mock-city"}' == call[0].function.arguments  # type: ignore[union-attr]
    m = await ant.messages.create(model="claude-on-gpt", max_tokens=10, messages=USER)
    assert "lorem " * 5 == m.content[0].text  # type: ignore[union-attr]
    async with ant.messages.stream(model="claude-on-gpt", max_tokens=10, messages=USER) as s:
        assert "lorem " * 5 == "".join([t async for t in s.text_stream])
    use = (await ant.messages.create(model="claude-on-gpt", max_tokens=10, messages=USER, tools=ANT_TOOLS)).content[0]
    assert ("tool_use", {"city": "mock-city"}) == (use.type, use.input)  # type: ignore[union-attr]
    assert ["/v1/messages"] * 3 + ["/v1/chat/completions"] * 3 == [x["path"] for x in await mock_upstream.requests()]
    # images and errors, each way
    image: Any = [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}}]
    await oai.chat.completions.create(model="gpt-on-claude", messages=[{"role": "user", "content": image}])
    assert "base64" == (await last_upstream_request(mock_upstream))["body"]["messages"][0]["content"][0]["source"]["type"]
    no_retry = {"x-mock-retry-after": "0"}
    for status, exc in ((429, openai.RateLimitError), (400, openai.BadRequestError), (529, openai.InternalServerError)):
        with pytest.raises(exc):
            await oai.chat.completions.create(model="gpt-on-claude", messages=USER, extra_headers={"x-mock-status": str(status), **no_retry})
    for status, aexc in ((429, anthropic.RateLimitError), (400, anthropic.BadRequestError), (503, anthropic.InternalServerError)):
        with pytest.raises(aexc) as info:
            await ant.messages.create(model="claude-on-gpt", max_tokens=10, messages=USER, extra_headers={"x-mock-status": str(status), **no_retry})
        assert (529 if status == 503 else status) == info.value.status_code


async def test_a_context_length_error_falls_back_to_a_longer_model_of_the_other_dialect(make_gateway, mock_upstream, http):
    """OpenAI says context_length_exceeded; context_fallback_models names a Claude route: the openai SDK
    gets Claude's answer, translated."""
    import aiohttp

    gw = await make_gateway(gateway_toml(mock_upstream.base_url, extra="""
        [[routes]]
        match = "gpt-short"
        deployments = [{ upstream = "mock-openai", model = "gpt-4o" }]
        context_fallback_models = ["claude-long"]

        [[routes]]
        match = "claude-long"
        deployments = [{ upstream = "mock-anthropic", model = "claude-sonnet-4-5" }]
        """))
    async with aiohttp.ClientSession() as s, s.post(
        mock_upstream.base_url + "/_mock/faults",
        json={"steps": [{"x-mock-status": "400", "x-mock-error": "context_length"}], "then": {}},
    ) as r:
        assert 204 == r.status
    raw = await gpt(gw, http, retries=0).chat.completions.with_raw_response.create(model="gpt-short", messages=USER)
    assert "lorem " * 5 == raw.parse().choices[0].message.content
    assert "claude-sonnet-4-5" == raw.headers["x-gateway-model"]
    assert ["/v1/chat/completions", "/v1/messages"] == [x["path"] for x in await mock_upstream.requests()]


async def test_thinking_and_its_signatures_pass_untouched_on_a_same_dialect_route(gw, http, mock_upstream):
    """Only a translated request refuses thinking: to an Anthropic deployment it goes as sent."""
    history: list[Any] = [
        {"role": "user", "content": "think"},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "hmm", "signature": "sig-abc"}, {"type": "text", "text": "ok"}]},
        {"role": "user", "content": "again"},
    ]
    await claude(gw, http).messages.create(
        model="demo-claude", max_tokens=2000, messages=history, thinking={"type": "enabled", "budget_tokens": 1024}
    )
    seen = (await last_upstream_request(mock_upstream))["body"]
    assert ({"type": "enabled", "budget_tokens": 1024}, history) == (seen["thinking"], seen["messages"])
