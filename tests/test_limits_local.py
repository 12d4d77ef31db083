"""Limits in process memory (standalone mode): the same limiter code, over real HTTP.

In-process gateway (one worker, so its share is the whole limit) against the
real mock upstream; keys and users with limits come from the TOML.
"""

from __future__ import annotations

from typing import Any

import anthropic
import openai
import pytest

from gateway import keys
from gateway.accounting.pricing import PriceTable
from gateway.config import Limits, parse
from gateway.errors import GatewayError
from gateway.policy.admit import RequestFacts
from gateway.policy.limits import DEFAULT_OUTPUT_RESERVE, LocalLimiter
from gateway.policy.principals import Principal
from tests.conftest import CONFIG_DIR, gateway_toml
from tests.fixtures.limits import (
    CHAT,
    HOLD,
    LIM_KEY,
    LIM_KEY_2,
    SLOW,
    actual_cost,
    chat_body,
    fire,
    limited_keys,
    post_chat,
    statuses,
    worst_case,
)


async def test_rpm_admits_exactly_n_of_3n_concurrent(make_gateway: Any, mock_upstream: Any) -> None:
    """rpm=5: 15 requests at once -> exactly 5 answered, 10 rejected with 429 and a real retry time."""
    gw = await make_gateway(gateway_toml(mock_upstream.base_url, extra=limited_keys("rpm = 5")))
    answers = await fire([(gw, CHAT)], 15, LIM_KEY, chat_body())
    assert {200: 5, 429: 10} == statuses(answers)
    ok = [a for a in answers if a.status == 200]
    assert ["0", "1", "2", "3", "4"] == sorted(a.headers["x-ratelimit-remaining-requests"] for a in ok)
    for a in answers:
        assert "5" == a.headers["x-ratelimit-limit-requests"]
        assert "x-ratelimit-reset-requests" in a.headers
        assert "x-ratelimit-limit-tokens" not in a.headers  # no TPM limit applies
    for a in answers:
        if a.status != 429:
            continue
        assert "0" == a.headers["x-ratelimit-remaining-requests"]
        assert "rate_limit_exceeded" == a.json()["error"]["code"]
        # the oldest request leaves the window ~60 s after it arrived
        assert 50_000 < int(a.headers["retry-after-ms"]) <= 60_000
        assert "60" == a.headers["retry-after"]
        assert "x-should-retry" not in a.headers


async def test_user_limit_caps_the_sum_of_its_keys(make_gateway: Any, mock_upstream: Any) -> None:
    """A user's rpm=4 holds across its two keys together (each key alone has no limit)."""
    gw = await make_gateway(
        gateway_toml(mock_upstream.base_url, extra=limited_keys(user_limits="rpm = 4", second_key=True))
    )
    a = await fire([(gw, CHAT)], 5, LIM_KEY, chat_body())
    b = await fire([(gw, CHAT)], 5, LIM_KEY_2, chat_body())
    assert 4 == sum(x.status == 200 for x in a + b)
    assert 6 == sum(x.status == 429 for x in a + b)


async def test_tpm_reserves_estimate_plus_max_tokens_and_settles_to_actual(make_gateway: Any, mock_upstream: Any) -> None:
    """tpm=300 with max_tokens=100 (~130 reserved each): 2 of 5 at once; settled requests free the rest."""
    gw = await make_gateway(gateway_toml(mock_upstream.base_url, extra=limited_keys("tpm = 300")))
    answers = await fire([(gw, CHAT)], 5, LIM_KEY, chat_body(100), SLOW)
    assert {200: 2, 429: 3} == statuses(answers)
    for a in answers:
        assert "300" == a.headers["x-ratelimit-limit-tokens"]
    rejected = [a for a in answers if a.status == 429]
    assert all("tokens per minute" in a.json()["error"]["message"] for a in rejected)
    # Both settled to their real ~25 tokens: the window now has room for 2 more reservations.
    await gw.server.app[keys.TASKS].drain(timeout=5)  # settlement runs off the hot path
    limiter = gw.server.app[keys.LIMITER]
    assert 2 == limiter.stats.settles
    again = await fire([(gw, CHAT)], 3, LIM_KEY, chat_body(100), SLOW)
    assert {200: 2, 429: 1} == statuses(again)


async def test_max_concurrency_admits_exactly_two_of_ten_slow(make_gateway: Any, mock_upstream: Any) -> None:
    """max_concurrency=2: 10 slow requests at once -> 2 run, 8 get 429; the leases return when they end."""
    gw = await make_gateway(gateway_toml(mock_upstream.base_url, extra=limited_keys("max_concurrency = 2")))
    answers = await fire([(gw, CHAT)], 10, LIM_KEY, chat_body(), SLOW)
    assert {200: 2, 429: 8} == statuses(answers)
    assert all("concurrent" in a.json()["error"]["message"] for a in answers if a.status == 429)
    assert all("1" == a.headers["retry-after"] for a in answers if a.status == 429)
    assert 2 == (await mock_upstream.stats())["requests"]
    await gw.server.app[keys.TASKS].drain(timeout=5)
    after = await fire([(gw, CHAT)], 2, LIM_KEY, chat_body())
    assert {200: 2} == statuses(after)


