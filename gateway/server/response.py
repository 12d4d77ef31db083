"""A whole answer, written head and body in one go; a stream's head, written with its first events.

aiohttp's ``web.Response`` costs about thirty Python calls from its
constructor to the end of ``write_eof``: the body and status setters,
``prepare``, ``_start`` twice, ``_prepare_headers``, the
``on_response_prepare`` signal and its handler, ``_write_headers``, the
writer's ``write_headers``, ``_send_headers_with_payload``, ``_writelines``,
``write_eof`` twice and ``drain``; and its C header serializer checks every
character of every header for a line break, one at a time.

A relayed JSON answer (gateway/proxy/streaming.py's ``relay_body``) needs
none of that generality: no cookies, no compression, no chunking, a body of
bytes whose length is known.  ``WholeResponse.prepare`` builds the status
line and the header block with a few ``str`` methods (in C), checks the
whole block for stray line breaks at once (a header value must never split
the head: aiohttp refuses those too), and writes head and body in one
transport write, as aiohttp itself does for a small body.  ``write_eof``
then finds the answer sent and returns.

The application's one ``on_response_prepare`` hook (``PrepareHook``,
gateway/server/hygiene.py) is applied inline.  Anything else takes aiohttp's
own path, unchanged: an HTTP/1.0 client, ``HEAD``, a status without a body
(1xx, 204, 304), headers that aiohttp would have to reconcile
(``Content-Length``, ``Transfer-Encoding``, ``Date``), a response that
enabled compression or set cookies, a request whose app has another
``on_response_prepare`` handler (tracing) or is a sub-application.

A relayed stream (``relay_stream``) gets the same head, with
``Transfer-Encoding: chunked`` for framing, from ``StreamHead``: aiohttp's
``StreamResponse`` costs the same calls to prepare and writes its head on
its own, one write (and one send) before the first events.
``StreamHead.prepare`` leaves the head with aiohttp's writer, as a
``StreamResponse`` that buffers its head would; ``begin`` sends it with the
first chunk, framed, in one write; later writes are aiohttp's own, and
``finish`` sends the last bytes with the end of the body (and the head, if
nothing was written yet) in one write.

aiohttp internals relied on: ``request._message`` (the parsed request line),
``request._match_info._apps``, the app's ``_on_response_prepare``, ``request._payload_writer`` and the writer's
``_write``/``_protocol._paused``, the response's ``_payload_writer``,
``_eof_sent``, ``_req`` and ``_body_length``; for streams, the writer's ``_headers_buf``,
``_headers_written``, ``chunked`` and ``_compress``, and ``_send_headers_immediately``.  Every data-plane JSON answer
of the suite goes through here, so an aiohttp that changes them fails it.
"""

from __future__ import annotations

from collections.abc import Sequence

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.hdrs import CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, DATE, TRANSFER_ENCODING
from aiohttp.helpers import rfc822_formatted_time
from aiohttp.http import HttpVersion11
from aiohttp.http_writer import StreamWriter
from aiohttp.web_request import BaseRequest
from aiohttp.web_response import REASON_PHRASES
from multidict import CIMultiDict

from gateway.server.hygiene import PrepareHook

_NO_BODY_STATUS = (204, 304)


def _lean_head(
    response: web.StreamResponse, request: BaseRequest, framing: str, typed: bool
) -> tuple[AbstractStreamWriter, bytes] | None:
    """The status line and header block of ``response`` (its headers, the hook's, then ``framing``,
    ``Date`` and, when the connection closes after it, ``Connection: close``), and the writer it is
    to go to, with the response marked prepared on it; None: aiohttp's own path must take it (and
    nothing was changed).  ``typed``: a body follows, so a missing ``Content-Type`` is set to aiohttp's
    default."""
    message = request._message
    status = response._status
    h = response._headers
    if (
        response._payload_writer is not None
        or response._eof_sent
        or response._compression
        or response._cookies
        or response._chunked
        or message.version != HttpVersion11
        or message.method == "HEAD"
        or status < 200
        or status in _NO_BODY_STATUS
        or CONTENT_LENGTH in h  # (aiohttp's names are istr: no lower-casing per lookup)
        or TRANSFER_ENCODING in h
        or DATE in h
    ):
        return None
    target = message.path
    match_info = getattr(request, "_match_info", None)  # a web.Request's (made by the application)
    apps: Sequence[web.Application] = match_info._apps if match_info is not None else ()
    hooks: Sequence[object] = apps[0]._on_response_prepare if len(apps) == 1 else ()  # the property's
    hook = hooks[0] if len(hooks) == 1 else None
    if not isinstance(hook, PrepareHook) or "%" in target:
        return None  # another hook, or a path that needs decoding first
    writer = request._payload_writer
    response._req = request
    response._payload_writer = writer
    response._must_be_empty_body = False
    keep_alive = response._keep_alive
    if hook.apply(target.partition("?")[0], h, response):  # hygiene's headers; True: the worker is draining
        keep_alive = False
    elif keep_alive is None:
        keep_alive = not message.should_close  # request.keep_alive
    response._keep_alive = keep_alive
    if typed and CONTENT_TYPE not in h:
        h[CONTENT_TYPE] = "application/octet-stream"
    block = "\r\n".join(map(": ".join, h.items()))  # the caller's headers, then aiohttp's own
    breaks = len(h) - 1
    if breaks >= 0:
        if block.count("\n") != breaks or block.count("\r") != breaks:
            response._req = None
            response._payload_writer = None
            raise ValueError("Newline or carriage return detected in headers. Potential header injection attack.")
        block += "\r\n"
    close = "" if keep_alive or CONNECTION in h else "Connection: close\r\n"
    head = (
        f"HTTP/1.1 {status} {response._reason}\r\n{block}{framing}"
        f"Date: {rfc822_formatted_time()}\r\n{close}\r\n"
    )
    return writer, head.encode("utf-8", "ignore")


