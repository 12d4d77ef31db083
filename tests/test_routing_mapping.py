"""Model mapping: a public name (the route's match) served by deployments that name the
upstream's own model; fallback_models; what the response and the ledger say served it.

Everything goes through the real gateway to the real mock upstream, which records the
bodies it received.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import orjson
import pytest

from gateway.config import ConfigError, parse
from tests.conftest import CONFIG_DIR, TEST_KEY, sha
from tests.test_config import check_config
from tests.test_ledger_gateway import cost, wait_rows

ANTH = {"x-api-key": TEST_KEY, "anthropic-version": "2023-06-01"}
OAI = {"authorization": f"Bearer {TEST_KEY}"}
HAIKU = {"input": 1_000_000, "output": 5_000_000, "cache_write": 1_250_000, "cache_read": 100_000}
MINI = {"input": 150_000, "output": 600_000, "cache_write": 0, "cache_read": 75_000}  # gpt-4o-mini


def mapping_toml(good: str, bad: str = "http://127.0.0.1:9", extra: str = "") -> str:
    return textwrap.dedent(f"""
        [server]
        host = "127.0.0.1"
        port = 0

        [pricing]
        file = "{CONFIG_DIR / 'prices.toml'}"

        [upstreams.mock-anthropic]
        provider = "anthropic"
        base_url = "{good}"
        api_key_env = "TEST_ANTHROPIC_KEY"

        [upstreams.mock-openai]
        provider = "openai"
        base_url = "{good}"
        api_key_env = "TEST_OPENAI_KEY"

        [upstreams.bad-anthropic]
        provider = "anthropic"
        base_url = "{bad}"
        api_key_env = "TEST_ANTHROPIC_KEY"

        [upstreams.bad-openai]
        provider = "openai"
        base_url = "{bad}"
        api_key_env = "TEST_OPENAI_KEY"

        [[routes]]
        match = "smart"
        deployments = [
          {{ upstream = "mock-anthropic", model = "claude-haiku-4-5" }},
          {{ upstream = "mock-openai", model = "gpt-4o-mini" }},
        ]

        [[routes]]
        match = "fragile"
        deployments = [{{ upstream = "bad-anthropic", model = "claude-x" }}, {{ upstream = "bad-openai" }}]
        fallback_models = ["backup"]

        [[routes]]
        match = "backup"
        deployments = [
          {{ upstream = "mock-anthropic", model = "claude-backup" }},
          {{ upstream = "mock-openai", model = "gpt-backup" }},
        ]

        [[routes]]
        match = "demo-*"
        deployments = [{{ upstream = "mock-anthropic" }}, {{ upstream = "mock-openai" }}]

        [[keys]]
        name = "test"
        key_sha256 = "{sha(TEST_KEY)}"
        """) + textwrap.dedent(extra)


def journal(tmp_path: Path) -> str:
    return f'[accounting]\njournal_dir = "{tmp_path}"\nflush_ms = 50\n'


CASES = [
    ("anthropic", "/v1/messages", ANTH, {"max_tokens": 20, "messages": [{"role": "user", "content": "hi there"}]},
     "mock-anthropic", "claude-haiku-4-5", HAIKU),
    ("openai", "/v1/chat/completions", OAI, {"messages": [{"role": "user", "content": "hi there"}]},
     "mock-openai", "gpt-4o-mini", MINI),
]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(("dialect", "path", "auth", "payload", "upstream", "served", "price"), CASES,
                         ids=["anthropic", "openai"])
async def test_mapped_model_reaches_the_upstream_and_the_ledger_keeps_both_names(
        make_gateway, mock_upstream, pg_env, tmp_path, stream, dialect, path, auth, payload, upstream, served, price):
    """The client sends "smart"; the upstream receives its own model name and nothing else changed; the
    response names the upstream, its model and the attempts; the ledger row keeps model = "smart",
    served_model = the upstream's, and is priced by the served model (not the unpriced public name)."""
    gw = await make_gateway(mapping_toml(mock_upstream.base_url, extra=journal(tmp_path)))
    body = {"model": "smart", **payload, "stream": stream}
    r = await gw.post(path, json=body, headers=auth)
    raw = await r.read()
    assert 200 == r.status, raw
    assert (upstream, served, "1") == (
        r.headers["x-gateway-upstream"], r.headers["x-gateway-model"], r.headers["x-gateway-attempts"])
    seen = (await mock_upstream.requests())[-1]
    expected = {**body, "model": served}
    if dialect == "openai" and stream:
        expected["stream_options"] = {"include_usage": True}
    assert expected == seen["body"]
    if not stream:
        assert served == orjson.loads(raw)["model"]  # the upstream's answer is relayed as it is
    row = (await wait_rows(pg_env, 1))[r.headers["x-request-id"]]
    assert ("smart", served, upstream) == (row["model"], row["served_model"], row["upstream"])
    inp, out = row["input_tokens"], row["output_tokens"]
    assert 5 == out  # the mock fixture's chunk count
    assert cost(inp, out, row["cache_write_tokens"], row["cache_read_tokens"], price) == row["cost_pico"]
    assert row["priced"] is True


