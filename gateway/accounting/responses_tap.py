"""The stream tap for the OpenAI Responses API: usage from ``response.completed``.

A Responses stream names every event (``event: response.output_text.delta``)
and has no ``[DONE]``: it is complete once ``response.completed`` or
``response.incomplete`` (a max_output_tokens stop, still a whole answer)
arrived; ``response.failed`` and ``error`` are the upstream's own failure.
Usage sits in the terminal event's ``response.usage``.  Bytes pass through
untouched; only those few terminal events are parsed.
"""

from __future__ import annotations

import orjson

from gateway.accounting.sse import StreamTap
from gateway.accounting.usage import apply_responses
from gateway.errors import RESPONSES

_COMPLETE = frozenset({b"response.completed", b"response.incomplete"})
_FAILED = frozenset({b"response.failed", b"error"})


class ResponsesTap(StreamTap):
    __slots__ = ()

    def __init__(self) -> None:
        super().__init__(RESPONSES)

    def feed(self, chunk: bytes) -> bytes:
        self.take(chunk)
        return chunk

    def take(self, chunk: bytes) -> bytes:
        data = self._tail + chunk if self._tail else chunk
        end = data.rfind(b"\n") + 1
        if not end:
            self._tail = data
            return b""
        self._tail = data[end:]
        out = data[:end]
        lines = out.split(b"\n")
        del lines[-1]
        self._lines(lines)
        if self.outlet is not None:
            self._send(out)
        return out

    def flush(self) -> bytes:
        if self._tail:
            self._lines([self._tail])
            self._tail = b""
        return b""

    def _lines(self, lines: list[bytes]) -> None:
        event = self._event
        for line in lines:
            if line[:5] == b"data:":
                if event[-6:] == b".delta":
                    self._deltas += 1
                elif event in _COMPLETE or event in _FAILED or (not event and b'"error"' in line):
                    self._terminal(event, line[5:].strip())
            elif line[:6] == b"event:":
                event = line[6:].strip()
            elif not line or line == b"\r":
                event = b""
        self._event = event

    def _terminal(self, event: bytes, payload: bytes) -> None:
        try:
            doc = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return
        if not isinstance(doc, dict):
            return
        response = doc.get("response")
        if isinstance(response, dict):
            apply_responses(self.usage, response.get("usage"))
        if event in _COMPLETE:
            self.completed = True
        else:
            self.errored = True
