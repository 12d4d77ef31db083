"""Incremental SSE tap: reads usage from a stream while its bytes pass through.

Correct for any split of the byte stream (mid-line, mid-UTF-8 character,
``\\r\\n`` or ``\\n`` line ends): lines are cut on ``\\n`` in bytes and only
complete lines are decoded.  When ``strip_usage`` is set (OpenAI, the gateway
asked for ``include_usage`` and the client did not) whole events are held
until their blank line so that the usage-only chunk can be dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import orjson

from gateway.accounting.usage import Usage, apply_anthropic, apply_openai

if TYPE_CHECKING:
    import asyncio

    from aiohttp.base_protocol import BaseProtocol


class Outlet(Protocol):
    """Push mode: where the tap writes what the client should get, inside the upstream's read callback
    (the relay's state: one write per chunk, no call between the tap and the client's transport)."""

    transport: asyncio.Transport
    proto: BaseProtocol  # aiohttp's: ``_paused`` while the client's transport is full
    chunked: bool  # frame each write (chunked transfer encoding)
    sent: int  # body bytes written
    last: bytes  # the last bytes written (is the client at an event boundary?)

    def gone(self) -> None:
        """The client's connection is closing: stop (nothing was written)."""

    def slow(self) -> None:
        """The client's transport is full: stop reading the upstream until it drains."""


_COPY_BELOW = 16384  # a smaller chunk is copied into its frame (one write); a larger one is not

