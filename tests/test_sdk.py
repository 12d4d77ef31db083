"""The official anthropic and openai SDKs, pointed at the gateway, work unchanged.

Only ``base_url`` and ``api_key`` differ from talking to the provider.  An
httpx event hook counts what the SDK actually sent, to check its retries.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anthropic
import httpx2 as httpx
import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gateway import keys
from gateway.app import create_app
from gateway.config import parse
from gateway.errors import ErrorKind, GatewayError
from gateway.policy.admit import Admitter
from tests.conftest import CONFIG_DIR, OTHER_KEY, TEST_KEY, gateway_toml
from tests.fixtures.servers import free_port

MESSAGES: list[Any] = [{"role": "user", "content": "hi"}]


class Counter:
    def __init__(self) -> None:
        self.sent = 0

    async def __call__(self, request: httpx.Request) -> None:
        self.sent += 1


@pytest.fixture
async def http() -> AsyncIterator[tuple[httpx.AsyncClient, Counter]]:
    counter = Counter()
    async with httpx.AsyncClient(event_hooks={"request": [counter]}) as client:
        yield client, counter


def base(gateway: Any) -> str:
    return str(gateway.make_url("")).rstrip("/")


def claude(gateway: Any, http: Any, key: str = TEST_KEY, *, base_url: str | None = None, retries: int = 2) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(
        base_url=base_url or base(gateway), api_key=key, http_client=http[0], max_retries=retries
    )


def gpt(gateway: Any, http: Any, key: str = TEST_KEY, *, retries: int = 2) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base(gateway) + "/v1", api_key=key, http_client=http[0], max_retries=retries)


# ------------------------------------------------------------------ anthropic


async def test_anthropic_sdk_message(gateway, http):
    msg = await claude(gateway, http).messages.create(model="demo-claude", max_tokens=10, messages=MESSAGES)
    assert "assistant" == msg.role
    assert "lorem " * 5 == msg.content[0].text  # type: ignore[union-attr]
    assert 5 == msg.usage.output_tokens


async def test_anthropic_sdk_stream(gateway, http):
    async with claude(gateway, http).messages.stream(model="demo-claude", max_tokens=10, messages=MESSAGES) as s:
        texts = [t async for t in s.text_stream]
        final = await s.get_final_message()
    assert ["lorem "] * 5 == texts
    assert 5 == final.usage.output_tokens
    assert "end_turn" == final.stop_reason


async def test_anthropic_sdk_with_ak_base_url(gateway, http):
    """anthropic.Anthropic(base_url=.../ak/{KEY}, api_key="unused") works as DESIGN.md promises."""
    client = claude(gateway, http, "unused", base_url=f"{base(gateway)}/ak/{TEST_KEY}")
    msg = await client.messages.create(model="demo-claude", max_tokens=10, messages=MESSAGES)
    assert 5 == msg.usage.output_tokens


async def test_anthropic_sdk_count_tokens_and_models(make_gateway, mock_upstream, http):
    gw = await make_gateway(gateway_toml(mock_upstream.base_url, extra='[[routes]]\nmatch = "demo-listed"\ndeployments = [{ upstream = "mock-anthropic" }]\n'))
    client = claude(gw, http)
    count = await client.messages.count_tokens(model="demo-claude", messages=MESSAGES)
    assert count.input_tokens >= 1
    page = await client.models.list()
    assert ["demo-listed"] == [m.id for m in page.data]


async def test_anthropic_sdk_does_not_retry_401(gateway, http):
    with pytest.raises(anthropic.AuthenticationError):
        await claude(gateway, http, "gwk_wrong_" + "x" * 32).messages.create(
            model="demo-claude", max_tokens=10, messages=MESSAGES
        )
    assert 1 == http[1].sent


async def test_anthropic_sdk_raises_permission_and_not_found(gateway, http):
    with pytest.raises(anthropic.PermissionDeniedError):
        await claude(gateway, http, OTHER_KEY).messages.create(model="demo-claude", max_tokens=10, messages=MESSAGES)
    with pytest.raises(anthropic.NotFoundError):
        await claude(gateway, http).messages.create(model="nope", max_tokens=10, messages=MESSAGES)
    assert 2 == http[1].sent


async def test_anthropic_sdk_raises_on_a_cut_stream(gateway, http):
    """A stream the upstream cut is an error in the SDK, never a silently short answer."""
    client = claude(gateway, http)
    with pytest.raises(anthropic.APIStatusError):
        async with client.messages.stream(
            model="demo-claude", max_tokens=10, messages=MESSAGES, extra_headers={"x-mock-drop-after": "2"}
        ) as s:
            async for _ in s.text_stream:
                pass


async def test_anthropic_sdk_retries_529_after_retry_after(make_gateway, http):
    """529 from an open circuit is retryable: the SDK waits retry-after-ms and tries again."""
    dead = f"http://127.0.0.1:{free_port()}"
    gw = await make_gateway(
        gateway_toml(dead) + "\n[upstreams.mock-anthropic.breaker]\nfailure_threshold = 1\ncooldown_seconds = 0.3\n"
    )
    r = await gw.post("/v1/messages", headers={"x-api-key": TEST_KEY}, json={"model": "demo-claude", "messages": []})
    assert 502 == r.status  # the circuit is open now
    with pytest.raises(anthropic.APIStatusError) as info:
        await claude(gw, http, retries=1).messages.create(model="demo-claude", max_tokens=10, messages=MESSAGES)
    assert 2 == http[1].sent  # 529, then after the cooldown the probe (which fails: 502)
    assert 502 == info.value.status_code


# ------------------------------------------------------------------ openai


async def test_openai_sdk_chat(gateway, http):
    resp = await gpt(gateway, http).chat.completions.create(model="demo-gpt", messages=MESSAGES)
    assert "lorem " * 5 == resp.choices[0].message.content
    assert resp.usage is not None and 5 == resp.usage.completion_tokens


async def test_openai_sdk_stream(gateway, http):
    stream = await gpt(gateway, http).chat.completions.create(model="demo-gpt", messages=MESSAGES, stream=True)
    chunks = [c async for c in stream]
    assert "lorem " * 5 == "".join(c.choices[0].delta.content or "" for c in chunks)
    assert all(c.choices for c in chunks)  # the usage chunk the gateway asked for was removed


async def test_openai_sdk_stream_with_include_usage(gateway, http):
    stream = await gpt(gateway, http).chat.completions.create(
        model="demo-gpt", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    chunks = [c async for c in stream]
    assert chunks[-1].usage is not None and 5 == chunks[-1].usage.completion_tokens


async def test_openai_sdk_embeddings_and_models(make_gateway, mock_upstream, http):
    gw = await make_gateway(gateway_toml(mock_upstream.base_url, extra='[[routes]]\nmatch = "demo-listed"\ndeployments = [{ upstream = "mock-openai" }]\n'))
    client = gpt(gw, http)
    emb = await client.embeddings.create(model="demo-embed", input=["a", "b"])
    assert 2 == len(emb.data)
    assert ["demo-listed"] == [m.id async for m in client.models.list()]


async def test_openai_sdk_does_not_retry_401(gateway, http):
    with pytest.raises(openai.AuthenticationError):
        await gpt(gateway, http, "gwk_wrong_" + "x" * 32).chat.completions.create(model="demo-gpt", messages=MESSAGES)
    assert 1 == http[1].sent


@pytest.mark.parametrize("mid_event", [False, True])
async def test_anthropic_sdk_gets_the_error_event_even_when_cut_mid_event(gateway, http, mid_event):
    """However the upstream is cut, the SDK raises its API error (not a JSON decode error)."""
    headers = {"x-mock-drop-after": "2", **({"x-mock-drop-mid-event": "1"} if mid_event else {})}
    with pytest.raises(anthropic.APIStatusError) as info:
        async with claude(gateway, http).messages.stream(
            model="demo-claude", max_tokens=10, messages=MESSAGES, extra_headers=headers
        ) as s:
            async for _ in s.text_stream:
                pass
    assert "incomplete" in str(info.value)


async def test_openai_sdk_raises_on_a_cut_stream(gateway, http):
    stream = await gpt(gateway, http).chat.completions.create(
        model="demo-gpt", messages=MESSAGES, stream=True, extra_headers={"x-mock-drop-after": "2"}
    )
    with pytest.raises(openai.APIError):
        async for _ in stream:
            pass


# ------------------------------------------------------------------ retry semantics of policy answers


class RefusingLimiter:
    """A Limiter (the policy protocol) that refuses every request with one error."""

    def __init__(self, err: GatewayError) -> None:
        self.err = err

    async def reserve(self, principal: Any, facts: Any) -> Any:
        raise self.err

    async def settle(self, *args: Any) -> None:
        return None

    async def close(self) -> None:
        return None


@pytest.fixture
async def refusing_gateway(mock_upstream) -> AsyncIterator[Any]:
    clients: list[TestClient[Any, Any]] = []

    async def start(err: GatewayError) -> TestClient[Any, Any]:
        app = create_app(parse(gateway_toml(mock_upstream.base_url), source=str(CONFIG_DIR / "test.toml")))

        async def limiter(app: web.Application) -> AsyncIterator[None]:
            app[keys.ADMITTER] = Admitter(RefusingLimiter(err))
            yield

        app.cleanup_ctx.append(limiter)
        client: TestClient[Any, Any] = TestClient(TestServer(app, host="127.0.0.1"))
        await client.start_server()
        clients.append(client)
        return client

    yield start
    for c in clients:
        await c.close()


@pytest.mark.parametrize("sdk", ["anthropic", "openai"])
async def test_sdks_retry_a_rate_limit_after_retry_after_ms_but_never_a_budget_refusal(refusing_gateway, http, sdk):
    """429 rate_limit_exceeded is retried (after retry-after-ms); 429 budget_exceeded (x-should-retry: false) is not."""
    rate = await refusing_gateway(GatewayError(ErrorKind.RATE_LIMITED, "slow down", retry_after_s=0.05))
    budget = await refusing_gateway(GatewayError(ErrorKind.BUDGET_EXCEEDED, "no money left"))
    for gw, expected_sends in ((rate, 2), (budget, 1)):
        http[1].sent = 0
        if sdk == "anthropic":
            with pytest.raises(anthropic.RateLimitError):
                await claude(gw, http, retries=1).messages.create(model="demo-claude", max_tokens=10, messages=MESSAGES)
        else:
            with pytest.raises(openai.RateLimitError):
                await gpt(gw, http, retries=1).chat.completions.create(model="demo-gpt", messages=MESSAGES)
        assert expected_sends == http[1].sent
