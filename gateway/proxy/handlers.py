"""Data-plane handlers: thin.  key -> body facts -> admit -> forward -> relay -> settle."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import orjson
from aiohttp import web
from aiohttp.streams import StreamReader
from multidict import CIMultiDict

from gateway import keys
from gateway.accounting.pricing import PriceTable
from gateway.accounting.record import UsageRecord
from gateway.accounting.responses_tap import ResponsesTap
from gateway.accounting.sse import StreamTap
from gateway.accounting.tags import HEADER as TAGS_HEADER
from gateway.accounting.usage import Usage
from gateway.errors import ANTHROPIC, OPENAI, ErrorKind, GatewayError
from gateway.policy.admit import Admitter, RequestFacts, Reservation, model_allowed, output_cap
from gateway.policy.model_names import model_problem
from gateway.policy.output_cap import BadOutputAsk, effective_output, inject
from gateway.policy.principals import Principal, PrincipalResolver
from gateway.proxy.attempts import UpstreamRequest
from gateway.proxy.context import RequestContext
from gateway.proxy.failover import Failover
from gateway.proxy.fairshare import Held, pool_size
from gateway.proxy.forward import upstream_headers
from gateway.proxy.hot import HOT, Hot
from gateway.proxy.routing import Deployment
from gateway.proxy.streaming import relay_body, relay_stream, served_headers
from gateway.server import body as body_codec
from gateway.translate.attempt import TRANSLATABLE, Translation, prepare


async def authenticate(
    request: web.Request, ctx: RequestContext, resolver: PrincipalResolver | None = None
) -> Principal:
    # The key from /ak/{key}/, then x-api-key, then Authorization: Bearer.
    # request._match_info, ._headers, ... : the attributes behind aiohttp's properties (server/dispatch.py).
    key = request._match_info.get("access_key")  # type: ignore[union-attr]  # a routed web.Request's
    if not key:
        h = request._headers
        key = h.get("x-api-key")
        if not key:
            auth = h.get("authorization")
            key = auth[7:].strip() if auth and auth[:7].lower() == "bearer " else ""
    if not key:
        raise GatewayError(ErrorKind.AUTHENTICATION, "Missing API key: send x-api-key or Authorization: Bearer.")
    if resolver is None:
        resolver = request.app[keys.RESOLVER]
    principal = await resolver.resolve(key, request.remote or "")
    if principal is None:
        raise GatewayError(ErrorKind.AUTHENTICATION, "Invalid API key.")
    ctx.key_prefix = principal.key_prefix
    ctx.user_id = principal.user_id
    return principal


async def read_body(request: web.Request, limit: int) -> bytes:
    declared = request._headers.get("Content-Length")  # request.content_length; llhttp checked the digits
    length = None if declared is None else int(declared)
    if length is not None and length > limit:
        raise GatewayError(ErrorKind.TOO_LARGE, f"Request body is larger than {limit} bytes.")
    payload = request._payload
    if length is not None and payload.__class__ is StreamReader and payload._eof:
        # The whole body is here already (the usual case: it came with the headers), within the
        # limit: taken at once, not by request.read()'s loop of awaited reads (about ten calls).
        buffer = payload._buffer
        protocol = request._protocol
        if len(buffer) == 1 and not payload._buffer_offset and protocol is not None and not protocol._reading_paused:
            # One piece, and reading is not paused: read_nowait() would pop it and resume reading
            # (another pass of the connection's data_received): eight calls for one popleft.
            raw = buffer.popleft()
            payload._size = 0
            payload._cursor += len(raw)
        else:
            raw = payload.read_nowait()
    else:
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise GatewayError(ErrorKind.TOO_LARGE, f"Request body is larger than {limit} bytes.") from None
    encoding = request._headers.get("content-encoding")
    if encoding is None:
        return raw
    try:
        return body_codec.decode(raw, encoding, limit)  # forwarded decoded, without the header
    except body_codec.TooLarge:
        raise GatewayError(ErrorKind.TOO_LARGE, f"Decoded request body is larger than {limit} bytes.") from None
    except body_codec.UnsupportedEncoding as exc:
        raise GatewayError(ErrorKind.UNSUPPORTED_ENCODING, str(exc)) from None
    except body_codec.BodyError as exc:
        raise GatewayError(ErrorKind.INVALID_REQUEST, str(exc)) from None


RESPONSES_PATH = "/v1/responses"


def _bad(msg: str) -> GatewayError:
    return GatewayError(ErrorKind.INVALID_REQUEST, msg)


_GOOD_MODELS: set[str] = set()


def parse_facts(
    body: bytes, request: web.Request, ctx: RequestContext, path: str = ""
) -> tuple[dict[str, Any], RequestFacts]:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise _bad("Request body is not valid JSON.") from None
    if doc.__class__ is not dict:  # orjson gives exact types: no isinstance call needed
        raise _bad("Request body must be a JSON object.")
    model: str = doc.get("model")  # type: ignore[assignment]  # checked just below
    if model.__class__ is not str or model not in _GOOD_MODELS:
        problem = model_problem(model)
        if problem is not None:
            raise _bad(problem)
        if len(_GOOD_MODELS) < 4096:  # names clients sent that passed: checked once
            _GOOD_MODELS.add(model)
    stream = doc.get("stream", False)
    if stream is None:
        stream = False
    elif stream.__class__ is not bool:
        raise _bad("stream: must be true or false.")
    try:
        ask = effective_output(doc, path)
    except BadOutputAsk as exc:
        raise _bad(str(exc)) from None
    ctx.model = model
    return doc, RequestFacts(
        model=model,
        stream=stream,
        max_tokens=ask.per_choice,
        body_len=len(body),
        client_ip=request.remote or "",
        request_id=ctx.request_id,
        choices=ask.choices,
        cap_field=ask.cap_field,
    )


def _wants_usage(doc: dict[str, Any]) -> bool:
    opts = doc.get("stream_options")
    return isinstance(opts, dict) and opts.get("include_usage") is True


def proxy_handler(dialect: str, charge: bool, path: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """The handler of one data-plane path: its dialect, whether it is charged, its upstream path.

    A closure rather than a wrapper around a shared coroutine: every await of a
    request resumes each frame of its stack, so one frame fewer is work saved on
    every upstream read."""
    translatable = path in TRANSLATABLE
    req_ctx = keys.REQ_CTX

    async def proxy(request: web.Request) -> web.StreamResponse:
        hot: Hot = request._match_info._current_app._state[HOT]  # type: ignore[union-attr,assignment]  # request.app[HOT]
        ctx: RequestContext = request._state[req_ctx]  # set by the middleware
        ctx.dialect = dialect
        principal = await authenticate(request, ctx, hot.resolver)
        body = await read_body(request, hot.max_body_bytes)
        doc, facts = parse_facts(body, request, ctx, path)
        headers = request._headers
        ctx.tags = hot.tags.for_request(headers.get(TAGS_HEADER), doc, dialect, principal.tags)
        router = hot.router
        plan = router.plan(facts.model, dialect, translatable)
        candidates = router.order(plan)
        route = plan.route
        ctx.route = route.match
        qs = request._rel_url.raw_query_string
        # The raw query string, never the decoded one: ``?x=%20y`` decoded would put a space
        # into the upstream request line (and ``%00`` a NUL).
        path_qs = path + "?" + qs if qs else path
        translation: Translation | None = None
        if plan.translates:
            # A deployment of the other dialect: translated now when it is the first
            # choice (its max_tokens and size are what the reservation counts), else
            # only if the request fails over that far.
            translation, candidates = prepare(
                route, doc, dialect, candidates, facts, _max_tokens_cap(principal),
                include_usage=_wants_usage(doc), client_path=path_qs,
            )
        prices = hot.prices
        if charge and prices.default is None and prices.refuses(facts.model) and all(
            prices.refuses(d.model) for d in candidates
        ):
            # pricing.unknown_model = "refuse": an unpriced model is as unavailable as an unrouted one.
            raise GatewayError(ErrorKind.NOT_FOUND, f"The model {facts.model!r} has no price configured on this gateway.")
        admitter = hot.admitter
        reservation = await admitter.admit(principal, facts)

        # No output limit asked but one applies: the provider enforces the cap (policy/output_cap.py).
        rewrite = inject(doc, facts.output_ask, output_cap(principal)) is not None
        strip_usage = False
        if dialect == OPENAI and facts.stream and charge and path != RESPONSES_PATH and not _wants_usage(doc):
            # Ask for the usage chunk; the tap removes it before the client sees it.
            opts = doc.get("stream_options")
            doc["stream_options"] = {**(opts if isinstance(opts, dict) else {}), "include_usage": True}
            rewrite = strip_usage = True
        if rewrite:
            body = orjson.dumps(doc)

        usage = Usage()
        tap: StreamTap | None = None
        status = 0
        hedges: list[Reservation] = []
        held: Held | None = None
        out = Outgoing(facts.model, body, doc, hot.header_policy.select(headers), translation)
        failover = Failover(
            hot.client, ctx,
            UpstreamRequest(request._method, path_qs, out.body, out.headers, facts.stream,
                            None if translation is None else translation.path_for),
            candidates, plan.context, route.hedge_after_ms,
            _hedge_reserver(admitter, principal, facts, hedges) if route.hedge_after_ms > 0 else None,
        )
        try:
            # This key's and user's fair share of the upstream pool (429 when it stays full).
            fair = hot.fair_share
            pool = candidates[0].upstream.cfg.max_connections if len(candidates) == 1 else pool_size(candidates)
            held = fair.take(principal.key_id, principal.user_id, pool)
            if held is None:
                held = await fair.wait(principal.key_id, principal.user_id, pool)
            opened = await failover.open()
            status = opened.status or opened.resp.status
            if translation is not None and opened.dep.dialect == dialect:
                translation = None  # served in the client's own dialect: relayed as is
            extra = reservation.headers if translation is None else translation.headers(reservation.headers)
            if opened.streaming:
                if translation is not None:
                    tap = StreamTap(opened.dep.dialect)  # usage from the upstream's own events
                    return await relay_stream(request, opened, ctx, extra, tap, translation.stream())
                tap = ResponsesTap() if path == RESPONSES_PATH else StreamTap(dialect, strip_usage=strip_usage)
                return await relay_stream(request, opened, ctx, extra, tap)
            response, usage = relay_body(opened, ctx, extra, translation)
            status = response._status  # response.status
            return response
        except GatewayError as err:
            status = err.kind.status_for(dialect)
            err.headers.update(reservation.headers)
            if ctx.attempts:
                served_headers(err.headers, ctx)
            raise
        except BaseException:
            ctx.partial = True
            raise
        finally:
            failover.close()
            if held is not None:
                hot.fair_share.release(held)
            if tap is not None:
                usage = tap.usage
                usage.output_tokens = tap.output_estimate
                ctx.partial = ctx.partial or not tap.completed
            _finish(hot, ctx, principal, facts, reservation, usage, status, charge, failover.abandoned, hedges)

    return proxy


def _hedge_reserver(
    admitter: Admitter, principal: Principal, facts: RequestFacts, held: list[Reservation]
) -> Callable[[], Awaitable[bool]]:
    """A hedge is reserved against the limits and budgets like a request of its own (refused: no hedge)."""

    async def reserve() -> bool:
        try:
            res = await admitter.admit(principal, dataclasses.replace(facts, request_id=facts.request_id + "-hedge"))
        except GatewayError:
            return False
        held.append(res)
        return True

    return reserve


class Outgoing:
    """What each deployment receives, built once per deployment and reused by retries: the client's
    body (``model`` rewritten when the deployment names another model, or translated), and the
    headers the upstream may see."""

    __slots__ = ("_bodies", "_built", "_doc", "_incoming", "_model", "_translation")

    def __init__(self, model: str, body: bytes, doc: dict[str, Any],
                 incoming: Mapping[str, str] | list[tuple[str, str]], translation: Translation | None = None) -> None:
        self._model = model
        self._doc = doc
        self._bodies = {model: body}
        self._translation = translation
        self._incoming = incoming
        self._built: dict[str, CIMultiDict[str]] = {}

    def body(self, dep: Deployment) -> bytes:
        if self._translation is not None and dep.dialect == self._translation.upstream:
            return self._translation.body(dep.model)
        try:
            return self._bodies[dep.model]
        except KeyError:
            body = orjson.dumps({**self._doc, "model": dep.model})
            self._bodies[dep.model] = body
            return body

    def headers(self, dep: Deployment) -> CIMultiDict[str]:
        try:
            return self._built[dep.name]
        except KeyError:
            headers = self._built[dep.name] = upstream_headers(self._incoming, dep)
            return headers


def _max_tokens_cap(principal: Principal) -> int | None:
    caps = [lim.max_tokens for lim in (principal.key_limits, principal.user_limits) if lim is not None and lim.max_tokens is not None]
    return min(caps) if caps else None


def _finish(
    hot: Hot,
    ctx: RequestContext,
    principal: Principal,
    facts: RequestFacts,
    reservation: Reservation,
    usage: Usage,
    status: int,
    charge: bool,
    abandoned: list[tuple[Usage, str]],
    hedges: list[Reservation],
) -> None:
    """Record usage once and settle the reservation off the hot path."""
    prices = hot.prices
    cost = 0
    priced = True
    if charge and (usage.found or usage.output_tokens):
        price = prices.lookup(ctx.served_model) if ctx.served_model else None
        if price is not None:  # _cost's usual case, inlined
            cost = price.cost_pico(usage)
        else:
            cost, priced = _cost(prices, usage, ctx.served_model, facts.model)
    elif not charge:
        usage = Usage()
    if charge and abandoned:
        # Attempts that were not relayed but reported usage (a hedge that lost, a stream
        # dropped after its first event): the same request's record, so spend stays honest.
        usage = Usage(usage.input_tokens, usage.output_tokens, usage.cache_write_tokens, usage.cache_read_tokens,
                      usage.found)
        for extra, model in abandoned:
            extra_cost, extra_priced = _cost(prices, extra, model, facts.model)
            cost += extra_cost
            priced = priced and extra_priced
            usage.input_tokens += extra.input_tokens
            usage.output_tokens += extra.output_tokens
            usage.cache_write_tokens += extra.cache_write_tokens
            usage.cache_read_tokens += extra.cache_read_tokens
    ctx.input_tokens = usage.input_tokens + usage.cache_read_tokens + usage.cache_write_tokens
    ctx.output_tokens = usage.output_tokens
    ctx.cost_pico = cost
    gateway_ms = (time.perf_counter() - ctx.start - ctx.upstream_s) * 1000.0  # ctx.gateway_ms(), inlined
    rec = UsageRecord(
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
        cost_pico=cost,
        priced=priced,
        upstream_ms=ctx.upstream_s * 1000.0,
        ttft_ms=None if ctx.ttft_s is None else ctx.ttft_s * 1000.0,
        gateway_ms=gateway_ms if gateway_ms > 0.0 else 0.0,
        error_kind=ctx.error_kind,
        served_model=ctx.served_model,
        budget_keys=reservation.budget_keys,
        tags=ctx.tags,
    )
    if hot.usage_on_line:
        ctx.record = rec  # written on the request's one log line
    else:
        hot.usage.record(rec)
    if ctx.tags:
        hot.tags.observe(ctx.tags, cost)
    if reservation.state is not None:  # the limiter owns the settlement from here (no task per request)
        hot.admitter.settle_later(principal, facts, reservation, usage.total_tokens, cost)
    for held in hedges:
        # The hedge's cost is in the request's own settlement above: release its hold.
        if held.state is not None:
            hot.admitter.settle_later(principal, facts, held, 0, 0)


def _cost(prices: PriceTable, usage: Usage, served: str, public: str) -> tuple[int, bool]:
    """Priced by the model that served it; the public name's price when it has none; else the default."""
    price = prices.lookup(served) if served else None
    if price is None and public != served:
        price = prices.lookup(public)
    if price is None:
        price = prices.default
        return (price.cost_pico(usage) if price is not None else 0), False
    return price.cost_pico(usage), True


messages = proxy_handler(ANTHROPIC, charge=True, path="/v1/messages")
count_tokens = proxy_handler(ANTHROPIC, charge=False, path="/v1/messages/count_tokens")
chat_completions = proxy_handler(OPENAI, charge=True, path="/v1/chat/completions")
# OpenAI Responses API: OpenAI upstreams only, usage from ``usage`` / ``response.completed``.
responses = proxy_handler(OPENAI, charge=True, path=RESPONSES_PATH)
embeddings = proxy_handler(OPENAI, charge=True, path="/v1/embeddings")


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
