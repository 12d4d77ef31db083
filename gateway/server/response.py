"""A whole answer, written head and body in one go.

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

aiohttp internals relied on: ``request._message`` (the parsed request line),
``request._match_info._apps``, the app's ``_on_response_prepare``, ``request._payload_writer`` and the writer's
``_write``/``_protocol._paused``, the response's ``_payload_writer``,
``_eof_sent``, ``_req`` and ``_body_length``.  Every data-plane JSON answer
of the suite goes through here, so an aiohttp that changes them fails it.
"""

from __future__ import annotations

from collections.abc import Sequence

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.hdrs import CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, DATE, TRANSFER_ENCODING
from aiohttp.helpers import rfc822_formatted_time
from aiohttp.http import HttpVersion11
from aiohttp.web_request import BaseRequest
from aiohttp.web_response import REASON_PHRASES
from multidict import CIMultiDict

from gateway.server.hygiene import PrepareHook

_NO_BODY_STATUS = (204, 304)


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
        message = request._message
        status = self._status
        h = self._headers
        if (
            self._payload_writer is not None
            or self._eof_sent
            or self._compression
            or self._cookies
            or self._chunked
            or message.version != HttpVersion11
            or message.method == "HEAD"
            or status < 200
            or status in _NO_BODY_STATUS
            or CONTENT_LENGTH in h  # (aiohttp's names are istr: no lower-casing per lookup)
            or TRANSFER_ENCODING in h
            or DATE in h
        ):
            return await super().prepare(request)
        target = message.path
        match_info = getattr(request, "_match_info", None)  # a web.Request's (made by the application)
        apps: Sequence[web.Application] = match_info._apps if match_info is not None else ()
        hooks: Sequence[object] = apps[0]._on_response_prepare if len(apps) == 1 else ()  # the property's
        hook = hooks[0] if len(hooks) == 1 else None
        if not isinstance(hook, PrepareHook) or "%" in target:
            return await super().prepare(request)  # another hook, or a path that needs decoding first
        writer = request._payload_writer
        self._req = request
        self._payload_writer = writer
        self._must_be_empty_body = False
        keep_alive = self._keep_alive
        if hook.apply(target.partition("?")[0], h, self):  # hygiene's headers; True: the worker is draining
            keep_alive = False
        elif keep_alive is None:
            keep_alive = not message.should_close  # request.keep_alive
        self._keep_alive = keep_alive
        body = self._body
        assert isinstance(body, bytes)
        if body and CONTENT_TYPE not in h:
            h[CONTENT_TYPE] = "application/octet-stream"
        block = "\r\n".join(map(": ".join, h.items()))  # the caller's headers, then aiohttp's own
        breaks = len(h) - 1
        if breaks >= 0:
            if block.count("\n") != breaks or block.count("\r") != breaks:
                raise ValueError("Newline or carriage return detected in headers. Potential header injection attack.")
            block += "\r\n"
        close = "" if keep_alive or CONNECTION in h else "Connection: close\r\n"
        head = (
            f"HTTP/1.1 {status} {self._reason}\r\n{block}Content-Length: {len(body)}\r\n"
            f"Date: {rfc822_formatted_time()}\r\n{close}\r\n"
        )
        writer._write(head.encode("utf-8", "ignore") + body)  # type: ignore[attr-defined]  # a StreamWriter
        self._eof_sent = True
        self._body_length = len(body)
        self._req = None
        self._payload_writer = None
        if writer._protocol._paused:  # type: ignore[attr-defined]  # the client reads slowly: as write_eof does
            await writer.drain()
        return writer
