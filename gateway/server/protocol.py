"""The connection protocol: aiohttp's RequestHandler with deadlines and quiet parser errors.

Slow clients (slowloris): aiohttp alone bounds only the keep-alive idle time.
Here every connection also has

- a header deadline: the request line and headers must be complete within
  ``server.header_timeout`` of the connection opening, or of the first byte
  of a later request on a kept-alive connection;
- a body deadline: the whole body must arrive within ``server.body_timeout``
  of the end of its headers.

A client that misses one is answered 408 when nothing else is being written
on the connection, and the connection is closed.

Malformed requests: aiohttp answers its parser errors in plain text and logs
them at ERROR with the offending bytes (a bad request line with an
``/ak/{key}`` path, an oversized ``Authorization`` header).  Here they are
answered in JSON that quotes nothing of the input and logged as a warning
with the error's type only.
"""

from __future__ import annotations

import asyncio
from typing import Any

import structlog
from aiohttp import web
from aiohttp.http_exceptions import (
    BadHttpMethod,
    BadStatusLine,
    HttpProcessingError,
    InvalidHeader,
    InvalidURLError,
    LineTooLong,
    PayloadEncodingError,
)
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from aiohttp.web_server import Server

from gateway import keys
from gateway.errors import OPENAI, ErrorKind, envelope
from gateway.server.dispatch import Direct, direct_dispatch, fast_dispatch
from gateway.server.hygiene import BareResponse
from gateway.server.inline import InlineRequests, inline_supported

log = structlog.get_logger("http")

# Checked in order: subclasses before their bases.
_MALFORMED: tuple[tuple[type[HttpProcessingError], str], ...] = (
    (LineTooLong, "A request line or header is too long."),
    (InvalidHeader, "A request header is malformed."),
    (BadHttpMethod, "The request method is not valid HTTP."),
    (BadStatusLine, "The request line is malformed."),
    (InvalidURLError, "The request target is malformed."),
    (PayloadEncodingError, "The request body is malformed (framing or content-encoding)."),
)

_TIMEOUT_BODY = envelope(ErrorKind.INVALID_REQUEST, "The request was not received in time.", OPENAI)
TIMEOUT_ANSWER = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
    b"x-content-type-options: nosniff\r\ncontent-length: " + str(len(_TIMEOUT_BODY)).encode() + b"\r\n\r\n"
    + _TIMEOUT_BODY
)


def malformed_message(exc: BaseException | None) -> str:
    for cls, text in _MALFORMED:
        if isinstance(exc, cls):
            return text
    return "Malformed HTTP request."


class GatewayProtocol(RequestHandler):
    """One client connection."""

    __slots__ = ("_body_timeout", "_deadline", "_direct", "_header_timeout", "_receiving")

    def __init__(
        self,
        manager: Server,
        *,
        header_timeout: float,
        body_timeout: float,
        direct: Direct | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(manager, **kwargs)
        self._direct = direct  # InlineGatewayProtocol's: the requests it runs in its own task
        self._header_timeout = header_timeout
        self._body_timeout = body_timeout
        self._deadline: asyncio.TimerHandle | None = None
        self._receiving: StreamReader | None = None  # the body being received, while it is

    # ------------------------------------------------------------ deadlines

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm(self._header_timeout, "header")

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm()
        self._receiving = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        before = self._request_count
        super().data_received(data)
        if self.transport is None:
            return
        if self._request_count != before:
            # A request's head is complete: its body (if any) is on the clock now.
            self._disarm()
            payload = self._messages[-1][1] if self._messages else None
            if isinstance(payload, StreamReader) and not payload.is_eof():
                self._receiving = payload
                self._arm(self._body_timeout, "body")
            else:
                self._receiving = None
        elif self._receiving is not None:
            if self._receiving.is_eof():
                self._receiving = None
                self._disarm()
        elif self._deadline is None and data:
            self._arm(self._header_timeout, "header")  # the first bytes of the next request

    def _arm(self, seconds: float, phase: str) -> None:
        self._disarm()
        self._deadline = self._loop.call_later(seconds, self._expired, phase)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self, phase: str) -> None:
        self._deadline = None
        transport = self.transport
        if transport is None:
            return
        if phase == "body" and (self._receiving is None or self._receiving.is_eof()):
            return  # completed in the meantime
        peer = transport.get_extra_info("peername")
        log.warning("slow client; connection closed", phase=phase, client=peer[0] if peer else None)
        if phase == "header" and not self._request_in_progress and not self._messages:
            transport.write(TIMEOUT_ANSWER)  # nothing else is being written on this connection
        self.force_close()

    # ------------------------------------------------------------ errors

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """aiohttp's error answer, minus the echo: JSON, nothing of the input quoted, logged as a warning."""
        if isinstance(exc, HttpProcessingError):
            level = log.debug if self._request_count == 1 and isinstance(exc, BadHttpMethod) else log.warning
            level("malformed request", error=type(exc).__name__, status=status, client=request.remote)
            text = malformed_message(exc)
            kind = ErrorKind.INVALID_REQUEST
        elif status == 504:
            log.warning("request handler timed out", status=status)
            text = "The gateway timed out."
            kind = ErrorKind.UPSTREAM_TIMEOUT
        else:
            log.error("unhandled error", exc_type=type(exc).__name__ if exc else None, status=status)
            text = "Internal gateway error."
            kind = ErrorKind.INTERNAL
        if request.writer.output_size > 0:
            raise ConnectionError("Response is sent already, cannot send another response with the error message")
        resp = BareResponse(status=status, body=envelope(kind, text, OPENAI), content_type="application/json")
        resp.force_close()
        return resp


class InlineGatewayProtocol(InlineRequests, GatewayProtocol):
    """GatewayProtocol whose fast-dispatched requests run in the connection's task (server/inline.py)."""

    __slots__ = ()


class GatewayServer(Server):
    """aiohttp's Server, making GatewayProtocol connections (inline ones when ``direct`` is given and can be)."""

    def __init__(
        self, *args: Any, header_timeout: float, body_timeout: float, direct: Direct | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout = header_timeout
        self.body_timeout = body_timeout
        inline = direct is not None and inline_supported()
        if direct is not None and not inline:
            log.warning("aiohttp is not the version server/inline.py copies; requests run in aiohttp's own loop")
        self.direct = direct if inline else None
        self.protocol: type[GatewayProtocol] = InlineGatewayProtocol if inline else GatewayProtocol

    def __call__(self) -> RequestHandler:
        return self.protocol(
            self,
            loop=self._loop,
            header_timeout=self.header_timeout,
            body_timeout=self.body_timeout,
            direct=self.direct,
            **self._kwargs,
        )


class GatewayRunner(web.AppRunner):
    """An AppRunner whose server speaks GatewayProtocol, with the app's [server] deadlines."""

    async def _make_server(self) -> Server:
        stock = await super()._make_server()
        s = self.app[keys.CONFIG].server
        direct = direct_dispatch(self.app)
        return GatewayServer(
            fast_dispatch(self.app, direct),
            direct=direct,
            request_factory=stock.request_factory,
            handler_cancellation=stock.handler_cancellation,
            loop=stock._loop,
            header_timeout=s.header_timeout,
            body_timeout=s.body_timeout,
            **stock._kwargs,
        )
