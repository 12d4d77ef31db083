"""Relay an open upstream response to the client: a JSON body or an SSE stream.

Streams go chunk by chunk as they arrive, through the usage tap: pushed by
the upstream client's read callback straight to the client's transport (no
task switch per chunk; the relay coroutine sleeps until the upstream ends,
fails or stalls, the client goes away or falls behind), or, for a translated
stream or a cloud's reader, read chunk by chunk.  A stream the upstream cuts
(error, idle timeout, close without its terminal event) ends with the
dialect's error event, never a terminal success event.
"""

from __future__ import annotations

import asyncio
import time
from itertools import compress, repeat
from operator import itemgetter
from typing import TYPE_CHECKING
from urllib.parse import quote

import aiohttp
from aiohttp import web
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http_writer import StreamWriter
from multidict import CIMultiDict, istr

from gateway.accounting.sse import StreamTap
from gateway.accounting.usage import Usage, from_body
from gateway.errors import ErrorKind, stream_error_event
from gateway.providers.base import HOP_BY_HOP, UPSTREAM_ONLY
from gateway.providers.cloud import Reader
from gateway.proxy.attempts import Opened
from gateway.proxy.context import RequestContext
from gateway.proxy.routing import Deployment
from gateway.resilience.breaker import State
from gateway.server.response import StreamHead, WholeResponse
from gateway.upstream.client import HeadShape, LeanBody, LeanResponse

if TYPE_CHECKING:
    from gateway.translate.attempt import StreamTranslator, Translation

_SKIP_RESPONSE = HOP_BY_HOP | UPSTREAM_ONLY
_VALUE = itemgetter(2)  # of a (name, ":", value) part
_BLANKS = repeat(" \t")
_EVENT_END = (b"\n\n", b"\r\n\r\n", b"\n\r\n", b"\r\n\n")  # a line end, then a blank line


# Header names the gateway sets on every relayed answer, as istr: a case-insensitive multidict
# lower-cases a plain str key at each use, an istr's once.
_X_REQUEST_ID = istr("x-request-id")
_X_UPSTREAM_REQUEST_ID = istr("x-upstream-request-id")
_X_GATEWAY_UPSTREAM = istr("x-gateway-upstream")
_X_GATEWAY_MODEL = istr("x-gateway-model")
_X_GATEWAY_ATTEMPTS = istr("x-gateway-attempts")

_Plan = tuple[tuple[bool, ...], tuple[istr, ...], int]


def _plan(shape: HeadShape) -> _Plan:
    """What to do with each field of an answer, by its names (in order): which fields reach the
    client (for itertools.compress), their names (as istr, spelt as the upstream spelt them), and
    where the upstream's x-request-id is (the last; -1: none).  Made once per set of names (kept on
    the client's HeadShape), not per answer."""
    lows = shape.lows
    # Hop-by-hop and upstream-only fields stay behind; the gateway's own id owns x-request-id.
    keep = tuple(low not in _SKIP_RESPONSE and low != "x-request-id" for low in lows)
    rid = len(lows) - 1 - lows[::-1].index("x-request-id") if "x-request-id" in lows else -1
    return keep, tuple(istr(name) for name in compress(shape.names, keep)), rid


def client_headers(dep: Deployment, resp: LeanResponse, ctx: RequestContext) -> CIMultiDict[str]:
    shape = resp.shape
    plan: _Plan | None = shape.relay
    if plan is None:
        plan = shape.relay = _plan(shape)
    parts = resp.parts
    keep, names, rid = plan
    # The kept values, without their surrounding blanks, paired with their names in C.
    values = map(str.strip, map(_VALUE, compress(parts, keep)), _BLANKS)
    out: CIMultiDict[str] = CIMultiDict(list(zip(names, values, strict=True)))
    if rid >= 0 and dep.provider.request_id_header == "x-request-id":
        # The gateway's id owns x-request-id; keep the provider's alongside.
        out[_X_UPSTREAM_REQUEST_ID] = parts[rid][2].strip(" \t")
    out[_X_REQUEST_ID] = ctx.request_id
    served_headers(out, ctx)
    return out


