"""The one middleware: request id, gateway timer, error rendering, the log line."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import structlog
from aiohttp import web

from gateway import keys
from gateway.errors import ErrorKind, GatewayError, render
from gateway.observability.logging import redact_path
from gateway.observability.metrics import Metrics
from gateway.proxy.context import RequestContext

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def make_middleware(
    access_log: bool, metrics: Metrics | None = None
) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    log = structlog.get_logger("request")

    @web.middleware
    async def gateway_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        ctx = RequestContext.start_now()
        request[keys.REQ_CTX] = ctx
        status = 500
        if metrics is not None:
            metrics.started()
        try:
            try:
                resp = await handler(request)
            except GatewayError as err:
                ctx.error_kind = err.kind.label
                resp = render(err, ctx.dialect)
            except web.HTTPException as exc:
                exc.headers["x-request-id"] = ctx.request_id
                exc.headers["server-timing"] = ctx.server_timing()
                status = exc.status
                raise
            except ConnectionError:
                raise  # the client went away: nobody to answer
            except Exception as exc:  # noqa: BLE001 - the one last-resort answer
                # A bug: answer in the dialect's shape; log the type only (a
                # traceback could carry a key from a local variable).
                ctx.error_kind = ErrorKind.INTERNAL.label
                log.error("unhandled error", request_id=ctx.request_id, exc_type=type(exc).__name__)
                resp = render(GatewayError(ErrorKind.INTERNAL, "Internal gateway error."), ctx.dialect)
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
            if metrics is not None:
                metrics.finished(request, ctx, status)
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
