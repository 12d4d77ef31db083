"""Incremental SSE tap: reads usage from a stream while its bytes pass through.

Correct for any split of the byte stream (mid-line, mid-UTF-8 character,
``\\r\\n`` or ``\\n`` line ends): lines are cut on ``\\n`` in bytes and only
complete lines are decoded.  When ``strip_usage`` is set (OpenAI, the gateway
asked for ``include_usage`` and the client did not) whole events are held
until their blank line so that the usage-only chunk can be dropped.
"""

from __future__ import annotations

from collections.abc import Callable

import orjson

from gateway.accounting.usage import Usage, apply_anthropic, apply_openai

_USAGE_EVENTS = frozenset({b"message_start", b"message_delta", b"error"})
# Anthropic's event names, as sent after "event: " (anything else is stripped of blanks first).
_ANTHROPIC_EVENTS = frozenset({
    b"message_start", b"message_delta", b"message_stop", b"content_block_start", b"content_block_delta",
    b"content_block_stop", b"ping", b"error",
})


class StreamTap:
    __slots__ = (
        "_drop",
        "_event",
        "_held",
        "_last",
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
        self._last = b""  # OpenAI: the last content chunk's payload (its finish_reason ends the answer)
        self.deltas = 0  # content events seen: the output estimate of a cut stream
        self._tail = b""  # an incomplete last line
        self._event = b""
        self._held: list[bytes] = []  # strip mode: complete lines of an event not yet ended
        self._drop = False

    def feed(self, chunk: bytes) -> bytes:
        """Consume a chunk; return the bytes the client should get now (all of them, an incomplete
        last line included, unless whole events are held to strip the usage chunk)."""
        if self.strip_usage:
            return self.take_events(chunk)
        self.take(chunk)
        return chunk

    def taker(self) -> Callable[[bytes], bytes]:
        """Push mode: the function that consumes a chunk and returns what the client should get now,
        whole lines only (``take``; whole events when stripping: ``take_events``); the rest is held
        until it is complete, or until ``rest`` at the end."""
        return self.take_events if self.strip_usage else self.take

    def take(self, chunk: bytes) -> bytes:
        """Consume a chunk; return its whole lines (with what was held back before them)."""
        data = self._tail + chunk if self._tail else chunk
        # Hot path: one C-level split, then a tight loop over the complete lines
        # without a function call per line (this runs for every chunk of every
        # stream: the line-by-line find/slice version was ~15% of a streamed request's CPU).
        end = data.rfind(b"\n") + 1
        if not end:
            self._tail = data
            return b""
        self._tail = data[end:]
        out = data[:end]  # all of it (the same object) when it ends with a line end: the usual case
        lines = out.split(b"\n")
        del lines[-1]  # what follows the last line end: nothing
        if self.dialect == "anthropic":
            event = self._event
            deltas = 0
            for line in lines:
                head = line[:5]
                if head == b"data:":
                    if event == b"content_block_delta":
                        deltas += 1
                    elif event == b"message_stop":
                        self.completed = True
                    elif event in _USAGE_EVENTS:
                        self._anthropic_doc(event, line[5:].strip())
                elif head == b"event":
                    if line[5:6] == b":":
                        event = line[7:] if line[6:7] == b" " else line[6:]
                        if event not in _ANTHROPIC_EVENTS:  # blanks around it, a CR: the general case
                            event = event.strip()
                elif not line or line == b"\r":
                    event = b""
            self._event = event
            self.deltas += deltas
        else:
            deltas = 0
            last = None
            for line in lines:
                if line[:5] == b"data:":
                    if b'"usage"' in line or b"[DONE]" in line or b'"error"' in line:
                        self._openai(line[5:].strip())
                    else:
                        deltas += 1
                        last = line  # finish_reason_set() reads it as it is
            self.deltas += deltas
            if last is not None:
                self._last = last
        return out

    def take_events(self, chunk: bytes) -> bytes:
        """Strip mode: consume a chunk; return its whole events, minus the usage-only chunk the client
        did not ask for."""
        data = self._tail + chunk if self._tail else chunk
        end = data.rfind(b"\n") + 1
        if not end:
            self._tail = data
            return b""
        self._tail = data[end:]
        new = data[:end].split(b"\n")
        del new[-1]
        held = self._held  # complete lines of an event not yet ended (parsed when they arrived)
        lines = held + new if held else new
        pos = len(held) if held else 0
        ranges: list[tuple[int, int]] | None = None  # whole events to pass on, when one is dropped
        emit_from = 0  # lines[emit_from:ev_start] is whole events to pass on
        ev_start = 0
        openai = self.dialect != "anthropic"
        for line in new:
            pos += 1
            if not line or line == b"\r":  # end of event
                if self._drop:
                    if ranges is None:
                        ranges = []
                    ranges.append((emit_from, ev_start))
                    emit_from = pos
                    self._drop = False
                ev_start = pos
                self._event = b""
            elif openai:
                if line[:5] == b"data:":
                    if b'"usage"' in line or b"[DONE]" in line or b'"error"' in line:
                        self._openai(line[5:].strip())
                    else:
                        self.deltas += 1
                        self._last = line
            else:
                self._line(line[:-1] if line.endswith(b"\r") else line)
        self._held = lines[ev_start:]
        if ranges is None:
            return b"\n".join(lines[emit_from:ev_start]) + b"\n" if ev_start > emit_from else b""
        ranges.append((emit_from, ev_start))
        return b"".join(b"\n".join(lines[a:b]) + b"\n" for a, b in ranges if b > a)

    def rest(self) -> bytes:
        """Push mode, the stream ended: what was held back (an unterminated last line or event), parsed;
        for the client if the stream ended cleanly."""
        tail = self._tail
        rest = self.flush()
        return rest if self.strip_usage else tail

    def flush(self) -> bytes:
        """The stream ended: return anything still held (an unterminated event)."""
        rest = b""
        if self._tail:
            line = self._tail[:-1] if self._tail.endswith(b"\r") else self._tail
            self._line(line)
        if self.strip_usage:
            if not self._drop:
                rest = b"\n".join(self._held) + b"\n" + self._tail if self._held else self._tail
            self._held = []
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
        if event in _USAGE_EVENTS:
            self._anthropic_doc(event, payload)

    def _anthropic_doc(self, event: bytes, payload: bytes) -> None:
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
        if b'"usage"' not in payload and b'"error"' not in payload:
            self.deltas += 1
            self._last = payload
            return
        if b'"usage":null' in payload and payload.count(b'"usage"') == 1:
            # OpenAI sends "usage":null in every chunk once include_usage is
            # on: a content chunk, no need to parse it.
            self.deltas += 1
            self._last = payload
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
            self._last = payload
            return
        apply_openai(self.usage, u)
        if doc.get("choices"):
            self._last = payload  # a content chunk that also carries the usage (some servers)
        elif self.strip_usage:
            self._drop = True

    def end_clean(self) -> bool:
        """The upstream closed the stream cleanly: is the answer complete?

        An OpenAI stream is whole once a chunk carried a ``finish_reason``,
        even when the server closes without ``data: [DONE]`` (several
        OpenAI-compatible servers do); only a stream without a terminal
        event is cut.  Call after ``flush``.
        """
        if not self.completed and not self.errored and self.dialect != "anthropic" and finish_reason_set(self._last):
            self.completed = True
        return self.completed

    @property
    def output_estimate(self) -> int:
        """Output tokens of a stream: as reported once complete, else at least the deltas seen."""
        if self.completed and self.usage.found:
            return self.usage.output_tokens
        return max(self.usage.output_tokens, self.deltas)


def finish_reason_set(payload: bytes) -> bool:
    """An OpenAI chunk whose ``finish_reason`` is a string, not null (bytes only, no JSON parse).

    A ``"finish_reason"`` inside a string value is escaped (``\\"``) and never matches.
    """
    i = payload.find(b'"finish_reason"')
    while i >= 0:
        j = i + 15
        while j < len(payload) and payload[j] in b" \t:":
            j += 1
        if payload[j : j + 1] == b'"':
            return True
        i = payload.find(b'"finish_reason"', j)
    return False
