"""OpenTelemetry tracing ([tracing]): spans of real requests arrive at a local OTLP/HTTP receiver
(an aiohttp server decoding the protobuf with opentelemetry-proto) with the GenAI attributes and the
right parents, the client's W3C traceparent is honoured and propagated upstream; off, nothing is wired."""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from gateway.observability.tracing import TRACING
from tests.conftest import TEST_KEY, gateway_toml
from tests.fixtures.servers import free_port

SERVER, CLIENT = 2, 3  # span kinds in the OTLP protobuf


def _value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


class Receiver:
    """An OTLP/HTTP traces endpoint: every span it was sent, flattened."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.server: TestServer | None = None

    async def traces(self, request: web.Request) -> web.Response:
        assert "application/x-protobuf" == request.content_type
        req = ExportTraceServiceRequest.FromString(await request.read())
        for rs in req.resource_spans:
            resource = {a.key: _value(a.value) for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    self.spans.append({
                        "name": s.name, "trace_id": s.trace_id.hex(), "span_id": s.span_id.hex(),
                        "parent": s.parent_span_id.hex(), "kind": s.kind, "status": s.status.code,
                        "attrs": {a.key: _value(a.value) for a in s.attributes},
                        "start": s.start_time_unix_nano, "end": s.end_time_unix_nano, "resource": resource,
                    })
        return web.Response(body=ExportTraceServiceResponse().SerializeToString(),
                            content_type="application/x-protobuf")

    async def wait_for(self, pred: Any, timeout: float = 20.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while not pred(self.spans):
            assert time.monotonic() < deadline, f"spans never arrived: {[s['name'] for s in self.spans]}"
            await asyncio.sleep(0.05)
        return self.spans


@pytest.fixture
async def receiver(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")  # export within 50 ms instead of 5 s
    rec = Receiver()
    app = web.Application()
    app.router.add_post("/v1/traces", rec.traces)
    rec.server = TestServer(app, host="127.0.0.1")
    await rec.server.start_server()
    yield rec
    await rec.server.close()


def traced_toml(upstream: str, receiver: Receiver) -> str:
    assert receiver.server is not None
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens: attempt 1 fails to connect
    return gateway_toml(upstream, extra=f"""
        [tracing]
        enabled = true
        endpoint = "http://127.0.0.1:{receiver.server.port}/v1/traces"
        sample_ratio = 1.0
        service_name = "gw-under-test"

        [upstreams.dead]
        provider = "anthropic"
        base_url = "{dead}"
        api_key_env = "TEST_ANTHROPIC_KEY"
        retries = 0  # one attempt here, then the fallback: the span count below is exact

        [[routes]]
        match = "trace-*"
        deployments = [{{ upstream = "dead" }}]
        fallbacks = ["mock-anthropic"]
        """)


HEADERS = {"x-api-key": TEST_KEY, "anthropic-version": "2023-06-01"}


@pytest.mark.parametrize("stream", [False, True])
async def test_a_failover_request_exports_its_spans_with_genai_attributes(receiver, make_gateway, mock_upstream,
                                                                          stream):
    """A request whose first upstream is down: one SERVER span (child of the client's traceparent) with
    children policy, two CLIENT attempts (connection error, then 200) and relay; the upstream got a
    traceparent naming the answering attempt."""
    gw = await make_gateway(traced_toml(mock_upstream.base_url, receiver))
    trace_id, client_span = secrets.token_hex(16), secrets.token_hex(8)
    body = {"model": "trace-claude", "max_tokens": 5, "stream": stream, "messages": [{"role": "user", "content": "hi"}]}
    r = await gw.post("/v1/messages", json=body, headers={**HEADERS, "traceparent": f"00-{trace_id}-{client_span}-01"})
    assert 200 == r.status
    await r.read()

    spans = await receiver.wait_for(lambda ss: any(s["kind"] == SERVER for s in ss) and len(ss) >= 5)
    assert {trace_id} == {s["trace_id"] for s in spans}
    (server,) = [s for s in spans if s["kind"] == SERVER]
    assert client_span == server["parent"]
    assert "POST /v1/messages" == server["name"]
    a = server["attrs"]
    assert "chat" == a["gen_ai.operation.name"] and "anthropic" == a["gen_ai.system"]
    assert "trace-claude" == a["gen_ai.request.model"]
    assert a["gen_ai.usage.input_tokens"] > 0 and a["gen_ai.usage.output_tokens"] > 0
    assert 200 == a["http.response.status_code"] and 2 == a["gateway.attempts"]
    assert "mock-anthropic" == a["gateway.upstream"]
    assert "gw-under-test" == server["resource"]["service.name"]

    children = {s["name"]: s for s in spans if s["parent"] == server["span_id"]}
    assert {"policy", "relay"} <= set(children)
    assert "admitted" == children["policy"]["attrs"]["gateway.decision"]
    attempts = sorted((s for s in spans if s["kind"] == CLIENT), key=lambda s: s["attrs"]["gateway.attempt"])
    assert [1, 2] == [s["attrs"]["gateway.attempt"] for s in attempts]
    assert all(s["parent"] == server["span_id"] for s in attempts)
    assert ["dead", "mock-anthropic"] == [s["attrs"]["gateway.upstream"] for s in attempts]
    assert "error.type" in attempts[0]["attrs"] and 2 == attempts[0]["status"]  # STATUS_CODE_ERROR
    assert 200 == attempts[1]["attrs"]["http.response.status_code"]
    assert "trace-claude" == attempts[1]["attrs"]["gen_ai.request.model"]
    assert attempts[1]["end"] <= children["relay"]["start"] + 1 and children["relay"]["end"] <= server["end"]

    seen = (await mock_upstream.requests())[-1]["headers"]
    assert f"00-{trace_id}-{attempts[1]['span_id']}-01" == seen["traceparent"]


async def test_without_a_client_traceparent_the_request_starts_a_trace(receiver, make_gateway, mock_upstream):
    gw = await make_gateway(traced_toml(mock_upstream.base_url, receiver))
    body = {"model": "demo-claude", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    r = await gw.post("/v1/messages", json=body, headers=HEADERS)
    assert 200 == r.status
    spans = await receiver.wait_for(lambda ss: any(s["kind"] == SERVER for s in ss))
    (server,) = [s for s in spans if s["kind"] == SERVER]
    assert "" == server["parent"]
    seen = (await mock_upstream.requests())[-1]["headers"]
    assert seen["traceparent"].split("-")[1] == server["trace_id"]


async def test_a_refused_request_has_a_failed_policy_span(receiver, make_gateway, mock_upstream):
    """A model the key may not use: the policy span records the decision; no upstream attempt."""
    from tests.conftest import OTHER_KEY

    gw = await make_gateway(traced_toml(mock_upstream.base_url, receiver))
    body = {"model": "demo-claude", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    r = await gw.post("/v1/messages", json=body, headers={**HEADERS, "x-api-key": OTHER_KEY})
    assert 403 == r.status
    spans = await receiver.wait_for(lambda ss: any(s["kind"] == SERVER for s in ss))
    (policy,) = [s for s in spans if s["name"] == "policy"]
    assert "permission" == policy["attrs"]["gateway.decision"]
    assert 2 == policy["status"]
    assert not [s for s in spans if s["kind"] == CLIENT]


async def test_off_by_default_nothing_is_wired_and_traceparent_passes_through(gateway, mock_upstream):
    """Without [tracing]: no tracing middleware, no client trace config, the plain admitter; a client's
    traceparent reaches the upstream unchanged."""
    app = gateway.server.app
    assert TRACING not in app
    assert 1 == len(app.middlewares)
    from gateway import keys
    from gateway.policy.admit import Admitter

    assert type(app[keys.ADMITTER]) is Admitter
    assert [] == list(app[keys.CLIENT].trace_configs)
    tp = f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"
    body = {"model": "demo-claude", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    r = await gateway.post("/v1/messages", json=body, headers={**HEADERS, "traceparent": tp})
    assert 200 == r.status
    assert tp == (await mock_upstream.requests())[-1]["headers"]["traceparent"]
