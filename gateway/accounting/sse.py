"""Incremental SSE tap: reads usage from a stream while its bytes pass through.

Correct for any split of the byte stream (mid-line, mid-UTF-8 character,
``\\r\\n`` or ``\\n`` line ends): lines are cut on ``\\n`` in bytes and only
complete lines are decoded.  When ``strip_usage`` is set (OpenAI, the gateway
asked for ``include_usage`` and the client did not) whole events are held
until their blank line so that the usage-only chunk can be dropped.
"""

from __future__ import annotations

import orjson

from gateway.accounting.usage import Usage, apply_anthropic, apply_openai

_USAGE_EVENTS = frozenset({b"message_start", b"message_delta", b"error"})


class StreamTap:
    __slots__ = (
        "_drop",
        "_event",
        "_held",
        "_tail",
        "completed",
        "deltas",
        "dialect",
        "errored",
        "strip_usage",
        "usage",
    )

    def __init__(self, dialect: str, *, strip_usage: bool = False) -> None:
        self.dialect = dialect
        self.strip_usage = strip_usage
        self.usage = Usage()
        self.completed = False  # saw message_stop / [DONE]
        self.errored = False  # saw an error event from upstream
        self.deltas = 0  # content events seen: the output estimate of a cut stream
        self._tail = b""
        self._event = b""
        self._held: list[bytes] = []
        self._drop = False

    def feed(self, chunk: bytes) -> bytes:
        """Consume a chunk; return the bytes the client should get now."""
        data = self._tail + chunk if self._tail else chunk
        start = 0
        out: list[bytes] | None = [] if self.strip_usage else None
        find = data.find
        while True:
            nl = find(b"\n", start)
            if nl < 0:
                break
            line = data[start:nl]
            raw = data[start : nl + 1]
            start = nl + 1
            if line.endswith(b"\r"):
                line = line[:-1]
            self._line(line)
            if out is not None:
                self._held.append(raw)
                if not line:  # end of event
                    if not self._drop:
                        out.extend(self._held)
                    self._held.clear()
                    self._drop = False
        self._tail = data[start:]
        if out is None:
            return chunk
        return b"".join(out)

    def flush(self) -> bytes:
        """The stream ended: return anything still held (an unterminated event)."""
        rest = b""
        if self._tail:
            line = self._tail[:-1] if self._tail.endswith(b"\r") else self._tail
            self._line(line)
        if self.strip_usage:
            if not self._drop:
                rest = b"".join(self._held) + self._tail
            self._held.clear()
        self._tail = b""
        return rest

    # -- parsing -------------------------------------------------------------

    def _line(self, line: bytes) -> None:
        if not line:
            self._event = b""
            return
        if line.startswith(b"event:"):
            self._event = line[6:].strip()
            return
        if not line.startswith(b"data:"):
            return
        payload = line[5:].strip()
        if self.dialect == "anthropic":
            self._anthropic(payload)
        else:
            self._openai(payload)

    def _anthropic(self, payload: bytes) -> None:
        event = self._event
        if event == b"content_block_delta":
            self.deltas += 1
            return
        if event == b"message_stop":
            self.completed = True
            return
        if event not in _USAGE_EVENTS:
            return
        try:
            doc = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return
        if not isinstance(doc, dict):
            return
        if event == b"message_start":
            msg = doc.get("message")
            if isinstance(msg, dict):
                apply_anthropic(self.usage, msg.get("usage"))
        elif event == b"message_delta":
            apply_anthropic(self.usage, doc.get("usage"))
        else:
            self.errored = True

    def _openai(self, payload: bytes) -> None:
        if payload == b"[DONE]":
            self.completed = True
            return
        if b'"usage"' not in payload:
            self.deltas += 1
            return
        try:
            doc = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return
        if not isinstance(doc, dict):
            return
        if "error" in doc:
            self.errored = True
            return
        u = doc.get("usage")
        if u is None:
            self.deltas += 1
            return
        apply_openai(self.usage, u)
        if self.strip_usage and not doc.get("choices"):
            self._drop = True

    @property
    def output_estimate(self) -> int:
        """Output tokens of a stream: as reported once complete, else at least the deltas seen."""
        if self.completed:
            return self.usage.output_tokens
        return max(self.usage.output_tokens, self.deltas)