async def test_budget_never_overspent_by_100_concurrent(make_gateway: Any, mock_upstream: Any) -> None:
    """A budget that fits 10 worst-case requests: 100 at once -> 10 served, spend within budget."""
    body = chat_body(100)
    budget_micros = 10 * worst_case(body, 100) + 1
    gw = await make_gateway(
        gateway_toml(mock_upstream.base_url, extra=limited_keys(f"budget_usd = {budget_micros / 1e12}"))
    )
    answers = await fire([(gw, CHAT)], 100, LIM_KEY, body, HOLD)
    assert {200: 10, 429: 90} == statuses(answers)
    spent = sum(actual_cost(a.json()["usage"]) for a in answers if a.status == 200)
    assert spent <= budget_micros
    for a in answers:
        if a.status == 429:
            assert "false" == a.headers["x-should-retry"]
            err = a.json()["error"]
            assert ("insufficient_quota", "budget_exceeded") == (err["type"], err["code"])
    # settled to the real cost: the counter holds exactly what was spent
    await gw.server.app[keys.TASKS].drain(timeout=5)
    limiter = gw.server.app[keys.LIMITER]
    assert [spent] == list(limiter.counters.spend.values())


async def test_sdks_do_not_retry_a_budget_429(make_gateway: Any, mock_upstream: Any) -> None:
    """The OpenAI and Anthropic SDKs (max_retries=3) send an exhausted-budget request once."""
    body = chat_body(100)
    gw = await make_gateway(
        gateway_toml(mock_upstream.base_url, extra=limited_keys(f"budget_usd = {worst_case(body, 100) / 1e12}"))
    )
    assert 200 == (await post_chat(gw, CHAT, LIM_KEY, body)).status  # spends part of the budget
    limiter = gw.server.app[keys.LIMITER]
    base = str(gw.make_url("/"))
    oa = openai.AsyncOpenAI(base_url=base + "v1", api_key=LIM_KEY, max_retries=3)
    with pytest.raises(openai.RateLimitError) as exc:
        await oa.chat.completions.create(
            model="demo-gpt", max_tokens=100, messages=[{"role": "user", "content": "hi"}]
        )
    assert "budget_exceeded" == exc.value.code
    await oa.close()
    an = anthropic.AsyncAnthropic(base_url=base.rstrip("/"), api_key=LIM_KEY, max_retries=3)
    with pytest.raises(anthropic.RateLimitError):
        await an.messages.create(model="demo-claude", max_tokens=100, messages=[{"role": "user", "content": "hi"}])
    await an.close()
    assert 2 == limiter.stats.budget_exceeded  # one attempt per SDK call, no retries
    assert 1 == (await mock_upstream.stats())["requests"]  # only the first request was forwarded


async def test_static_limits_models_max_tokens_ips_expiry(make_gateway: Any, mock_upstream: Any) -> None:
    """Allowed models, the max_tokens cap, allowed_ips and key expiry are enforced before any counter."""
    extra = limited_keys('models = ["demo-gpt"], max_tokens = 50, rpm = 100', second_limits='allowed_ips = ["10.0.0.0/8"]')
    gw = await make_gateway(gateway_toml(mock_upstream.base_url, extra=extra))
    assert 403 == (await post_chat(gw, CHAT, LIM_KEY, chat_body(10, model="demo-other"))).status
    too_many = await post_chat(gw, CHAT, LIM_KEY, chat_body(51))
    assert 400 == too_many.status
    assert "max_tokens" in too_many.json()["error"]["message"]
    assert 200 == (await post_chat(gw, CHAT, LIM_KEY, chat_body(50))).status
    assert 403 == (await post_chat(gw, CHAT, LIM_KEY_2, chat_body(10))).status  # 127.0.0.1 is not in 10/8
    expired = gateway_toml(mock_upstream.base_url, extra=limited_keys("rpm = 5")).replace(
        'name = "limited"', 'name = "limited"\nexpires_at = "2020-01-01T00:00:00Z"'
    )
    gw2 = await make_gateway(expired)
    assert 401 == (await post_chat(gw2, CHAT, LIM_KEY, chat_body())).status


def _facts(rid: str, max_tokens: int | None = None) -> RequestFacts:
    return RequestFacts("demo-gpt", False, max_tokens, 100, "127.0.0.1", rid)


async def test_each_process_takes_its_share_of_the_limit() -> None:
    """With share=3 (e.g. 3 workers standalone) rpm=10 gives each process 3; budgets split too."""
    prices = PriceTable.load(parse("", source=str(CONFIG_DIR / "test.toml")))
    limiter = LocalLimiter(prices, share=3)
    p = Principal("k", "k", "k", "u", key_limits=Limits(rpm=10))
    admitted = 0
    for i in range(10):
        try:
            await limiter.reserve(p, _facts(f"r{i}"))
            admitted += 1
        except GatewayError:
            pass
    assert 3 == admitted
    tiny = Principal("k2", "k2", "k2", "u", key_limits=Limits(rpm=2))
    assert 1 == sum([await _ok(limiter, tiny, f"t{i}") for i in range(3)])  # never below 1


async def _ok(limiter: LocalLimiter, p: Principal, rid: str) -> int:
    try:
        await limiter.reserve(p, _facts(rid))
    except GatewayError:
        return 0
    return 1


async def test_output_reserve_defaults_when_max_tokens_absent() -> None:
    """Without max_tokens the reservation uses the key's max_tokens cap, else DEFAULT_OUTPUT_RESERVE."""
    prices = PriceTable.load(parse("", source=str(CONFIG_DIR / "test.toml")))
    limiter = LocalLimiter(prices)
    capped = Principal("k", "k", "k", "u", key_limits=Limits(tpm=100_000, max_tokens=300))
    r = await limiter.reserve(capped, _facts("a"))
    assert 100_000 - (100 // 4 + 1 + 300) == int(r.headers["x-ratelimit-remaining-tokens"])
    free = Principal("k3", "k3", "k3", "u3", key_limits=Limits(tpm=100_000))
    r = await limiter.reserve(free, _facts("b"))
    assert 100_000 - (100 // 4 + 1 + DEFAULT_OUTPUT_RESERVE) == int(r.headers["x-ratelimit-remaining-tokens"])
