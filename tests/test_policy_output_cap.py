"""The max_tokens cap holds for every way a request can ask for output, in both dialects (issue 10, item 3).

A key or user limit ``max_tokens = 100`` caps a request's total output ask
(``n`` x per-choice); a request that asks for no limit gets the cap written
into the forwarded body; budgets reserve ``n`` x the per-choice output.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from gateway.policy.output_cap import BadOutputAsk, OutputAsk, cap_problem, effective_output, inject
from tests.conftest import TEST_KEY, gateway_toml
from tests.fixtures.limits import CHAT, LIM_KEY, limited_keys, post_chat

MSGS = [{"role": "user", "content": "hi"}]
MESSAGES = "/v1/messages"


# --------------------------------------------------------------------------- the computation, as a table

@pytest.mark.parametrize(("path", "doc", "expected"), [
    (CHAT, {}, OutputAsk(None, 1, "max_completion_tokens")),
    (CHAT, {"max_tokens": None}, OutputAsk(None, 1, "max_completion_tokens")),
    (CHAT, {"max_tokens": 10}, OutputAsk(10, 1, "max_completion_tokens")),
    (CHAT, {"max_completion_tokens": 7}, OutputAsk(7, 1, "max_completion_tokens")),
    (CHAT, {"max_tokens": 10, "max_completion_tokens": 50_000}, OutputAsk(50_000, 1, "max_completion_tokens")),
    (CHAT, {"max_tokens": 90, "max_completion_tokens": None}, OutputAsk(90, 1, "max_completion_tokens")),
    (CHAT, {"n": 50}, OutputAsk(None, 50, "max_completion_tokens")),
    (CHAT, {"n": None, "max_tokens": 3}, OutputAsk(3, 1, "max_completion_tokens")),
    (CHAT, {"n": 4, "max_completion_tokens": 25}, OutputAsk(25, 4, "max_completion_tokens")),
    (MESSAGES, {"max_tokens": 100}, OutputAsk(100, 1, "max_tokens")),
    (MESSAGES, {}, OutputAsk(None, 1, "max_tokens")),
    (MESSAGES, {"max_tokens": 50, "thinking": {"type": "enabled", "budget_tokens": 5000}}, OutputAsk(5000, 1, "max_tokens")),
    (MESSAGES, {"max_tokens": 8000, "thinking": {"type": "enabled", "budget_tokens": 2000}}, OutputAsk(8000, 1, "max_tokens")),
    (MESSAGES, {"max_tokens": 10, "n": 50}, OutputAsk(10, 1, "max_tokens")),  # n means nothing to Anthropic
    ("/v1/responses", {"max_output_tokens": 33}, OutputAsk(33, 1, "max_output_tokens")),
    ("/v1/embeddings", {"max_tokens": 10**9}, OutputAsk(None, 1, "")),
    ("/v1/messages/count_tokens", {"max_tokens": 10**9}, OutputAsk(None, 1, "")),
])
def test_effective_output_reads_every_field_that_asks_for_output(path: str, doc: dict[str, Any], expected: OutputAsk) -> None:
    assert expected == effective_output(doc, path)


@pytest.mark.parametrize(("path", "doc", "field"), [
    (CHAT, {"max_tokens": 0}, "max_tokens"),
    (CHAT, {"max_tokens": True}, "max_tokens"),
    (CHAT, {"max_completion_tokens": "100"}, "max_completion_tokens"),
    (CHAT, {"max_completion_tokens": 1.5}, "max_completion_tokens"),
    (CHAT, {"n": 0}, "n"),
    (CHAT, {"n": 129}, "n"),
    (CHAT, {"n": "2"}, "n"),
    (MESSAGES, {"max_tokens": -1}, "max_tokens"),
    (MESSAGES, {"max_tokens": 10, "thinking": {"budget_tokens": "lots"}}, "thinking.budget_tokens"),
])
def test_a_malformed_output_field_is_named(path: str, doc: dict[str, Any], field: str) -> None:
    with pytest.raises(BadOutputAsk, match=field.replace(".", r"\.")):
        effective_output(doc, path)


@pytest.mark.parametrize(("ask", "cap", "refused"), [
    (OutputAsk(100, 1, "max_tokens"), 100, False),
    (OutputAsk(101, 1, "max_tokens"), 100, True),
    (OutputAsk(None, 1, "max_tokens"), 100, False),  # injected
    (OutputAsk(None, 2, "max_completion_tokens"), 100, True),  # n > 1 must name a per-choice maximum
    (OutputAsk(2, 50, "max_completion_tokens"), 100, False),
    (OutputAsk(3, 50, "max_completion_tokens"), 100, True),
    (OutputAsk(None, 1, ""), 1, False),  # no output at all (embeddings)
])
def test_the_cap_bounds_n_times_the_per_choice_ask(ask: OutputAsk, cap: int, refused: bool) -> None:
    assert refused == (cap_problem(ask, cap, "key") is not None)


def test_inject_writes_the_cap_only_when_nothing_was_asked_and_a_cap_applies() -> None:
    doc: dict[str, Any] = {"max_tokens": None}
    assert OutputAsk(100, 1, "max_completion_tokens") == inject(doc, OutputAsk(None, 1, "max_completion_tokens"), 100)
    assert {"max_tokens": None, "max_completion_tokens": 100} == doc
    doc = {}
    assert inject(doc, OutputAsk(None, 1, "max_completion_tokens"), None) is None
    assert inject(doc, OutputAsk(5, 1, "max_completion_tokens"), 100) is None
    assert inject(doc, OutputAsk(None, 1, ""), 100) is None
    assert {} == doc


# --------------------------------------------------------------------------- over HTTP

async def _last_upstream_body(mock_upstream: Any) -> dict[str, Any]:
    seen = await mock_upstream.requests()
    return seen[-1]["body"]  # type: ignore[no-any-return]


def _anthropic(key: str) -> dict[str, str]:
    return {"x-api-key": key, "anthropic-version": "2023-06-01", "content-type": "application/json"}


@pytest.mark.parametrize("where", ["key", "user"])
async def test_a_capped_openai_request_never_goes_through_uncapped(make_gateway: Any, mock_upstream: Any, where: str) -> None:
    """Omitted and null max_tokens get the cap injected; a larger max_completion_tokens or n x max_tokens is a 400
    that never reaches the provider."""
    limits = limited_keys("max_tokens = 100") if where == "key" else limited_keys("rpm = 1000", user_limits="max_tokens = 100")
    gw = await make_gateway(gateway_toml(mock_upstream.base_url, extra=limits))

    for extra in ({}, {"max_tokens": None}, {"max_completion_tokens": None, "n": 1}):
        r = await post_chat(gw, CHAT, LIM_KEY, orjson.dumps({"model": "demo-gpt", "messages": MSGS, **extra}))
        assert 200 == r.status, r.body
        assert 100 == (await _last_upstream_body(mock_upstream))["max_completion_tokens"]

    forwarded = (await mock_upstream.stats())["requests"]
    for extra in (
        {"max_tokens": 10, "max_completion_tokens": 50_000},
        {"max_completion_tokens": 101},
        {"n": 50},
        {"n": 50, "max_tokens": None},
        {"n": 2, "max_tokens": 60},
    ):
        r = await post_chat(gw, CHAT, LIM_KEY, orjson.dumps({"model": "demo-gpt", "messages": MSGS, **extra}))
        assert 400 == r.status, extra
        err = r.json()["error"]
        assert ("invalid_request_error", "invalid_request") == (err["type"], err["code"])
        assert "max_tokens" in err["message"] and "100" in err["message"]
    assert forwarded == (await mock_upstream.stats())["requests"], "a refused request reached the provider"

    r = await post_chat(gw, CHAT, LIM_KEY, orjson.dumps({"model": "demo-gpt", "messages": MSGS, "n": 50, "max_tokens": 2}))
    assert 200 == r.status
    sent = await _last_upstream_body(mock_upstream)
    assert (50, 2) == (sent["n"], sent["max_tokens"]) and "max_completion_tokens" not in sent


async def test_a_capped_anthropic_request_is_capped_including_thinking(make_gateway: Any, mock_upstream: Any) -> None:
    gw = await make_gateway(gateway_toml(mock_upstream.base_url, extra=limited_keys("max_tokens = 100")))
    async with gw.post(MESSAGES, data=orjson.dumps({"model": "demo-claude", "messages": MSGS}), headers=_anthropic(LIM_KEY)) as r:
        assert 200 == r.status
    assert 100 == (await _last_upstream_body(mock_upstream))["max_tokens"]
    for body in (
        {"max_tokens": 101},
        {"max_tokens": 50, "thinking": {"type": "enabled", "budget_tokens": 5000}},
    ):
        async with gw.post(MESSAGES, data=orjson.dumps({"model": "demo-claude", "messages": MSGS, **body}),
                           headers=_anthropic(LIM_KEY)) as r:
            assert 400 == r.status
            doc = await r.json()
            assert "invalid_request_error" == doc["error"]["type"] and "100" in doc["error"]["message"]


async def test_without_a_cap_the_body_is_forwarded_untouched(make_gateway: Any, mock_upstream: Any) -> None:
    """Passthrough stays byte-exact: no cap, no injected field."""
    gw = await make_gateway(gateway_toml(mock_upstream.base_url))
    body = {"model": "demo-gpt", "messages": MSGS, "n": 3}
    r = await post_chat(gw, CHAT, TEST_KEY, orjson.dumps(body))
    assert 200 == r.status
    assert body == await _last_upstream_body(mock_upstream)


async def test_budget_reservations_count_n(make_gateway: Any, mock_upstream: Any) -> None:
    """Budget $0.01 at $15/M output: 100 output tokens fit (≈$0.0015), n=10 x 100 (≈$0.015) is refused up front."""
    gw = await make_gateway(gateway_toml(mock_upstream.base_url, extra=limited_keys('budget_usd = 0.01, budget_period = "day"')))
    ok = await post_chat(gw, CHAT, LIM_KEY, orjson.dumps({"model": "demo-gpt", "messages": MSGS, "max_tokens": 100}))
    assert 200 == ok.status
    forwarded = (await mock_upstream.stats())["requests"]
    r = await post_chat(gw, CHAT, LIM_KEY, orjson.dumps({"model": "demo-gpt", "messages": MSGS, "max_tokens": 100, "n": 10}))
    assert 429 == r.status
    assert "budget_exceeded" == r.json()["error"]["code"]
    assert forwarded == (await mock_upstream.stats())["requests"]