def served_headers(out: CIMultiDict[str] | dict[str, str], ctx: RequestContext) -> None:
    """Tell the client what served it: the upstream, its model name, the attempts made."""
    out[_X_GATEWAY_UPSTREAM] = ctx.upstream
    model = ctx.served_model
    # The client's own model name when no mapping applies: never let it break a header.
    out[_X_GATEWAY_MODEL] = model if model.isascii() and model.isprintable() else quote(model, safe="")
    out[_X_GATEWAY_ATTEMPTS] = str(ctx.attempts)


def relay_body(
    opened: Opened, ctx: RequestContext, extra: dict[str, str], translation: Translation | None = None
) -> tuple[WholeResponse, Usage]:
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
    # server-timing: set by the middleware, which measures the gateway's time last, as the answer leaves.
    return WholeResponse(status, body, headers), usage


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
    out = StreamHead(resp.status, headers)
    if dep.breaker.state is State.HALF_OPEN:
        # The probe answered: a long stream must not hold the circuit half-open.
        dep.breaker.record_success()
    try:
        await out.prepare(request)
    except BaseException:
        resp.close()  # the client is gone before the first byte: free the upstream now
        raise
    writer = request.writer
    # The upstream client watches for a stall (no byte for idle_timeout) on a
    # timer tick of its own: nothing to re-arm per chunk here.
    resp.idle_timeout(dep.cfg.idle_timeout)
    if (
        translator is None and opened.read is None and opened.ahead and isinstance(writer, StreamWriter)
        and writer._compress is None and writer.length is None and writer._on_chunk_sent is None
        and writer.on_body_write is None
    ):
        failure, last, rest, unsent = await _push(request, writer, out, opened, ctx, tap)
    else:
        failure, last, rest = await _pull(request, out, opened, ctx, tap, translator)
        unsent = b""
    # The client's: the tap's (the Responses API has its own), or the translator's.
    dialect = tap.dialect if translator is None else translator.dialect
    if failure is None and not tap.end_clean() and not tap.errored:
        failure = (ErrorKind.UPSTREAM_ERROR, "The upstream ended the stream early; the answer is incomplete.")
    if failure is not None:
        ctx.partial = True
        ctx.error_kind = failure[0].label
        dep.breaker.record_failure()
        # The unfinished line (and a held event) is dropped; an unfinished
        # event is ended first, so that the error event parses on its own.
        lead = b"\n" if last and not last.endswith(_EVENT_END) else b""
        rest = unsent + lead + stream_error_event(failure[0], failure[1], dialect)
    else:
        rest = unsent + rest if unsent else rest
        if tap.errored:
            # The upstream sent its own error event (relayed as is): a failed answer all the same.
            ctx.partial = True
            ctx.error_kind = ErrorKind.UPSTREAM_ERROR.label
            dep.breaker.record_failure()
        else:
            dep.breaker.record_success()
    await out.finish(rest)  # what is left, and the end of the body (the head too, if it waited): one write
    return out


# What a relay loop hands on: why the stream failed, if it did; the last bytes written (is the
# client at an event boundary?); what to write if it did not fail.
_Outcome = tuple[tuple[ErrorKind, str] | None, bytes, bytes]
# Push mode's: the same, and what was accepted for the client but not written yet.
_Pushed = tuple[tuple[ErrorKind, str] | None, bytes, bytes, bytes]

_STALLED = (ErrorKind.UPSTREAM_TIMEOUT, "The upstream stalled mid-stream; the answer is incomplete.")
_FAILED = (ErrorKind.UPSTREAM_ERROR, "The upstream connection failed mid-stream; the answer is incomplete.")


def _cut(request: web.Request, exc: BaseException) -> tuple[ErrorKind, str]:
    """An upstream read failed: the dialect's error event to send, or raise on when the client is gone."""
    if isinstance(exc, TimeoutError):
        return _STALLED
    transport = request.transport
    if transport is None or transport.is_closing():
        raise exc  # the client went away: nothing to tell it
    return _FAILED


