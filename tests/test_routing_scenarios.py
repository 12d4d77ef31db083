"""The scenario table: each upstream fault, through the official SDKs (max_retries=0, so what the
client sees is the gateway's own doing), in both dialects, streamed and not.

Route ``demo-r``: upstream pair ``a`` (its deployment), then ``b`` (its fallback).  For each fault:
the client-visible result, the attempts each upstream saw, a no-hang bound (the faults would take
30 s or more), and the usage record in Postgres (one per request, status, partial, who served it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.fixtures.routing import (  # noqa: F401 - fixture
    fallbacks,
    mocks,
    pair,
    routing_toml,
    sdk_call,
    upstream_toml,
)
from tests.test_ledger_gateway import cost, wait_rows

SETTINGS = {"retries": 2, "retry_base_ms": 5, "max_retry_wait": 2.0, "first_byte_timeout": 2.0,
            "ttft_timeout": 2.0, "idle_timeout": 2.0, "raw": "breaker = { failure_threshold = 1000 }\n"}
BOUND = 15.0  # seconds: far below the 30 s the faults would hold a request


def scenario_toml(a: str, b: str, journal: Any) -> str:
    ups = upstream_toml("a", a, **SETTINGS) + "\n" + upstream_toml("b", b, **SETTINGS)
    routes = f"""
        [[routes]]
        match = "demo-r"
        deployments = {pair(["a"])}
        fallbacks = {fallbacks(["b"])}

        [[routes]]
        match = "demo-ctx"
        deployments = {pair(["a"])}
        context_fallback_models = ["demo-long"]

        [[routes]]
        match = "demo-long"
        deployments = {pair(["b"], model="demo-big")}
        """
    return routing_toml(ups, routes, f'[accounting]\njournal_dir = "{journal}"\nflush_ms = 50\n')


@dataclass
class Case:
    name: str
    a: dict[str, Any]  # a's fault script (POST /_mock/faults)
    a_seen: int  # attempts a saw (per request)
    b_seen: int
    served: str | None = "a"  # who served (None: nobody, an error)
    status: int = 200
    error: bool = False  # the SDK raised (a status error, or an error inside a 200 stream)
    partial: bool = False
    b: dict[str, Any] = field(default_factory=dict)
    streams: tuple[bool, ...] = (False, True)
    model: str = "demo-r"
    served_model: str = "demo-r"
    repeat: int = 1
    dialects: tuple[str, ...] = ("anthropic", "openai")


def then(**switches: str) -> dict[str, Any]:
    return {"then": {f"x-mock-{k.replace('_', '-')}": v for k, v in switches.items()}}


def once(**switches: str) -> dict[str, Any]:
    return {"steps": [{f"x-mock-{k.replace('_', '-')}": v for k, v in switches.items()}]}


CASES = [
    Case("429 retry-after 50 ms, once: retried on a", once(status="429", retry_after_ms="50"), 2, 0),
    Case("429 retry-after 30 s > max_retry_wait: fails over at once", then(status="429", retry_after="30"), 1, 1,
         served="b"),
    Case("500 once: retried on a", once(status="500"), 2, 0),
    Case("502 once: retried on a", once(status="502"), 2, 0),
    Case("503 always: 1 + 2 retries on a, then b", then(status="503"), 3, 1, served="b"),
    Case("529 on a and b: the last answer relayed", then(status="529"), 3, 3, served=None, status=529, error=True,
         b=then(status="529")),
    Case("504 always: fails over, not retried", then(status="504"), 1, 1, served="b"),
    Case("connection reset once: retried on a", once(reset="1"), 2, 0),
    Case("no answer: first-byte timeout fails over, not retried", then(latency_ms="30000"), 1, 1, served="b"),
    Case("headers at once, first event late: TTFT fails over", then(ttft_ms="30000"), 1, 1, served="b",
         streams=(True,)),
    Case("opening events at once, first token late: TTFT fails over", then(first_delta_ms="30000"), 1, 1,
         served="b", streams=(True,)),
    Case("stream cut before any content: retried invisibly", once(drop_after="0"), 2, 0, streams=(True,)),
    Case("body cut half-way: retried invisibly", once(drop_after="0"), 2, 0, streams=(False,)),
    Case("stream cut after content: error event, partial", once(drop_after="2"), 1, 0, error=True, partial=True,
         streams=(True,)),
    Case("stream stalled after content: idle timeout, partial", once(stall_after="2"), 1, 0, error=True,
         partial=True, streams=(True,)),
    Case("upstream error event after content: relayed, partial", once(error_after="2"), 1, 0, error=True,
         partial=True, streams=(True,)),
    Case("OpenAI stream without [DONE] after finish_reason: complete", once(no_done="1"), 1, 0, streams=(True,),
         dialects=("openai",)),
    Case("Anthropic stream without message_stop: cut", once(no_done="1"), 1, 0, error=True, partial=True,
         streams=(True,), dialects=("anthropic",)),
    Case("context-length 400 with context_fallback_models: the long route serves",
         then(status="400", error="context_length"), 1, 1, served="b", model="demo-ctx", served_model="demo-big"),
    Case("context-length 400 without context fallback: relayed", then(status="400", error="context_length"), 1, 0,
         served=None, status=400, error=True),
    Case("content-filter 400: relayed at once", then(status="400", error="content_filter"), 1, 0, served=None,
         status=400, error=True, model="demo-ctx"),
    Case("flapping upstream (500, ok, ...): every request served by a", {"steps": [{"x-mock-status": "500"}, {}],
         "cycle": True}, 2, 0, repeat=3),
]

PARAMS = [
    pytest.param(case, dialect, stream, id=f"{case.name} [{dialect}{' stream' if stream else ''}]")
    for case in CASES for dialect in case.dialects for stream in case.streams
]


@pytest.mark.parametrize(("case", "dialect", "stream"), PARAMS)
async def test_scenario(make_gateway, mocks, pg_env, tmp_path, case: Case, dialect: str, stream: bool):  # noqa: F811
    a, b = await mocks(), await mocks()
    await a.faults(**case.a)
    await b.faults(**case.b)
    gw = await make_gateway(scenario_toml(a.base_url, b.base_url, tmp_path))
    base = str(gw.make_url("")).rstrip("/")
    outs = [await sdk_call(base, dialect, case.model, stream=stream) for _ in range(case.repeat)]
    for out in outs:
        assert (case.status, case.error) == (out.status, out.error is not None), out
        assert out.seconds < BOUND, out  # no hang: the fault alone would hold it 30 s
        if case.served is not None:
            assert (f"{case.served}-{dialect}", case.served_model) == (
                out.headers["x-gateway-upstream"], out.headers["x-gateway-model"])
        if not case.partial:
            assert str(case.a_seen + case.b_seen) == out.headers["x-gateway-attempts"], out.headers
    assert (case.a_seen * case.repeat, case.b_seen * case.repeat) == (await a.count(), await b.count())
    rows = await wait_rows(pg_env, case.repeat)
    assert case.repeat == len(rows)
    for out in outs:
        row = rows[out.request_id]
        streamed = stream and case.status == 200  # an error answer is JSON even to a stream request
        assert (case.status, case.partial, streamed) == (row["status"], row["partial"], row["streamed"]), dict(row)
        assert case.model == row["model"]
        if case.served is not None:
            assert (f"{case.served}-{dialect}", case.served_model) == (row["upstream"], row["served_model"])
        if case.status == 200 and not case.partial:
            # 5 from the answer, plus what an abandoned Anthropic attempt's message_start reported (1).
            assert row["output_tokens"] in (5, 6)
            assert row["cost_pico"] > 0


async def test_a_stream_abandoned_after_message_start_is_charged_to_the_same_request(
        make_gateway, mocks, pg_env, tmp_path):  # noqa: F811
    """a sends message_start (input tokens, output_tokens: 1) then nothing: abandoned at ttft_timeout, b
    serves.  The one usage record carries both attempts' reported usage (a's is not lost), priced once each."""
    a, b = await mocks(), await mocks()
    await a.faults(**then(first_delta_ms="30000"))
    gw = await make_gateway(scenario_toml(a.base_url, b.base_url, tmp_path))
    out = await sdk_call(str(gw.make_url("")).rstrip("/"), "anthropic", "demo-r", stream=True)
    assert (200, None) == (out.status, out.error)
    single = await sdk_call(str(gw.make_url("")).rstrip("/"), "anthropic", "demo-long", stream=True)
    rows = await wait_rows(pg_env, 2)
    one = rows[single.request_id]
    row = rows[out.request_id]
    assert (2 * one["input_tokens"], 5 + 1) == (row["input_tokens"], row["output_tokens"])
    assert cost(one["input_tokens"], 5) == one["cost_pico"]
    assert cost(one["input_tokens"], 5) + cost(one["input_tokens"], 1) == row["cost_pico"]
    assert 1 == (await a.stats()).get("streams_cancelled", 0)  # a's connection was closed
