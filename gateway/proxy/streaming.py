"""Relay an open upstream response to the client: a JSON body or an SSE stream.

Streams go chunk by chunk as they arrive, through the usage tap.  A stream
the upstream cuts (error, idle timeout, close without its terminal event)
ends with the dialect's error event, never a terminal success event.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING
from urllib.parse import quote

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from gateway.accounting.sse import StreamTap
from gateway.accounting.usage import Usage, from_body
from gateway.errors import ErrorKind, stream_error_event
from gateway.providers.base import HOP_BY_HOP, UPSTREAM_ONLY
from gateway.providers.cloud import Reader
from gateway.proxy.attempts import Opened
from gateway.proxy.context import RequestContext
from gateway.proxy.routing import Deployment
from gateway.resilience.breaker import State
from gateway.upstream.client import LeanResponse

if TYPE_CHECKING:
    from gateway.translate.attempt import StreamTranslator, Translation

_SKIP_RESPONSE = HOP_BY_HOP | UPSTREAM_ONLY
_EVENT_END = (b"\n\n", b"\r\n\r\n", b"\n\r\n", b"\r\n\n")  # a line end, then a blank line


# Response header names (exact spelling, as upstreams send them) already classified, so that
# building the client's headers costs no lower() per header; bounded, upstreams choose the names.
_RELAYED: set[str] = set()
_SKIPPED: set[str] = set()  # hop-by-hop, upstream-only
_REQUEST_ID: set[str] = set()  # x-request-id: the gateway's own owns the name


def _classify(name: str) -> bool:
    """Learn one name; True when the sets were emptied first (an upstream inventing names)."""
    reset = len(_RELAYED) + len(_SKIPPED) + len(_REQUEST_ID) >= 4096
    if reset:
        _RELAYED.clear()
        _SKIPPED.clear()
        _REQUEST_ID.clear()
    low = name.lower()
    (_SKIPPED if low in _SKIP_RESPONSE else _REQUEST_ID if low == "x-request-id" else _RELAYED).add(name)
    return reset


def client_headers(dep: Deployment, resp: LeanResponse, ctx: RequestContext) -> CIMultiDict[str]:
    items = resp.headers.items()
    upstream_rid: str | None = None
    reset = False
    for name, value in items:
        if name in _RELAYED or name in _SKIPPED:
            continue
        if name not in _REQUEST_ID:
            reset = _classify(name) or reset
            if name not in _REQUEST_ID:
                continue
        if dep.provider.request_id_header == "x-request-id":
            # The gateway's id owns x-request-id; keep the provider's alongside.
            upstream_rid = value
    if reset:  # names learnt before the reset in this loop were forgotten: learn them again
        for name, _ in items:
            _classify(name)
    out: CIMultiDict[str] = CIMultiDict([(name, value) for name, value in items if name in _RELAYED])
    if upstream_rid is not None:
        out["x-upstream-request-id"] = upstream_rid
    out["x-request-id"] = ctx.request_id
    served_headers(out, ctx)
    return out


def served_headers(out: CIMultiDict[str] | dict[str, str], ctx: RequestContext) -> None:
    """Tell the client what served it: the upstream, its model name, the attempts made."""
    out["x-gateway-upstream"] = ctx.upstream
    model = ctx.served_model
    # The client's own model name when no mapping applies: never let it break a header.
    out["x-gateway-model"] = model if model.isascii() and model.isprintable() else quote(model, safe="")
    out["x-gateway-attempts"] = str(ctx.attempts)


def relay_body(
    opened: Opened, ctx: RequestContext, extra: dict[str, str], translation: Translation | None = None
) -> tuple[web.Response, Usage]:
    """A whole answer (read in full by its attempt): success, or an upstream error passed on as it is
    (with a ``translation``: either one in the client's dialect)."""
    dep, resp = opened.dep, opened.resp
    body = opened.body or b""
    status = opened.status or resp.status
    usage = from_body(dep.dialect, body) if status < 400 else Usage()
    headers = client_headers(dep, resp, ctx)
    headers.update(extra)
    if translation is not None:
        status, body = translation.response(status, body, headers.pop("content-encoding", None))
        headers["content-type"] = "application/json"
    headers["server-timing"] = ctx.server_timing()
    return web.Response(status=status, body=body, headers=headers), usage


async def relay_stream(
    request: web.Request,
    opened: Opened,
    ctx: RequestContext,
    extra: dict[str, str],
    tap: StreamTap,
    translator: StreamTranslator | None = None,
) -> web.StreamResponse:
    """Relay SSE, the bytes read ahead first; the tap's usage is read by the caller, also when this raises.

    With a ``translator`` the tap reads the upstream's events and the client
    gets the translator's (whole events of the client's dialect).
    """
    dep, resp = opened.dep, opened.resp
    ctx.streamed = True
    headers = client_headers(dep, resp, ctx)
    headers.update(extra)
    headers["server-timing"] = ctx.server_timing()
    if opened.read is not None:
        headers["content-type"] = "text/event-stream; charset=utf-8"  # a cloud's stream, turned into SSE
    out = web.StreamResponse(status=resp.status, headers=headers)
    if dep.breaker.state is State.HALF_OPEN:
        # The probe answered: a long stream must not hold the circuit half-open.
        dep.breaker.record_success()
    try:
        await out.prepare(request)
    except BaseException:
        resp.close()  # the client is gone before the first byte: free the upstream now
        raise
    # The client's: the tap's (the Responses API has its own), or the translator's.
    dialect = tap.dialect if translator is None else translator.dialect
    read: Reader = opened.read or resp.content.readany
    failure: tuple[ErrorKind, str] | None = None
    # The upstream client watches for a stall (no byte for idle_timeout) on a
    # timer tick of its own: nothing to re-arm per chunk here.
    resp.idle_timeout(dep.cfg.idle_timeout)
    # An incomplete last line is held back: if the upstream is cut mid-line,
    # the client must not get half a line glued to our error event.
    pending = b""
    last = b""  # the last bytes written: is the client at an event boundary?
    ended = False  # the upstream ended the body cleanly (EOF)
    ahead = opened.ahead  # read before the commit: goes first, through the same tap
    try:
        while True:
            if ahead:
                chunk = ahead
                ahead = b""
            else:
                t0 = time.perf_counter()
                chunk = await read()
                ctx.upstream_s += time.perf_counter() - t0
            if not chunk:
                ended = True
                break
            if ctx.ttft_s is None:
                ctx.ttft_s = time.perf_counter() - ctx.start
            data = tap.feed(chunk)
            if translator is not None:
                data = translator.feed(data)
            if data:
                if pending:
                    data = pending + data
                    pending = b""
                if data[-1] != 10:  # not "\n": rare, upstreams send whole events
                    nl = data.rfind(b"\n") + 1
                    pending = data[nl:]
                    data = data[:nl]
                if data:
                    await out.write(data)
                    last = data
    except TimeoutError:
        failure = (ErrorKind.UPSTREAM_TIMEOUT, "The upstream stalled mid-stream; the answer is incomplete.")
    except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, OSError) as exc:
        if isinstance(exc, ConnectionResetError | aiohttp.ClientConnectionResetError) and request.transport is None:
            raise  # the client went away: nothing to tell it
        if request.transport is None or request.transport.is_closing():
            raise
        failure = (ErrorKind.UPSTREAM_ERROR, "The upstream connection failed mid-stream; the answer is incomplete.")
    finally:
        resp.release() if ended else resp.close()
    rest = tap.flush()
    if failure is None and not tap.end_clean() and not tap.errored:
        failure = (ErrorKind.UPSTREAM_ERROR, "The upstream ended the stream early; the answer is incomplete.")
    if failure is not None:
        ctx.partial = True
        ctx.error_kind = failure[0].label
        dep.breaker.record_failure()
        # The unfinished line (and a held event) is dropped; an unfinished
        # event is ended first, so that the error event parses on its own.
        lead = b"\n" if last and not last.endswith(_EVENT_END) else b""
        await out.write(lead + stream_error_event(failure[0], failure[1], dialect))
    else:
        if translator is not None:
            rest = translator.feed(rest) + translator.finish()
        if pending or rest:
            await out.write(pending + rest)
        if tap.errored:
            # The upstream sent its own error event (relayed as is): a failed answer all the same.
            ctx.partial = True
            ctx.error_kind = ErrorKind.UPSTREAM_ERROR.label
            dep.breaker.record_failure()
        else:
            dep.breaker.record_success()
    await out.write_eof()
    return out
