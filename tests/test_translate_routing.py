"""Which deployments may serve a client when translation is possible (Router.plan with translate).

Per route: those of the client's dialect when it has any, else all of them
(translated); fallback_models and context_fallback_models routes the same way;
paths that do not translate see their own dialect only.
"""

from __future__ import annotations

import pytest

from gateway.config import parse
from gateway.errors import GatewayError
from gateway.proxy.routing import Router, build_upstreams

CONFIG = """
[upstreams.ant]
provider = "anthropic"
base_url = "http://a"
[upstreams.oai]
provider = "openai"
base_url = "http://o"

[[routes]]
match = "mixed"
deployments = [{ upstream = "ant", model = "claude" }, { upstream = "oai", model = "gpt" }]

[[routes]]
match = "claude-only"
deployments = [{ upstream = "ant", model = "claude" }]
fallback_models = ["gpt-only"]
context_fallback_models = ["mixed"]

[[routes]]
match = "gpt-only"
deployments = [{ upstream = "oai", model = "gpt" }]

[[routes]]
match = "claude-solo"
deployments = [{ upstream = "ant", model = "claude" }]
"""


@pytest.fixture(scope="module")
def router() -> Router:
    cfg = parse(CONFIG, environ={})
    return Router(cfg, build_upstreams(cfg))


@pytest.mark.parametrize(
    ("model", "dialect", "translate", "order", "context", "translates"),
    [
        ("mixed", "openai", True, ["oai:gpt"], [], False),
        ("mixed", "anthropic", True, ["ant:claude"], [], False),
        ("claude-only", "openai", True, ["ant:claude", "oai:gpt"], ["oai:gpt"], True),
        ("claude-only", "anthropic", True, ["ant:claude", "oai:gpt"], ["ant:claude"], True),
        ("gpt-only", "anthropic", True, ["oai:gpt"], [], True),
        ("claude-solo", "openai", True, ["ant:claude"], [], True),
        ("claude-only", "anthropic", False, ["ant:claude"], ["ant:claude"], False),
        ("gpt-only", "openai", False, ["oai:gpt"], [], False),
    ],
)
def test_plan_per_dialect(router, model, dialect, translate, order, context, translates):
    plan = router.plan(model, dialect, translate)
    assert order == [f"{d.name}:{d.model}" for d in (*plan.primary, *plan.rest)]
    assert context == [f"{d.name}:{d.model}" for d in plan.context]
    assert translates == plan.translates


def test_a_route_only_in_the_other_dialect_is_a_404_where_nothing_translates(router):
    """Embeddings, count_tokens and the Responses API do not translate."""
    with pytest.raises(GatewayError, match="not served in this API's format"):
        router.plan("claude-solo", "openai", False)
