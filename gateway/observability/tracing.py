"""Optional OpenTelemetry traces ([tracing] in the config), exported over OTLP/HTTP.

One SERVER span per request (the W3C ``traceparent`` of the client, when it
sends one, is its parent), with children:

- ``policy``: the admission decision (key limits, rate limits, budget);
- one CLIENT span per upstream attempt (a failover or a hedge makes several),
  whose context goes upstream as ``traceparent``;
- ``relay``: from the answering attempt's response headers to the last byte
  relayed to the client.

Attributes follow the OpenTelemetry GenAI semantic conventions
(``gen_ai.operation.name``, ``gen_ai.system``, ``gen_ai.request.model``,
``gen_ai.usage.input_tokens``, ``gen_ai.usage.output_tokens``) and HTTP ones.

Off (the default) nothing of this is wired: no middleware, no client trace
config, no wrapped admitter, so the request path runs exactly the code it
runs without this module (``loadtests/bench_tracing_off.py`` counts the calls).
The OpenTelemetry packages (the ``tracing`` extra) are imported only when it
is on.  The per-attempt hook is aiohttp's client tracing (``TraceConfig``) on
the upstream session: proxy/forward.py has no tracing code at all.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from gateway import keys
from gateway.config import Config
from gateway.errors import GatewayError
from gateway.policy.admit import Admitter, RequestFacts, Reservation
from gateway.policy.principals import Principal

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, Tracer

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# The dialect's GenAI system and operation, by data-plane path suffix.
_OPERATIONS = {
    "/v1/messages": ("anthropic", "chat"),
    "/v1/messages/count_tokens": ("anthropic", "count_tokens"),
    "/v1/chat/completions": ("openai", "chat"),
    "/v1/embeddings": ("openai", "embeddings"),
    "/v1/responses": ("openai", "chat"),
    "/v1/models": ("", "models"),
}


@dataclass(slots=True)
class _RequestTrace:
    """One request's spans, shared (through a ContextVar) with the client trace callbacks."""

    span: Span
    request: web.Request
    system: str
    operation: str
    attempts: list[Span] = field(default_factory=list)
    answered_ns: int = 0  # when the last attempt's response headers arrived: the relay starts there


# Context variables are per task and copied into child tasks (a hedge's second
# attempt), which is what ties an upstream attempt to its request.
_CURRENT: contextvars.ContextVar[_RequestTrace | None] = contextvars.ContextVar("gw_trace", default=None)


