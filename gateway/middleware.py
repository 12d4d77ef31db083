"""The one middleware: request id, gateway timer, error rendering, the log line."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import structlog
from aiohttp import web

from gateway import keys
from gateway.errors import ErrorKind, GatewayError, render
from gateway.observability.logging import redact_path
from gateway.proxy.context import RequestContext

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def make_middleware(access_log: bool) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    log = structlog.get_logger("request")

    @web.middleware
    async def gateway_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        ctx = RequestContext.start_now()
        request[keys.REQ_CTX] = ctx
        status = 500
        try:
            try:
                resp = await handler(request)
            except GatewayError as err:
                ctx.error_kind = err.kind.label
                resp = render(err, ctx.dialect)
            except web.HTTPException as exc:
                exc.headers["x-request-id"] = ctx.request_id
                status = exc.status
                raise
            status = resp.status
            if not resp.prepared:
                resp.headers["x-request-id"] = ctx.request_id
                resp.headers["server-timing"] = ctx.server_timing()
            return resp
        except BaseException:
            if status < 400:
                status = 499 if ctx.partial else 500
            raise
        finally:
            if access_log:
                log.info(
                    "request",
                    request_id=ctx.request_id,
                    method=request.method,
                    path=redact_path(request.path),
                    route=ctx.route,
                    model=ctx.model,
                    key=ctx.key_prefix,
                    user=ctx.user_id,
                    upstream=ctx.upstream,
                    status=status,
                    error=ctx.error_kind,
                    streamed=ctx.streamed,
                    partial=ctx.partial,
                    gateway_ms=round(ctx.gateway_ms(), 3),
                    upstream_ms=round(ctx.upstream_s * 1000.0, 3),
                    in_tokens=ctx.input_tokens,
                    out_tokens=ctx.output_tokens,
                )

    return gateway_middleware


__all__ = ["ErrorKind", "make_middleware"]
