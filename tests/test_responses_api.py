"""POST /v1/responses (OpenAI Responses API) through the gateway with the official openai SDK.

JSON and SSE, tool calls, upstream errors, a cut stream, and one usage row
per request in real Postgres with the tokens of ``usage`` /
``response.completed`` (cached input tokens split out).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import openai
import orjson
import pytest

from tests import test_sdk
from tests.conftest import gateway_toml
from tests.test_ledger_gateway import ledger_toml, mock_input_tokens, wait_rows
from tests.test_sdk import gpt

http = test_sdk.http  # the SDKs' shared httpx client (a fixture)

TOOLS: list[Any] = [{"type": "function", "name": "get_weather", "description": "weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]


async def test_responses_json(gateway, http):
    resp = await gpt(gateway, http).responses.create(model="demo-gpt", input="hi")
    assert "lorem " * 5 == resp.output_text
    assert resp.usage is not None and 5 == resp.usage.output_tokens
    assert "completed" == resp.status


async def test_responses_stream_events_and_final_usage(gateway, http):
    async with gpt(gateway, http).responses.stream(model="demo-gpt", input="hi") as stream:
        deltas = [e.delta async for e in stream if e.type == "response.output_text.delta"]
        final = await stream.get_final_response()
    assert ["lorem "] * 5 == deltas
    assert final.usage is not None and 5 == final.usage.output_tokens


async def test_responses_tool_call_round_trip(gateway, http, mock_upstream):
    """The function call comes back as a function_call item; its output, sent back, reaches the model."""
    client = gpt(gateway, http)
    first = await client.responses.create(model="demo-gpt", input="weather in Paris?", tools=TOOLS)
    call = first.output[0]
    assert "function_call" == call.type and "get_weather" == call.name  # type: ignore[union-attr]
    assert '{"city":"mock-city"}' == call.arguments  # type: ignore[union-attr]
    second = await client.responses.create(
        model="demo-gpt",
        input=[
            {"role": "user", "content": "weather in Paris?"},
            {"type": "function_call", "call_id": call.call_id, "name": "get_weather", "arguments": call.arguments},  # type: ignore[union-attr]
            {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"},  # type: ignore[union-attr]
        ],
        tools=TOOLS,
    )
    assert "tool said: sunny" == second.output_text
    seen = await mock_upstream.requests()
    assert ["/v1/responses", "/v1/responses"] == [r["path"] for r in seen]


@pytest.mark.parametrize(("status", "exc"), [(429, openai.RateLimitError), (400, openai.BadRequestError), (503, openai.InternalServerError)])
async def test_responses_upstream_errors_raise_the_sdk_exception(gateway, http, status, exc):
    with pytest.raises(exc):
        await gpt(gateway, http, retries=0).responses.create(
            model="demo-gpt", input="hi", extra_headers={"x-mock-status": str(status)}
        )


async def test_responses_cut_stream_raises_in_the_sdk(gateway, http):
    """A cut Responses stream ends with the Responses API's error event (the SDK raises APIError)."""
    with pytest.raises(openai.APIError) as info:
        async with gpt(gateway, http).responses.stream(
            model="demo-gpt", input="hi", extra_headers={"x-mock-drop-after": "2"}
        ) as stream:
            async for _ in stream:
                pass
    assert "incomplete" in info.value.message
    r = await gateway.post("/v1/responses", json={"model": "demo-gpt", "input": "hi", "stream": True},
                           headers={"authorization": "Bearer " + test_sdk.TEST_KEY, "x-mock-drop-after": "2"})
    raw = await r.read()
    last = raw.rstrip(b"\n").rsplit(b"\n\n", 1)[-1]
    assert last.startswith(b"event: error\ndata: ")
    doc = orjson.loads(last.split(b"data: ", 1)[1])
    assert ("error", "upstream_error") == (doc["type"], doc["code"]) and "incomplete" in doc["message"]
    assert b"response.completed" not in raw


async def test_responses_are_served_by_openai_upstreams_only(make_gateway, mock_upstream, http):
    gw = await make_gateway(gateway_toml(mock_upstream.base_url, extra="""
        [[routes]]
        match = "only-claude"
        deployments = [{ upstream = "mock-anthropic" }]
        """))
    with pytest.raises(openai.NotFoundError):
        await gpt(gw, http, retries=0).responses.create(model="only-claude", input="hi")
    assert [] == await mock_upstream.requests()


async def test_responses_usage_is_one_ledger_row_per_request(make_gateway, mock_upstream, pg_env, tmp_path: Path, http):
    """JSON and stream, with cached input tokens: each request one row, cached tokens split from input."""
    gw = await make_gateway(ledger_toml(mock_upstream.base_url, tmp_path))
    client = gpt(gw, http)
    cache = {"x-mock-cache-read": "40"}
    r1 = await client.responses.with_raw_response.create(model="demo-gpt", input="hello there", extra_headers=cache)
    async with client.responses.stream(model="demo-gpt", input="hello there", extra_headers=cache) as s:
        async for _ in s:
            pass
        final = await s.get_final_response()
    assert final.usage is not None and 40 == final.usage.input_tokens_details.cached_tokens
    got = await wait_rows(pg_env, 2)
    assert 2 == len(got)
    expected_in = mock_input_tokens({"input": "hello there"})
    for row in got.values():
        assert ("demo-gpt", 200, expected_in, 5, 40) == (row["model"], row["status"], row["input_tokens"], row["output_tokens"], row["cache_read_tokens"])
        assert row["cost_pico"] > 0
    assert {False, True} == {row["streamed"] for row in got.values()}
    assert r1.headers["x-request-id"] in got


@pytest.mark.parametrize(
    ("events", "seen"),
    [
        (b"event: response.created\ndata: {}\n\nevent: response.in_progress\ndata: {}\n\n", "NOTHING"),
        (b"event: response.created\ndata: {}\n\nevent: response.output_text.delta\ndata: {\"delta\":\"x\"}\n\n", "CONTENT"),
        (b"event: response.function_call_arguments.delta\ndata: {}\n\n", "CONTENT"),
        (b"event: response.completed\ndata: {}\n\n", "END"),
        (b"event: response.failed\ndata: {}\n\n", "ERROR"),
        (b"event: error\ndata: {\"type\":\"error\"}\n\n", "ERROR"),
    ],
)
def test_read_ahead_commits_a_responses_stream_on_its_first_delta(events: bytes, seen: str) -> None:
    """Responses streams name their events; the first *.delta is the first token (split anywhere)."""
    from gateway.proxy.readahead import FirstContent, Seen

    for cut in range(len(events) + 1):
        scan = FirstContent("openai")
        got = scan.feed(events[:cut])
        if got is Seen.NOTHING:
            got = scan.feed(events[cut:])
        assert Seen[seen] is got, cut