class Tracing:
    """The tracer provider (started in cleanup_ctx) and the hooks that use it."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg.tracing
        self.provider: TracerProvider | None = None
        self.tracer: Tracer | None = None
        try:
            from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
        except ImportError:
            raise RuntimeError(
                "tracing.enabled needs the OpenTelemetry packages: pip install 'llm-gateway[tracing]'"
            ) from None

        self.propagator = TraceContextTextMapPropagator()

    def start(self) -> None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

        provider = TracerProvider(
            resource=Resource.create({"service.name": self.cfg.service_name}),
            sampler=ParentBased(TraceIdRatioBased(self.cfg.sample_ratio)),
        )
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=self.cfg.endpoint, timeout=5)))
        self.provider = provider
        self.tracer = provider.get_tracer("llm-gateway")

    def shutdown(self) -> None:
        if self.provider is not None:
            self.provider.shutdown()  # flushes what is queued (blocking: run off the loop)

    # -- the request span ---------------------------------------------------------

    def middleware(self) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
        from opentelemetry import context as otel_context
        from opentelemetry import trace
        from opentelemetry.trace import SpanKind, Status, StatusCode

        tracing = self

        @web.middleware
        async def tracing_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
            tracer = tracing.tracer
            if tracer is None:
                return await handler(request)
            parent = tracing.propagator.extract(request.headers)
            template = request.match_info.route.resource.canonical if request.match_info.route.resource else ""
            endpoint = template.removeprefix("/ak/{access_key}")  # a template: never the key itself
            system, operation = _OPERATIONS.get(endpoint, ("", ""))
            name = f"{request.method} {endpoint}" if endpoint else request.method
            span = tracer.start_span(name, context=parent, kind=SpanKind.SERVER, attributes={
                "http.request.method": request.method, "http.route": endpoint or "unmatched",
            })
            state = _RequestTrace(span, request, system, operation)
            token = otel_context.attach(trace.set_span_in_context(span, parent))
            var_token = _CURRENT.set(state)
            status = 500
            resp: web.StreamResponse | None = None
            try:
                resp = await handler(request)
                status = resp.status
                return resp
            except web.HTTPException as exc:
                status = exc.status
                raise
            finally:
                _CURRENT.reset(var_token)
                otel_context.detach(token)
                tracing._finish(request, state, status, resp, trace, Status, StatusCode)

        return tracing_middleware

    def _finish(self, request: web.Request, state: _RequestTrace, status: int, resp: web.StreamResponse | None,
                trace: Any, status_cls: Any, codes: Any) -> None:
        span = state.span
        ctx = request.get(keys.REQ_CTX)
        now = time.time_ns()
        for attempt in state.attempts:  # cancelled attempts (a hedge's loser, a timeout) end here
            if attempt.is_recording() and attempt.end_time is None:  # type: ignore[attr-defined]
                attempt.set_attribute("gateway.attempt.outcome", "cancelled")
                attempt.end(now)
        attrs: dict[str, Any] = {"http.response.status_code": status}
        if ctx is not None:
            attrs["gateway.request_id"] = ctx.request_id
            if ctx.route:
                attrs.update({
                    "gen_ai.operation.name": state.operation, "gen_ai.system": state.system,
                    "gen_ai.request.model": ctx.model, "gateway.route": ctx.route,
                    "gateway.upstream": ctx.upstream, "gateway.attempts": ctx.attempts,
                    "gen_ai.usage.input_tokens": ctx.input_tokens, "gen_ai.usage.output_tokens": ctx.output_tokens,
                    "gateway.cost_usd": ctx.cost_pico / 1e12, "gateway.streamed": ctx.streamed,
                })
                if resp is not None and "x-gateway-model" in resp.headers:
                    attrs["gen_ai.response.model"] = resp.headers["x-gateway-model"]
            if ctx.error_kind:
                attrs["error.type"] = ctx.error_kind
        span.set_attributes(attrs)
        if state.answered_ns and self.tracer is not None:
            relay = self.tracer.start_span("relay", context=trace.set_span_in_context(span),
                                           start_time=state.answered_ns)
            relay.set_attributes({
                "gateway.streamed": bool(ctx and ctx.streamed), "gateway.partial": bool(ctx and ctx.partial),
                "gen_ai.usage.output_tokens": ctx.output_tokens if ctx else 0,
            })
            relay.end(now)
        if status >= 500:
            span.set_status(status_cls(codes.ERROR, attrs.get("error.type")))
        span.end(now)

    # -- upstream attempts ----------------------------------------------------------

    def client_trace_config(self) -> aiohttp.TraceConfig:
        """A span per upstream HTTP request, its context injected as ``traceparent``."""
        from opentelemetry import trace
        from opentelemetry.trace import SpanKind, Status, StatusCode

        tracing = self
        config = aiohttp.TraceConfig()

        async def on_start(session: aiohttp.ClientSession, tctx: SimpleNamespace,
                           params: aiohttp.TraceRequestStartParams) -> None:
            state = _CURRENT.get()
            tracer = tracing.tracer
            if state is None or tracer is None:
                return
            n = len(state.attempts) + 1
            url = params.url
            ctx = state.request.get(keys.REQ_CTX)
            model = ctx.model if ctx is not None else ""
            span = tracer.start_span(
                f"{state.operation or 'http'} {model}".strip(),
                context=trace.set_span_in_context(state.span), kind=SpanKind.CLIENT,
                attributes={
                    "gen_ai.operation.name": state.operation, "gen_ai.system": state.system,
                    "gen_ai.request.model": model, "gateway.attempt": n,
                    "gateway.upstream": ctx.upstream if ctx is not None else "",
                    "http.request.method": params.method, "server.address": url.host or "",
                    "server.port": url.port or 0, "url.path": url.path,  # never the query (may hold a key)
                },
            )
            state.attempts.append(span)
            tctx.span = span
            tctx.state = state
            tracing.propagator.inject(params.headers, context=trace.set_span_in_context(span))

        async def on_end(session: aiohttp.ClientSession, tctx: SimpleNamespace,
                         params: aiohttp.TraceRequestEndParams) -> None:
            span = getattr(tctx, "span", None)
            if span is None:
                return
            status = params.response.status
            span.set_attribute("http.response.status_code", status)
            if status >= 500 or status == 429:
                span.set_status(Status(StatusCode.ERROR, f"HTTP {status}"))
            now = time.time_ns()
            tctx.state.answered_ns = now  # the relay starts where this attempt ends
            span.end(now)

        async def on_exception(session: aiohttp.ClientSession, tctx: SimpleNamespace,
                               params: aiohttp.TraceRequestExceptionParams) -> None:
            span = getattr(tctx, "span", None)
            if span is None:
                return
            span.set_attribute("error.type", type(params.exception).__name__)
            span.set_status(Status(StatusCode.ERROR, type(params.exception).__name__))
            span.end()

        config.on_request_start.append(on_start)
        config.on_request_end.append(on_end)
        config.on_request_exception.append(on_exception)
        return config


# -- policy ------------------------------------------------------------------------


class TracedAdmitter(Admitter):
    """The admitter with a ``policy`` span around each decision (installed only when tracing is on)."""

    def __init__(self, inner: Admitter, tracing: Tracing) -> None:
        super().__init__(inner.limiter)
        self.inner = inner
        self.tracing = tracing

    async def admit(self, principal: Principal, facts: RequestFacts) -> Reservation:
        tracer = self.tracing.tracer
        state = _CURRENT.get()
        if tracer is None or state is None:
            return await self.inner.admit(principal, facts)
        from opentelemetry import trace
        from opentelemetry.trace import Status, StatusCode

        span = tracer.start_span("policy", context=trace.set_span_in_context(state.span), attributes={
            "gen_ai.request.model": facts.model, "gateway.key_prefix": principal.key_prefix,
            "gen_ai.request.max_tokens": facts.max_tokens or 0, "gateway.streamed": facts.stream,
        })
        try:
            reservation = await self.inner.admit(principal, facts)
        except GatewayError as err:
            span.set_attributes({"gateway.decision": err.kind.label, "error.type": err.kind.label})
            span.set_status(Status(StatusCode.ERROR, err.kind.label))
            raise
        else:
            span.set_attribute("gateway.decision", "admitted")
            return reservation
        finally:
            span.end()

    async def settle(self, principal: Principal, facts: RequestFacts, reservation: Reservation,
                     tokens: int, cost_micros: int) -> None:
        await self.inner.settle(principal, facts, reservation, tokens, cost_micros)


# -- wiring ------------------------------------------------------------------------

TRACING: web.AppKey[Tracing] = web.AppKey("tracing")


def install(app: web.Application, cfg: Config) -> None:
    """create_app's hook (after the other cleanup contexts): nothing at all when tracing is off."""
    if not cfg.tracing.enabled:
        return
    tracing = Tracing(cfg)
    app[TRACING] = tracing
    app.middlewares.insert(0, tracing.middleware())  # type: ignore[arg-type]  # outermost: sees the final status
    app.cleanup_ctx.append(_tracing_ctx)


def client_trace_configs(app: web.Application) -> list[aiohttp.TraceConfig] | None:
    tracing = app.get(TRACING)
    return [tracing.client_trace_config()] if tracing is not None else None


async def _tracing_ctx(app: web.Application) -> AsyncIterator[None]:
    tracing = app[TRACING]
    tracing.start()
    app[keys.ADMITTER] = TracedAdmitter(app[keys.ADMITTER], tracing)
    yield
    await asyncio.get_running_loop().run_in_executor(None, tracing.shutdown)