class WholeResponse(web.Response):
    """A response whose body is known, as bytes, when it is made: head and body leave in one write."""

    def __init__(self, status: int, body: bytes, headers: CIMultiDict[str]) -> None:
        # What Response.__init__ sets for bytes and a headers object of ours (no copy: the caller's);
        # the rest are class defaults.
        self._state = {}
        self._headers = headers
        self._status = status
        self._reason = REASON_PHRASES.get(status, "")
        self._body = body
        self._zlib_executor_size = 1024  # only read by compression, which this path never enables
        self._zlib_executor = None

    async def prepare(self, request: BaseRequest) -> AbstractStreamWriter | None:
        body = self._body
        assert isinstance(body, bytes)
        made = _lean_head(self, request, f"Content-Length: {len(body)}\r\n", bool(body))
        if made is None:
            return await super().prepare(request)
        writer, head = made
        writer._write(head + body)  # type: ignore[attr-defined]  # a StreamWriter
        self._eof_sent = True
        self._body_length = len(body)
        self._req = None
        self._payload_writer = None
        if writer._protocol._paused:  # type: ignore[attr-defined]  # the client reads slowly: as write_eof does
            await writer.drain()
        return writer


class StreamHead(web.StreamResponse):
    """A stream's answer (chunked): its head is made as ``WholeResponse``'s and leaves with the
    first body bytes, in one write (``begin``).  aiohttp's ``StreamResponse`` writes the head on its
    own as soon as it is prepared.  Anything ``_lean_head`` declines takes aiohttp's path."""

    _send_headers_immediately = False  # aiohttp's path too holds the head for the first write

    def __init__(self, status: int, headers: CIMultiDict[str]) -> None:
        # What StreamResponse.__init__ sets for a headers object of ours (no copy: the caller's).
        self._state = {}
        self._headers = headers
        self._status = status
        self._reason = REASON_PHRASES.get(status, "")

    async def prepare(self, request: BaseRequest) -> AbstractStreamWriter | None:
        made = _lean_head(self, request, "Transfer-Encoding: chunked\r\n", True)
        if made is None:
            return await super().prepare(request)
        writer, head = made
        # As aiohttp's writer holds a head it was told to buffer: the first write() sends it along.
        writer.chunked = True  # type: ignore[attr-defined]  # a StreamWriter
        writer._headers_buf = head  # type: ignore[attr-defined]
        writer._headers_written = False  # type: ignore[attr-defined]
        return writer

    def begin(self, first: bytes) -> bool:
        """Send the head, still held, and ``first`` (a body chunk, or nothing) in one write; False
        when this cannot be (aiohttp's path took the answer and the body is not plainly chunked):
        then the caller writes ``first`` through aiohttp.  The caller drains if the client reads slowly."""
        writer = self._payload_writer
        if not isinstance(writer, StreamWriter) or not writer.chunked or writer._compress is not None:
            return False
        head = writer._headers_buf
        if head is None or writer._headers_written:
            return False
        writer._headers_written = True
        writer._headers_buf = None
        writer._write(head + b"%x\r\n%b\r\n" % (len(first), first) if first else head)
        return True

    def send_head(self) -> None:
        """Send the head now if it is still held (before a wait for the first body bytes)."""
        writer = self._payload_writer
        if isinstance(writer, StreamWriter):
            writer.send_headers()

    async def finish(self, last: bytes = b"") -> None:
        """Write ``last`` (if any) and the end of the body in one write, with the head if it is still
        held (as ``write(last)`` then ``write_eof()`` would, in two)."""
        writer = self._payload_writer
        if (
            not isinstance(writer, StreamWriter) or not writer.chunked or writer._eof
            or writer._compress is not None or writer._on_chunk_sent is not None
            or writer.on_body_write is not None or self._eof_sent
            or (not writer._headers_written and writer._headers_buf is None)
        ):
            if last:
                await self.write(last)
            await self.write_eof()
            return
        head = b""
        if not writer._headers_written and writer._headers_buf is not None:
            head = writer._headers_buf
            writer._headers_written = True
            writer._headers_buf = None
        writer._write(head + b"%x\r\n%b\r\n0\r\n\r\n" % (len(last), last) if last else head + b"0\r\n\r\n")
        writer._eof = True
        self._eof_sent = True
        self._req = None
        self._body_length = writer.output_size
        self._payload_writer = None
        if writer._protocol._paused:  # the client reads slowly: as write_eof does
            await writer.drain()
