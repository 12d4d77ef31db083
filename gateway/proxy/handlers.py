"""Data-plane handlers: thin.  key -> body facts -> admit -> forward -> relay -> settle."""

from __future__ import annotations

import time
from typing import Any

import orjson
from aiohttp import web

from gateway import keys
from gateway.accounting.record import UsageRecord
from gateway.accounting.sse import StreamTap
from gateway.accounting.tags import HEADER as TAGS_HEADER
from gateway.accounting.usage import Usage
from gateway.errors import ANTHROPIC, OPENAI, ErrorKind, GatewayError
from gateway.policy.admit import RequestFacts, Reservation, model_allowed
from gateway.policy.principals import Principal
from gateway.proxy.context import RequestContext
from gateway.proxy.forward import open_upstream
from gateway.proxy.streaming import relay_body, relay_stream


def access_key(request: web.Request) -> str:
    """The key from /ak/{key}/, then x-api-key, then Authorization: Bearer."""
    key = request.match_info.get("access_key")
    if key:
        return key
    h = request.headers
    key = h.get("x-api-key")
    if key:
        return key
    auth = h.get("authorization")
    if auth and auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return ""


async def authenticate(request: web.Request, ctx: RequestContext) -> Principal:
    key = access_key(request)
    if not key:
        raise GatewayError(ErrorKind.AUTHENTICATION, "Missing API key: send x-api-key or Authorization: Bearer.")
    principal = await request.app[keys.RESOLVER].resolve(key)
    if principal is None:
        raise GatewayError(ErrorKind.AUTHENTICATION, "Invalid API key.")
    ctx.key_prefix = principal.key_prefix
    ctx.user_id = principal.user_id
    return principal


async def read_body(request: web.Request) -> bytes:
    limit = request.app[keys.CONFIG].server.max_body_bytes
    length = request.content_length
    if length is not None and length > limit:
        raise GatewayError(ErrorKind.TOO_LARGE, f"Request body is larger than {limit} bytes.")
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise GatewayError(ErrorKind.TOO_LARGE, f"Request body is larger than {limit} bytes.") from None


def _bad(msg: str) -> GatewayError:
    return GatewayError(ErrorKind.INVALID_REQUEST, msg)


def parse_facts(body: bytes, request: web.Request, ctx: RequestContext) -> tuple[dict[str, Any], RequestFacts]:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise _bad("Request body is not valid JSON.") from None
    if not isinstance(doc, dict):
        raise _bad("Request body must be a JSON object.")
    model = doc.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("model: a model name is required.")
    stream = doc.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _bad("stream: must be true or false.")
    max_tokens = doc.get("max_tokens")
    if max_tokens is None:
        max_tokens = doc.get("max_completion_tokens")
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise _bad("max_tokens: must be a positive integer.")
    ctx.model = model
    return doc, RequestFacts(
        model=model,
        stream=stream,
        max_tokens=max_tokens,
        body_len=len(body),
        client_ip=request.remote or "",
        request_id=ctx.request_id,
    )


def _wants_usage(doc: dict[str, Any]) -> bool:
    opts = doc.get("stream_options")
    return isinstance(opts, dict) and opts.get("include_usage") is True


async def proxy(request: web.Request, dialect: str, charge: bool, path: str) -> web.StreamResponse:
    app = request.app
    ctx: RequestContext = request[keys.REQ_CTX]
    ctx.dialect = dialect
    principal = await authenticate(request, ctx)
    body = await read_body(request)
    doc, facts = parse_facts(body, request, ctx)
    ctx.tags = app[keys.TAGS].for_request(request.headers.get(TAGS_HEADER), doc, dialect, principal.tags)
    route, candidates = app[keys.ROUTER].candidates(facts.model, dialect)
    ctx.route = route.match
    if charge and app[keys.PRICES].refuses(facts.model):
        # pricing.unknown_model = "refuse": an unpriced model is as unavailable as an unrouted one.
        raise GatewayError(ErrorKind.NOT_FOUND, f"The model {facts.model!r} has no price configured on this gateway.")
    admitter = app[keys.ADMITTER]
    reservation = await admitter.admit(principal, facts)

    strip_usage = False
    if dialect == OPENAI and facts.stream and charge and not _wants_usage(doc):
        # Ask for the usage chunk; the tap removes it before the client sees it.
        opts = doc.get("stream_options")
        doc["stream_options"] = {**(opts if isinstance(opts, dict) else {}), "include_usage": True}
        body = orjson.dumps(doc)
        strip_usage = True

    usage = Usage()
    tap: StreamTap | None = None
    status = 0
    try:
        dep, resp = await open_upstream(
            app[keys.CLIENT], ctx, candidates, request.method, _upstream_path(request, path),
            request.headers, body,
        )
        status = resp.status
        ctype = resp.headers.get("content-type", "")
        if resp.status == 200 and ctype.startswith("text/event-stream"):
            tap = StreamTap(dialect, strip_usage=strip_usage)
            return await relay_stream(request, dep, resp, ctx, reservation.headers, tap)
        response, usage = await relay_body(dep, resp, ctx, reservation.headers)
        return response
    except GatewayError as err:
        status = err.kind.status_for(dialect)
        err.headers.update(reservation.headers)
        raise
    except BaseException:
        ctx.partial = True
        raise
    finally:
        if tap is not None:
            usage = tap.usage
            usage.output_tokens = tap.output_estimate
            ctx.partial = ctx.partial or not tap.completed
        _finish(request, ctx, principal, facts, reservation, usage, status, charge)