_USAGE_EVENTS = frozenset({b"message_start", b"message_delta", b"error"})
# Events whose data lines the tap reads (the others' it only passes on).
_STATEFUL = _USAGE_EVENTS | {b"message_stop"}
# A content event's line, as Anthropic writes it: what ``deltas`` counts (after a line end).
_DELTA_LINE = b"\nevent: content_block_delta\n"
# A read shorter than this (a few events) is parsed line by line even when most of it could be counted:
# finding the events that need parsing costs about what parsing them all does (opcode counts).
_PARSE_BELOW = 512
_NULL_USAGE = b'"usage":null'  # in each OpenAI content chunk once include_usage is on
_DELTA_LINES = frozenset({b"event: content_block_delta", b"event: content_block_delta\r"})  # as split on LF
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
        "outlet",
        "strip_usage",
        "usage",
    )

    def __init__(self, dialect: str, *, strip_usage: bool = False) -> None:
        self.dialect = dialect
        self.strip_usage = strip_usage
        self.usage = Usage()
        self.completed = False  # saw message_stop / [DONE]
        self.errored = False  # saw an error event from upstream
        # OpenAI: the last content chunk's payload (its finish_reason ends the answer), or the last
        # read of content chunks (``_last_line``).
        self._last = b""
        # Content events seen, the output estimate of a cut stream: OpenAI's content chunks,
        # Anthropic's ``event: content_block_delta`` lines.
        self.deltas = 0
        self._tail = b""  # an incomplete last line
        self._event = b""
        self._held: list[bytes] = []  # strip mode: complete lines of an event not yet ended
        self._drop = False
        self.outlet: Outlet | None = None  # push mode: ``take`` writes what it passes on here

    def feed(self, chunk: bytes) -> bytes:
        """Consume a chunk; return the bytes the client should get now (all of them, an incomplete
        last line included, unless whole events are held to strip the usage chunk)."""
        if self.strip_usage:
            return self.take(chunk)
        self.take(chunk)
        return chunk

    def taker(self) -> Callable[[bytes], bytes]:
        """Push mode: the function that consumes a chunk and returns what the client should get now,
        whole lines only (whole events when stripping); the rest is held until it is complete, or
        until ``rest`` at the end.  With an ``outlet`` it also writes them there."""
        return self.take

    def take(self, chunk: bytes) -> bytes:
        """Consume a chunk; return its whole lines (whole events when stripping), with what was held
        back before them, and write them to the outlet if there is one."""
        data = self._tail + chunk if self._tail else chunk
        # Hot path: one C-level split, then a tight loop over the complete lines
        # without a function call per line (this runs for every chunk of every
        # stream: the line-by-line find/slice version was ~15% of a streamed request's CPU).
        # In push mode this one call per read also writes to the client (the outlet).
        end = data.rfind(b"\n") + 1
        if not end:
            self._tail = data
            return b""
        self._tail = data[end:]
        out = data[:end]  # all of it (the same object) when it ends with a line end: the usual case
        if self.strip_usage and (
            self._held or self._drop or self.dialect == "anthropic"
            or (b'"usage"' in out and out.count(b'"usage"') != out.count(_NULL_USAGE))
            or b"[DONE]" in out or b'"error"' in out
            or not (out[-2:] == b"\n\n" or out[-3:] == b"\n\r\n")
        ):
            # An event still open, or one that may be dropped: whole events only.  Otherwise
            # (the usual read: whole content events) the lines pass as they are, as without stripping.
            if (
                self.dialect != "anthropic" and not self._held and not self._drop and len(out) >= _PARSE_BELOW
                and out[-2:] == b"\n\n" and b"\r" not in out
            ):
                return self._openai_whole(out)
            return self._events(out)
        if self.dialect == "anthropic":
            if (
                self._event not in _STATEFUL and b"message_" not in out and b"error" not in out
                and b"\r" not in out
            ):
                # The usual read: content events only (no usage, stop or error event begins or goes on
                # here), LF line ends.  Nothing to parse: the deltas are counted in C, and what event
                # is open at the end does not matter (only a stateful one's data lines are read).
                self.deltas += (b"\n" + out).count(_DELTA_LINE)
                self._event = b""
            elif len(out) < _PARSE_BELOW or b"\r" in out:
                self._anthropic_lines(out)  # a few events, or CR line ends: every line parsed
            else:
                self._anthropic_events(out)
        elif (
            b"[DONE]" not in out and b'"error"' not in out
            and (b'"usage"' not in out or out.count(b'"usage"') == out.count(_NULL_USAGE))
        ):
            # The usual read: content chunks only (with include_usage on, OpenAI's carry
            # "usage":null).  Every data line is one (counted in C: one call a read, as the split
            # below); the read is kept, its last data line found only if end_clean() asks.
            # (``_content(out, 0, len(out))`` written out: a call fewer on every read of a stream.)
            nl = b"\n" + out
            n = nl.count(b"\ndata:")
            if n:
                self.deltas += n
                self._last = out  # a read: its last data line is found if end_clean() asks (_last_line)
        else:
            lines = out.split(b"\n")
            del lines[-1]  # what follows the last line end: nothing
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
        o = self.outlet
        if o is None:
            return out
        # Inlined _send (the hot path of a relayed stream).
        transport = o.transport
        if transport.is_closing():
            o.gone()
            return out
        if not o.chunked:
            transport.write(out)
        elif end < _COPY_BELOW:
            transport.write(b"%x\r\n%b\r\n" % (end, out))
        else:
            transport.writelines((b"%x\r\n" % end, out, b"\r\n"))
        o.sent += end
        o.last = out
        if o.proto._paused:
            o.slow()
        return out

    def _anthropic_events(self, out: bytes) -> None:
        """Whole lines with LF ends, some of them a usage, stop or error event's (or the event open
        before them is one): the events holding such a name, and the lines up to the first blank
        line when an open event is one, are parsed line by line; the events between, counted in C.

        The same as ``_anthropic_lines(out)``: each part parsed starts after a blank line (no event
        open), and a part counted holds no such event, so what it leaves open is never read."""
        pos = 0
        if self._event in _STATEFUL:  # its data lines may be in this read
            k = out.find(b"\n\n")
            pos = len(out) if k < 0 else k + 2
            self._anthropic_lines(out[:pos])
        n = len(out)
        while pos < n:
            i = out.find(b"message_", pos)
            j = out.find(b"error", pos)
            m = i if j < 0 or 0 <= i < j else j  # the first name that needs parsing
            if m < 0:
                break
            k = out.rfind(b"\n\n", pos, m)
            start = pos if k < 0 else k + 2  # where its event begins
            if start > pos:
                self.deltas += (b"\n" + out[pos:start]).count(_DELTA_LINE)
            k = out.find(b"\n\n", m)
            pos = n if k < 0 else k + 2  # where its event ends (after the blank line)
            self._event = b""
            self._anthropic_lines(out[start:pos])
        else:
            return
        self.deltas += (b"\n" + out[pos:]).count(_DELTA_LINE)
        self._event = b""

    def _anthropic_lines(self, out: bytes) -> None:
        """Whole lines, parsed one by one."""
        lines = out.split(b"\n")
        del lines[-1]  # what follows the last line end: nothing
        event = self._event
        deltas = 0
        for line in lines:
            head = line[:5]
            if head == b"data:":
                if event == b"message_stop":
                    self.completed = True
                elif event in _USAGE_EVENTS:
                    self._anthropic_doc(event, line[5:].strip())
            elif head == b"event":
                if line[5:6] == b":":
                    if line in _DELTA_LINES:
                        deltas += 1
                    event = line[7:] if line[6:7] == b" " else line[6:]
                    if event not in _ANTHROPIC_EVENTS:  # blanks around it, a CR: the general case
                        event = event.strip()
            elif not line or line == b"\r":
                event = b""
        self._event = event
        self.deltas += deltas

    def _send(self, out: bytes) -> None:
        """Push mode: write bytes passed on to the outlet."""
        o = self.outlet
        if o is None or not out:
            return
        transport = o.transport
        if transport.is_closing():
            o.gone()
            return
        n = len(out)
        if not o.chunked:
            transport.write(out)
        elif n < _COPY_BELOW:
            transport.write(b"%x\r\n%b\r\n" % (n, out))
        else:
            transport.writelines((b"%x\r\n" % n, out, b"\r\n"))
        o.sent += n
        o.last = out
        if o.proto._paused:
            o.slow()

    def _events(self, out: bytes, send: bool = True) -> bytes:
        """Strip mode: the whole lines ``out`` read; pass on (return, and write to the outlet) the
        events they complete, minus the usage-only chunk the client did not ask for."""
        new = out.split(b"\n")
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
            if ev_start == emit_from:
                return b""
            # Whole events as read: that very object, no copy.
            passed = out if not held and ev_start == pos else b"\n".join(lines[emit_from:ev_start]) + b"\n"
        else:
            ranges.append((emit_from, ev_start))
            passed = b"".join(b"\n".join(lines[a:b]) + b"\n" for a, b in ranges if b > a)
        if self.outlet is not None and send:
            self._send(passed)
        return passed

    def _openai_whole(self, out: bytes) -> bytes:
        """Strip mode, OpenAI, whole events with LF line ends and nothing held (a stream that came
        in one read or in event-sized reads): the events that hold a usage object, ``[DONE]`` or an
        error go through ``_events`` (which drops the usage-only chunk); the content chunks between
        them are counted in C and passed as they are.  The same as ``_events(out)``."""
        pieces: list[bytes] = []
        pos = 0
        n = len(out)
        while pos < n:
            m = out.find(b'"usage"', pos)
            while m >= 0 and out.startswith(_NULL_USAGE, m):  # a content chunk's "usage":null
                m = out.find(b'"usage"', m + 12)
            for marker in (b"[DONE]", b'"error"'):
                k = out.find(marker, pos, m if m >= 0 else n)
                if k >= 0:
                    m = k
            if m < 0:
                break
            k = out.rfind(b"\n\n", pos, m)
            start = pos if k < 0 else k + 2  # the event holding it
            if start > pos:
                pieces.append(self._content(out, pos, start))
            end = out.find(b"\n\n", m) + 2  # (out ends with a blank line)
            pieces.append(self._events(out[start:end], send=False))
            pos = end
        if pos < n:
            pieces.append(self._content(out, pos, n))
        passed = out if len(pieces) == 1 and len(pieces[0]) == n else b"".join(pieces)
        if self.outlet is not None:
            self._send(passed)
        return passed

    def _content(self, out: bytes, start: int, end: int) -> bytes:
        """OpenAI content chunks out[start:end] (whole events): counted, the last data line kept."""
        region = out[start:end]
        nl = b"\n" + region
        count = nl.count(b"\ndata:")
        if count:
            self.deltas += count
            self._last = region  # as in take(): the line is found when asked
        return region

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
            if line == b"event: content_block_delta":  # the take() loop's test (a CR is gone here)
                self.deltas += 1
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
        if not self.completed and not self.errored and self.dialect != "anthropic" and finish_reason_set(_last_line(self._last)):
            self.completed = True
        return self.completed

    @property
    def output_estimate(self) -> int:
        """Output tokens of a stream: as reported once complete, else at least the deltas seen."""
        if self.completed and self.usage.found:
            return self.usage.output_tokens
        return max(self.usage.output_tokens, self.deltas)


def _last_line(last: bytes) -> bytes:
    """``StreamTap._last``: a content chunk's line or payload, or a whole read of content chunks
    (it ends with a line end; a line has none): then its last data line."""
    if b"\n" not in last:
        return last
    nl = b"\n" + last
    i = nl.rfind(b"\ndata:")  # in ``last``: where that line begins
    return last[i : last.find(b"\n", i)]


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