async def test_without_mapping_the_body_goes_byte_for_byte_and_served_model_is_the_clients(
        make_gateway, mock_upstream, pg_env, tmp_path):
    """No model on the deployment: the client's bytes go upstream unchanged (odd spacing and key order
    included), and the served model is the name the client sent."""
    gw = await make_gateway(mapping_toml(mock_upstream.base_url, extra=journal(tmp_path)))
    raw_body = b'{ "messages":[{"role":"user","content":"hi"}],  "max_tokens" : 7, "model":"demo-claude" }'
    r = await gw.post("/v1/messages", data=raw_body, headers={**ANTH, "content-type": "application/json"})
    await r.read()
    assert 200 == r.status
    assert ("mock-anthropic", "demo-claude", "1") == (
        r.headers["x-gateway-upstream"], r.headers["x-gateway-model"], r.headers["x-gateway-attempts"])
    seen = (await mock_upstream.requests())[-1]
    assert str(len(raw_body)) == seen["headers"]["content-length"]
    assert orjson.loads(raw_body) == seen["body"]
    row = (await wait_rows(pg_env, 1))[r.headers["x-request-id"]]
    assert ("demo-claude", "demo-claude") == (row["model"], row["served_model"])


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(("path", "auth", "payload", "upstream", "served"), [
    ("/v1/messages", ANTH, {"max_tokens": 5, "messages": [{"role": "user", "content": "x"}]},
     "mock-anthropic", "claude-backup"),
    ("/v1/chat/completions", OAI, {"messages": [{"role": "user", "content": "x"}]}, "mock-openai", "gpt-backup"),
], ids=["anthropic", "openai"])
async def test_fallback_models_serve_when_the_routes_own_deployments_fail(
        make_gateway, mock_upstream, stream, path, auth, payload, upstream, served):
    """"fragile"'s only deployment of the dialect is down (connection refused): the route named in
    fallback_models serves, with its own upstream model name; the attempts header counts both."""
    gw = await make_gateway(mapping_toml(mock_upstream.base_url))
    r = await gw.post(path, json={"model": "fragile", **payload, "stream": stream}, headers=auth)
    raw = await r.read()
    assert 200 == r.status, raw
    assert (upstream, served) == (r.headers["x-gateway-upstream"], r.headers["x-gateway-model"])
    assert int(r.headers["x-gateway-attempts"]) >= 2
    assert served == (await mock_upstream.requests())[-1]["body"]["model"]
    assert 1 == (await mock_upstream.stats())["requests"]


async def test_gateway_errors_after_attempts_also_name_the_upstream(make_gateway, mock_upstream):
    """All deployments down and no fallback left: the 502 still says what was tried last."""
    gw = await make_gateway(mapping_toml(mock_upstream.base_url).replace(
        'fallback_models = ["backup"]', "fallback_models = []"))
    r = await gw.post("/v1/messages", json={"model": "fragile", "max_tokens": 5, "messages": []}, headers=ANTH)
    await r.read()
    assert 502 == r.status
    assert ("bad-anthropic", "claude-x") == (r.headers["x-gateway-upstream"], r.headers["x-gateway-model"])
    assert int(r.headers["x-gateway-attempts"]) >= 1


# ------------------------------------------------------------------ check-config

UPS = '[upstreams.u]\nprovider = "openai"\nbase_url = "http://x"\n'


def route(match: str, **extra: str) -> str:
    lines = "".join(f"{k} = {v}\n" for k, v in extra.items())
    return f'[[routes]]\nmatch = "{match}"\ndeployments = [{{ upstream = "u" }}]\n{lines}'


def errors(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(text, environ={})
    return info.value.errors


def test_fallback_models_must_name_existing_routes():
    errs = errors(UPS + route("a", fallback_models='["nope", "b"]', context_fallback_models='["gone"]') + route("b"))
    assert ["routes[0].fallback_models[0]: no route serves model 'nope'",
            "routes[0].context_fallback_models[0]: no route serves model 'gone'"] == errs


def test_fallback_models_cycles_are_rejected():
    errs = errors(UPS + route("a", fallback_models='["b"]') + route("b", fallback_models='["c-1"]')
                  + route("c-*", fallback_models='["a"]'))
    assert 1 == len(errs), errs
    assert "cycle 'a' -> 'b' -> 'c-*' -> 'a'" in errs[0]
    errs = errors(UPS + route("a", fallback_models='["a"]'))
    assert ["routes[0].fallback_models[0]: 'a' is this route itself"] == errs


def test_fallback_models_may_share_a_target_and_name_globs():
    """A diamond (a -> b, a -> c, b -> c) is no cycle; a name matching a glob route is a fine target."""
    cfg = parse(UPS + route("a", fallback_models='["b", "c-x"]') + route("b", fallback_models='["c-y"]')
                + route("c-*"), environ={})
    assert ("b", "c-x") == cfg.routes[0].fallback_models


def test_check_config_command_reports_route_graph_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(UPS + route("a", fallback_models='["b"]', strategy='"fastest"') + route("b", fallback_models='["a"]'))
    r = check_config(bad)
    assert 1 == r.returncode
    assert "routes[0].strategy: must be one of 'weighted', 'least_busy', 'latency', got 'fastest'" in r.stderr
    assert "cycle 'a' -> 'b' -> 'a'" in r.stderr