def _upstream_path(request: web.Request, path: str) -> str:
    """The path the provider expects: /ak/{key} stripped, the query string kept."""
    qs = request.query_string
    return path + "?" + qs if qs else path


def _finish(
    request: web.Request,
    ctx: RequestContext,
    principal: Principal,
    facts: RequestFacts,
    reservation: Reservation,
    usage: Usage,
    status: int,
    charge: bool,
) -> None:
    """Record usage once and settle the reservation off the hot path."""
    app = request.app
    cost = 0
    priced = True
    if charge and (usage.found or usage.output_tokens):
        price = app[keys.PRICES].lookup(facts.model)
        if price is None:
            priced = False
            price = app[keys.PRICES].default
        cost = price.cost_micros(usage) if price is not None else 0
    elif not charge:
        usage = Usage()
    ctx.input_tokens = usage.input_tokens + usage.cache_read_tokens + usage.cache_write_tokens
    ctx.output_tokens = usage.output_tokens
    ctx.cost_micros = cost
    now = time.perf_counter()
    app[keys.USAGE].record(
        UsageRecord(
            request_id=ctx.request_id,
            ts=ctx.wall_start,
            key_id=principal.key_id,
            user_id=principal.user_id,
            model=facts.model,
            route=ctx.route,
            upstream=ctx.upstream,
            status=status,
            streamed=ctx.streamed,
            partial=ctx.partial,
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            cache_write_tokens=usage.cache_write_tokens,
            cache_read_tokens=usage.cache_read_tokens,
            cost_micros=cost,
            priced=priced,
            upstream_ms=ctx.upstream_s * 1000.0,
            ttft_ms=None if ctx.ttft_s is None else ctx.ttft_s * 1000.0,
            gateway_ms=ctx.gateway_ms(now),
            error_kind=ctx.error_kind,
            budget_keys=reservation.budget_keys,
            tags=ctx.tags,
        )
    )
    if ctx.tags:
        app[keys.TAGS].observe(ctx.tags, cost)
    if reservation.state is not None:
        app[keys.TASKS].spawn(
            app[keys.ADMITTER].settle(principal, facts, reservation, usage.total_tokens, cost)
        )


async def messages(request: web.Request) -> web.StreamResponse:
    return await proxy(request, ANTHROPIC, charge=True, path="/v1/messages")


async def count_tokens(request: web.Request) -> web.StreamResponse:
    return await proxy(request, ANTHROPIC, charge=False, path="/v1/messages/count_tokens")


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await proxy(request, OPENAI, charge=True, path="/v1/chat/completions")


async def embeddings(request: web.Request) -> web.StreamResponse:
    return await proxy(request, OPENAI, charge=True, path="/v1/embeddings")


async def models(request: web.Request) -> web.StreamResponse:
    """The models this key may use: OpenAI list shape, Anthropic's with anthropic-version."""
    ctx: RequestContext = request[keys.REQ_CTX]
    anthropic = "anthropic-version" in request.headers
    ctx.dialect = ANTHROPIC if anthropic else OPENAI
    principal = await authenticate(request, ctx)
    # An expired key or a disabled user may not even list models.
    if principal.expires_at is not None and time.time() >= principal.expires_at:
        raise GatewayError(ErrorKind.AUTHENTICATION, "This API key has expired.")
    if principal.user_disabled:
        raise GatewayError(ErrorKind.PERMISSION, "The user of this API key is disabled.")
    names = [
        m for m in request.app[keys.ROUTER].listed_models(request.app[keys.PRICES].exact_models())
        if model_allowed(m, principal.key_limits) and model_allowed(m, principal.user_limits)
        and model_allowed(m, principal.team_limits)
    ]
    if anthropic:
        data: dict[str, Any] = {
            "data": [
                {"type": "model", "id": m, "display_name": m, "created_at": "2025-01-01T00:00:00Z"}
                for m in names
            ],
            "has_more": False,
            "first_id": names[0] if names else None,
            "last_id": names[-1] if names else None,
        }
    else:
        data = {
            "object": "list",
            "data": [{"id": m, "object": "model", "created": 0, "owned_by": "llm-gateway"} for m in names],
        }
    return web.Response(body=orjson.dumps(data), content_type="application/json")
