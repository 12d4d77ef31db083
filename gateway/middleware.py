"""The one middleware: request id, gateway timer, error rendering, the log line."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from time import perf_counter

import structlog
from aiohttp import web

from gateway import keys
from gateway.auth.responses import error_body, query_error
from gateway.errors import ANTHROPIC, OPENAI, ErrorKind, GatewayError, render
from gateway.observability.logging import redact_path, request_line
from gateway.observability.metrics import Metrics
from gateway.proxy.context import RequestContext

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# nginx's status for a client that closed its connection before the answer
# was sent: an outcome of the request, not an error of the gateway.
CLIENT_CLOSED = 499

# Unknown paths under these answer in the control plane's error shape.
_CONTROL_PLANE = ("/admin", "/auth", "/me", "/openapi.json", "/healthz", "/readyz", "/metrics")


def client_gone(request: web.Request) -> bool:
    """The client's connection is closed or closing: nothing can reach it any more."""
    transport = request.transport
    return transport is None or transport.is_closing()


def render_unmatched(request: web.Request, exc: web.HTTPException, ctx: RequestContext) -> web.Response:
    """aiohttp's router found no route (404) or not for this method (405): JSON in the path's dialect."""
    kind = ErrorKind.METHOD_NOT_ALLOWED if exc.status == 405 else ErrorKind.UNKNOWN_PATH
    ctx.error_kind = kind.label
    path = request.path
    shown = redact_path(path)  # never echo the key of an /ak/{key}/... path
    if kind is ErrorKind.METHOD_NOT_ALLOWED:
        allow = exc.headers.get("Allow", "")
        message = f"Method {request.method} is not allowed on {shown}; allowed: {allow}."
    else:
        message = f"Unknown path: {request.method} {shown}."
    if path.startswith("/ak/"):
        slash = path.find("/", 4)
        path = path[slash:] if slash >= 0 else "/"
    elif any(path == p or path.startswith(p + "/") for p in _CONTROL_PLANE):
        resp = web.Response(
            status=exc.status, body=error_body(kind.spec.openai_code, message), content_type="application/json"
        )
        _copy_allow(exc, resp)
        return resp
    anthropic = path == "/v1/messages" or path.startswith("/v1/messages/") or "anthropic-version" in request.headers
    ctx.dialect = ANTHROPIC if anthropic else OPENAI
    resp = render(GatewayError(kind, message), ctx.dialect)
    _copy_allow(exc, resp)
    return resp


def _copy_allow(exc: web.HTTPException, resp: web.Response) -> None:
    allow = exc.headers.get("Allow")
    if allow is not None:
        resp.headers["Allow"] = allow


def _line(request: web.Request, ctx: RequestContext, status: int, gw_ms: float, direct: bool) -> dict[str, object]:
    """The request's one log line; in standalone mode it carries the usage record too.

    ``direct``: an exact data-plane path (server/dispatch.py), with no key in it to redact."""
    path = request._rel_url.path  # request.path
    line: dict[str, object] = {
        "event": "request",
        "request_id": ctx.request_id,
        "method": request._method,
        "path": path if direct else redact_path(path),
        "route": ctx.route,
        "model": ctx.model,
        "key": ctx.key_prefix,
        "user": ctx.user_id,
        "upstream": ctx.upstream,
        "served_model": ctx.served_model,
        "attempts": ctx.attempts,
        "retries": ctx.retries,
        "hedges": ctx.hedges,
        "status": status,
        "error": ctx.error_kind or ("client_closed" if status == CLIENT_CLOSED else None),
        "streamed": ctx.streamed,
        "partial": ctx.partial,
        "gateway_ms": round(gw_ms, 3),
        "upstream_ms": round(ctx.upstream_s * 1000.0, 3),
        "in_tokens": ctx.input_tokens,
        "out_tokens": ctx.output_tokens,
    }
    rec = ctx.record
    if rec is not None:
        rec.add_to_line(line)
    return line


def make_middleware(
    access_log: bool, metrics: Metrics | None = None
) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    log = structlog.get_logger("request")

    req_ctx = keys.REQ_CTX

    @web.middleware
    async def gateway_middleware(request: web.Request, handler: Handler, direct: bool = False) -> web.StreamResponse:
        """``direct``: called by server/dispatch.py for an exact data-plane path (no query string)."""
        ctx = RequestContext.start_now()
        request._state[req_ctx] = ctx  # request[REQ_CTX] = ctx, without the Python-level __setitem__
        status = 500
        gw_ms = -1.0  # measured once, for the header, the metrics and the log line
        if metrics is not None:
            metrics.active += 1  # metrics.started(), inlined: the hot path
        try:
            try:
                if not direct and request.rel_url.raw_query_string and request.path.startswith(_CONTROL_PLANE):
                    # Decoded query values reach Postgres as text: a %00 would be a 500 there.
                    refused = query_error(request.query_string)
                    if refused is not None:
                        raise refused
                resp = await handler(request)
            except GatewayError as err:
                ctx.error_kind = err.kind.label
                resp = render(err, ctx.dialect)
            except web.HTTPException as exc:
                if exc is not request.match_info.http_exception:
                    # A handler's own answer (the control plane raises its JSON errors).
                    exc.headers["x-request-id"] = ctx.request_id
                    exc.headers["server-timing"] = ctx.server_timing()
                    status = exc.status
                    raise
                resp = render_unmatched(request, exc, ctx)
            except ConnectionError:
                if not client_gone(request):
                    raise
                # A write to the client failed because it went away: an
                # ordinary outcome.  Raised on, aiohttp would log it as a
                # server error; its write of this placeholder fails quietly.
                status = CLIENT_CLOSED
                return web.Response(status=CLIENT_CLOSED)
            except Exception as exc:  # noqa: BLE001 - the one last-resort answer
                # A bug: answer in the dialect's shape; log the type only (a
                # traceback could carry a key from a local variable).
                ctx.error_kind = ErrorKind.INTERNAL.label
                log.error("unhandled error", request_id=ctx.request_id, exc_type=type(exc).__name__)
                resp = render(GatewayError(ErrorKind.INTERNAL, "Internal gateway error."), ctx.dialect)
            status = resp._status  # resp.status; then resp.prepared, request.transport, resp.headers
            if not (resp._eof_sent or resp._payload_writer is not None):
                protocol = request._protocol
                transport = None if protocol is None else protocol.transport
                if transport is None or transport.is_closing():
                    status = CLIENT_CLOSED  # answered, but nobody is left to receive it
                gw_ms = (perf_counter() - ctx.start - ctx.upstream_s) * 1000.0  # ctx.gateway_ms(), inlined
                if gw_ms < 0.0:
                    gw_ms = 0.0
                h = resp._headers
                h["x-request-id"] = ctx.request_id
                h["server-timing"] = f"gateway;dur={gw_ms:.3f}"
            return resp
        except BaseException:
            if client_gone(request):
                status = CLIENT_CLOSED  # the disconnect cancelled the handler
            raise
        finally:
            if gw_ms < 0:
                gw_ms = ctx.gateway_ms()
            if metrics is not None:
                metrics.finished(request, ctx, status, gw_ms)
            if access_log or ctx.record is not None:
                request_line(_line(request, ctx, status, gw_ms, direct))

    return gateway_middleware


__all__ = ["CLIENT_CLOSED", "ErrorKind", "client_gone", "make_middleware", "render_unmatched"]
