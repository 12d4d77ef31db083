"""Routing: model name or glob -> ordered deployments (weighted pick, then fallbacks)."""

from __future__ import annotations

import collections
import random

import pytest

from gateway.config import parse
from gateway.errors import ErrorKind, GatewayError
from gateway.proxy.routing import Router, build_upstreams
from tests.conftest import TEST_KEY, sha

UPSTREAMS = "".join(
    f'[upstreams.{name}]\nprovider = "{provider}"\nbase_url = "http://127.0.0.1:1"\n'
    for name, provider in (("a1", "anthropic"), ("a2", "anthropic"), ("a3", "anthropic"), ("o1", "openai"))
)
ROUTES = """
[[routes]]
match = "claude-special"
deployments = [{ upstream = "a3" }]

[[routes]]
match = "claude-*"
deployments = [{ upstream = "a1", weight = 3 }, { upstream = "a2", weight = 1 }, { upstream = "o1" }]
fallbacks = ["a3", "a1", "o1"]

[[routes]]
match = "claude-s*"
deployments = [{ upstream = "a2" }]

[[routes]]
match = "gpt-?o"
deployments = [{ upstream = "o1" }]
"""


@pytest.fixture
def router() -> Router:
    cfg = parse(UPSTREAMS + ROUTES, environ={})
    return Router(cfg, build_upstreams(cfg))


def names(router: Router, model: str, dialect: str = "anthropic") -> list[str]:
    return [d.name for d in router.candidates(model, dialect)[1]]


def test_exact_name_wins_over_globs(router):
    assert ["a3"] == names(router, "claude-special")


def test_first_matching_glob_in_file_order_wins(router):
    """claude-sonnet matches claude-* and claude-s*: the earlier route wins."""
    assert "claude-*" == router.candidates("claude-sonnet", "anthropic")[0].match


def test_glob_question_mark_and_case_sensitivity(router):
    assert ["o1"] == names(router, "gpt-4o", "openai")
    with pytest.raises(GatewayError) as info:
        router.candidates("GPT-4o", "openai")
    assert ErrorKind.NOT_FOUND is info.value.kind


def test_only_deployments_of_the_paths_dialect_are_candidates(router):
    """An OpenAI upstream is never tried for /v1/messages, and a route with none for the dialect is a 404."""
    for _ in range(20):
        got = names(router, "claude-x")
        assert "o1" not in got
        assert {"a1", "a2", "a3"} == set(got)
        assert "a3" == got[-1]  # the fallback comes after the weighted deployments, once
    assert ["o1"] == names(router, "claude-x", "openai")
    with pytest.raises(GatewayError) as info:
        router.candidates("gpt-4o", "anthropic")
    assert ErrorKind.NOT_FOUND is info.value.kind


def test_weights_decide_the_first_pick(router):
    """Weights 3:1 make a1 first about three times in four."""
    random.seed(1234)
    firsts = collections.Counter(names(router, "claude-x")[0] for _ in range(4000))
    assert 0.72 < firsts["a1"] / 4000 < 0.78
    assert 4000 == firsts["a1"] + firsts["a2"]


def test_unknown_model_is_404(router):
    with pytest.raises(GatewayError) as info:
        router.candidates("llama-3", "openai")
    assert ErrorKind.NOT_FOUND is info.value.kind
    assert "llama-3" in info.value.message


def test_listed_models_are_the_exact_routes(router):
    assert ["claude-special"] == router.listed_models()


async def test_weighted_routing_over_http(make_gateway, mock_upstream):
    """Two deployments on the same mock: both get traffic (weights are honoured end to end)."""
    toml = f"""
[server]
host = "127.0.0.1"
port = 0

[upstreams.w1]
provider = "openai"
base_url = "{mock_upstream.base_url}"

[upstreams.w2]
provider = "openai"
base_url = "{mock_upstream.base_url}/_mock/status/500"

[[routes]]
match = "demo-*"
deployments = [{{ upstream = "w1", weight = 1 }}, {{ upstream = "w2", weight = 1 }}]

[[keys]]
name = "test"
key_sha256 = "{sha(TEST_KEY)}"
"""
    gw = await make_gateway(toml)
    for _ in range(20):
        r = await gw.post("/v1/chat/completions", headers={"authorization": f"Bearer {TEST_KEY}"},
                          json={"model": "demo-gpt", "messages": []})
        assert 200 == r.status  # w2 answers 500: failover to w1 when w2 was picked first
    stats = await mock_upstream.stats()
    assert 0 < stats["status_500"] < 20
