"""Bedrock's binary event stream -> the Anthropic SSE the client expects.

``InvokeModelWithResponseStream`` answers ``application/vnd.amazon.eventstream``:
frames with a CRC-checked prelude and message (decoded by botocore's own
``EventStreamBuffer``).  A ``chunk`` event carries ``{"bytes": base64}``
whose decoded bytes are one Anthropic stream event as JSON; each becomes
``event: <type>\\ndata: <json>\\n\\n``, exactly the lines the Anthropic API
sends.  Bedrock's extra ``amazon-bedrock-invocationMetrics`` on the last
event is removed so that the event is the Anthropic one.  An exception frame
(throttling mid-stream, a model error) becomes the Anthropic ``error`` event:
the answer is cut and must not look complete.  A checksum mismatch is a
broken connection (ClientPayloadError, after the good frames before it),
ended the same way.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Awaitable, Callable

import aiohttp
import orjson
from botocore.eventstream import EventStreamBuffer, ParserError

_METRICS = "amazon-bedrock-invocationMetrics"

# Bedrock's in-stream exception types -> the Anthropic error type of the event.
STREAM_ERRORS = {
    "throttlingException": "rate_limit_error",
    "serviceUnavailableException": "overloaded_error",
    "modelNotReadyException": "overloaded_error",
    "modelTimeoutException": "timeout_error",
    "validationException": "invalid_request_error",
    "internalServerException": "api_error",
    "modelStreamErrorException": "api_error",
}


def _error_event(etype: str, message: str) -> bytes:
    body = orjson.dumps({"type": "error", "error": {"type": etype, "message": message}})
    return b"event: error\ndata: " + body + b"\n\n"



def aws_error_message(payload: bytes) -> str:
    """The ``message`` (or ``Message``) of an AWS JSON error body; "" when there is none."""
    try:
        doc = orjson.loads(payload) if payload else {}
    except orjson.JSONDecodeError:
        return ""
    return str(doc.get("message") or doc.get("Message") or "") if isinstance(doc, dict) else ""

class EventStreamToSSE:
    """Feed raw bytes as they arrive; get the SSE bytes of every frame completed."""

    __slots__ = ("_buf", "broken")

    def __init__(self) -> None:
        self._buf = EventStreamBuffer()
        self.broken = ""  # why the stream cannot be read further (a corrupt frame)

    def feed(self, raw: bytes) -> bytes:
        """The SSE of the frames completed; after a corrupt frame, the good ones before it (then ``broken``)."""
        if self.broken:
            return b""
        self._buf.add_data(raw)
        out: list[bytes] = []
        try:
            for message in self._buf:
                out.append(self._convert(message.headers, message.payload))
        except ParserError as exc:
            # A corrupt frame: the bytes after it cannot be trusted either.
            self.broken = f"Bedrock event stream: {type(exc).__name__}"
        return b"".join(out)

    async def read_from(self, readany: Callable[[], Awaitable[bytes]]) -> bytes:
        """The next SSE bytes from a response's raw reads; b"" at the end; a corrupt frame is a cut connection."""
        while True:
            if self.broken:
                raise aiohttp.ClientPayloadError(self.broken)
            raw = await readany()
            if not raw:
                return b""
            out = self.feed(raw)
            if out:
                return out

    @staticmethod
    def _convert(headers: dict[str, object], payload: bytes) -> bytes:
        kind = headers.get(":message-type")
        if kind == "event":
            if headers.get(":event-type") != "chunk":
                return b""  # initial-response and other non-content frames
            try:
                event = base64.b64decode(orjson.loads(payload)["bytes"], validate=True)
                doc = orjson.loads(event)
                etype = doc["type"]
            except (orjson.JSONDecodeError, KeyError, TypeError, binascii.Error):
                return _error_event("api_error", "Bedrock sent a stream chunk that is not an Anthropic event.")
            if not isinstance(etype, str):
                return _error_event("api_error", "Bedrock sent a stream chunk that is not an Anthropic event.")
            if _METRICS in doc:
                del doc[_METRICS]
                event = orjson.dumps(doc)
            return b"event: " + etype.encode() + b"\ndata: " + event + b"\n\n"
        # "exception" (modeled: throttlingException...) or "error" (:error-code, :error-message)
        code = str(headers.get(":exception-type") or headers.get(":error-code") or "internalServerException")
        message = aws_error_message(payload) or str(headers.get(":error-message") or "")
        etype = STREAM_ERRORS.get(code, "api_error")
        return _error_event(etype, f"Bedrock {code}: {message}" if message else f"Bedrock {code}")