class _Sink:
    """Push mode: the tap's outlet.  Each upstream read that holds a line end goes to the tap's
    ``take``, which writes its whole lines straight to the client's transport (one chunked-encoding
    frame, one write) inside the upstream's read callback; this keeps the relay's state."""

    __slots__ = ("body", "chunked", "is_gone", "last", "proto", "sent", "transport")

    transport: asyncio.Transport  # the client's, set once the relay starts

    def __init__(self, body: LeanBody, proto: BaseProtocol, chunked: bool) -> None:
        self.body = body
        self.proto = proto
        self.chunked = chunked
        self.is_gone = False  # the client's connection closed
        self.sent = 0  # body bytes written (the response's output size)
        self.last = b""

    def gone(self) -> None:
        self.is_gone = True
        self.body.wake()

    def slow(self) -> None:
        # The client reads slower than the upstream writes: stop reading the upstream until it drains.
        self.body.pause()
        self.body.wake()


async def _push(
    request: web.Request, writer: StreamWriter, out: StreamHead, opened: Opened, ctx: RequestContext,
    tap: StreamTap,
) -> _Pushed:
    """The common case: the upstream's SSE relayed as it is, without a task switch per chunk."""
    resp = opened.resp
    body = resp.content
    take = tap.taker()
    if ctx.ttft_s is None:
        ctx.ttft_s = time.perf_counter() - ctx.start
    first = take(opened.ahead)
    if body.is_eof():
        # The whole stream came with the read-ahead (a short answer, or an upstream that sends it at
        # once): nothing to wait for.  The head, the events and the end of the body leave together,
        # in relay_stream's last write (or with the error event if the stream turns out cut).
        resp.release()
        return None, first, tap.rest(), first
    if not out.begin(first):  # the head and the first events, in one write
        if first:
            await out.write(first)  # (aiohttp's path: it sends its head along)
        else:
            writer.send_headers()
    sink = _Sink(body, writer.protocol, writer.chunked)
    sink.last = first
    ended = False
    failure: tuple[ErrorKind, str] | None = None
    held = b""
    t0 = time.perf_counter()
    try:
        try:
            transport = writer.transport
            if transport is None or transport.is_closing():
                raise aiohttp.ClientConnectionResetError("Cannot write to closing transport")
            sink.transport = transport
            tap.outlet = sink
            # What arrived since the read-ahead goes now; then each read that ends a line, as it comes.
            body.push(take, lines=True)
            while True:
                # Checked before each wait: the sink may have asked for attention with no one waiting.
                if sink.is_gone:
                    raise aiohttp.ClientConnectionResetError("Cannot write to closing transport")
                exc = body.failure
                if exc is not None:
                    raise exc
                if body.is_eof():
                    ended = True
                    break
                if writer.protocol._paused:
                    t1 = time.perf_counter()
                    await writer.drain()
                    t0 += time.perf_counter() - t1  # the client's time, not the upstream's
                    body.resume()
                    continue
                body.resume()  # woken for backpressure that had cleared already
                await body.wait()
        finally:
            tap.outlet = None
            ctx.upstream_s += time.perf_counter() - t0
            writer.output_size += sink.sent
            held = body.held()  # read after the last line end
    except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, OSError) as exc:
        failure = _cut(request, exc)
    finally:
        resp.release() if ended else resp.close()
    if held:
        take(held)  # no line end in it: nothing to pass on, but the tap parses its last line
    rest = tap.rest()
    return failure, sink.last, rest, b""


async def _pull(
    request: web.Request, out: StreamHead, opened: Opened, ctx: RequestContext, tap: StreamTap,
    translator: StreamTranslator | None,
) -> _Outcome:
    """A translated stream or a cloud's reader: chunk by chunk, a read (and a task switch) each."""
    resp = opened.resp
    read: Reader = opened.read or resp.content.readany
    failure: tuple[ErrorKind, str] | None = None
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
                if not last:
                    out.send_head()  # nothing written yet: the client gets the head before the wait
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
        failure = _STALLED
    except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, OSError) as exc:
        if isinstance(exc, ConnectionResetError | aiohttp.ClientConnectionResetError) and request.transport is None:
            raise  # the client went away: nothing to tell it
        failure = _cut(request, exc)
    finally:
        resp.release() if ended else resp.close()
    rest = tap.flush()
    if failure is None:
        if translator is not None:
            rest = translator.feed(rest) + translator.finish()
        rest = pending + rest
    return failure, last, rest
