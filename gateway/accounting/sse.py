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
    # aiohttp's: ``_paused`` while the client's transport is full; its ``transport`` None once the
    # connection is lost (a write to a closing transport before that is dropped by the loop, not raised).
    proto: BaseProtocol
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
# Reads of content events only are kept uncounted up to this many bytes (a read larger than this is
# kept alone): most streams end with their usage, and then their deltas are never asked for.
_COUNT_AFTER = 8192
_NULL_USAGE = b'"usage":null'  # in each OpenAI content chunk once include_usage is on
_DELTA_LINES = frozenset({b"event: content_block_delta", b"event: content_block_delta\r"})  # as split on LF
# Anthropic's event names, as sent after "event: " (anything else is stripped of blanks first).
_ANTHROPIC_EVENTS = frozenset({
    b"message_start", b"message_delta", b"message_stop", b"content_block_start", b"content_block_delta",
    b"content_block_stop", b"ping", b"error",
})


class StreamTap:
    __slots__ = (
        "_deltas",
        "_drop",
        "_event",
        "_held",
        "_last",
        "_tail",
        "_uncounted",
        "_uncounted_bytes",
        "completed",
        "dialect",
        "errored",
        "outlet",
        "strip_usage",
        "usage",
    )

    def __init__(self, dialect: str, *, strip_usage: bool = False) -> None:
        self.dialect = dialect
        self.strip_usage = strip_usage and dialect != "anthropic"  # (OpenAI's usage chunk: Anthropic has none)
        self.usage = Usage()
        self.completed = False  # saw message_stop / [DONE]
        self.errored = False  # saw an error event from upstream
        # OpenAI: the last content chunk's payload (its finish_reason ends the answer), or the last
        # read of content chunks (``_last_line``).
        self._last = b""
        # Content events seen, the output estimate of a cut stream: OpenAI's content chunks,
        # Anthropic's ``event: content_block_delta`` lines (``deltas``).  Reads of content events only
        # are counted when asked (a stream that ends with its usage never is), or once more than
        # _COUNT_AFTER bytes of them are held: ``_uncounted``.
        self._deltas = 0
        self._uncounted: list[bytes] = []
        self._uncounted_bytes = 0
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
        if self.dialect == "anthropic":
            if (
                self._event not in _STATEFUL and b"message_" not in out and b"error" not in out
                and 13 not in out
            ):
                # The usual read: content events only (no usage, stop or error event begins or goes on
                # here), LF line ends.  Nothing to parse: the deltas are counted in C when asked, and
                # what event is open at the end does not matter (only a stateful one's data lines are
                # read).  (``_hold`` written out: a call fewer on every read of a stream.)
                if self._uncounted_bytes + end > _COUNT_AFTER and self._uncounted:
                    self._count()
                self._uncounted.append(out)
                self._uncounted_bytes += end
                self._event = b""
            elif len(out) < _PARSE_BELOW or 13 in out:
                self._anthropic_lines(out)  # a few events, or CR line ends: every line parsed
            else:
                self._anthropic_events(out)
        else:
            if end >= _PARSE_BELOW:
                m = _openai_marker(out, 0)  # several events: where the first to parse is, in three passes
            elif (
                b"[DONE]" not in out and b'"error"' not in out
                and (b'"usage"' not in out or (
                    out[(u := out.find(b'"usage"')) : u + 12] == _NULL_USAGE and b'"usage"' not in out[u + 12 :]))
            ):
                # An event or two of content: the same three passes, and one call if include_usage is on
                # (a content chunk's "usage":null; a second one in the read takes the general path).
                m = -1
            else:
                m = _openai_marker(out, 0)
            if m < 0:
                if self.strip_usage and (
                    self._held or self._drop or not (out[-2:] == b"\n\n" or out[-3:] == b"\n\r\n")
                ):
                    return self._events(out)  # an event still open (or being dropped): whole events only
                # The usual read: content chunks only (with include_usage on, OpenAI's carry
                # "usage":null).  Every data line is one: counted in C when asked; the read is kept,
                # its last data line found only if end_clean() asks.  (``_hold`` written out.)
                if self._uncounted_bytes + end > _COUNT_AFTER and self._uncounted:
                    self._count()
                self._uncounted.append(out)
                self._uncounted_bytes += end
                if out[:5] == b"data:" or b"\ndata:" in out:
                    self._last = out
            elif self.strip_usage:
                # A usage, [DONE] or error event may be dropped: whole events only.
                if not self._held and not self._drop and len(out) >= _PARSE_BELOW and out[-2:] == b"\n\n" and (
                    13 not in out
                ):
                    return self._openai_whole(out, m)
                return self._events(out)
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
                self._deltas += deltas
                if last is not None:
                    self._last = last
        o = self.outlet
        if o is None:
            return out
        # Inlined _send (the hot path of a relayed stream).
        proto = o.proto
        if proto.transport is None:  # the client's connection is lost (aiohttp clears it): no call per read
            o.gone()
            return out
        transport = o.transport
        if not o.chunked:
            transport.write(out)
        elif end < _COPY_BELOW:
            transport.write(b"%x\r\n%b\r\n" % (end, out))
        else:
            transport.writelines((b"%x\r\n" % end, out, b"\r\n"))
        o.sent += end
        o.last = out
        if proto._paused:
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
        # Where the next "message_" / "error" is (-1: none left), each found again only once passed.
        i = out.find(b"message_", pos)
        j = out.find(b"error", pos)
        while pos < n:
            if 0 <= i < pos:
                i = out.find(b"message_", pos)
            if 0 <= j < pos:
                j = out.find(b"error", pos)
            m = i if j < 0 or 0 <= i < j else j  # the first name that needs parsing
            if m < 0:
                break
            k = out.rfind(b"\n\n", pos, m)
            start = pos if k < 0 else k + 2  # where its event begins
            if start > pos:
                self._hold(out[pos:start])
            k = out.find(b"\n\n", m)
            pos = n if k < 0 else k + 2  # where its event ends (after the blank line)
            self._event = b""
            nl = out.find(b"\n", start)
            if (
                k >= 0 and out.startswith(b"event: ", start) and out.startswith(b"data:", nl + 1)
                and out.find(b"\n", nl + 1) == k and (name := out[start + 7 : nl]) in _ANTHROPIC_EVENTS
            ):
                # The usual event (an event line with a name as Anthropic spells it, one data line,
                # the blank line): read as _anthropic_lines would read it, without a split.
                if name in _USAGE_EVENTS:
                    self._anthropic_doc(name, out[nl + 6 : k].strip())
                elif name == b"message_stop":
                    self.completed = True
                elif name == b"content_block_delta":  # (a text that says "error" or "message_")
                    self._deltas += 1
            else:
                self._anthropic_lines(out[start:pos])
        else:
            return
        self._hold(out[pos:] if pos else out)
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
        self._deltas += deltas

    def _send(self, out: bytes) -> None:
        """Push mode: write bytes passed on to the outlet."""
        o = self.outlet
        if o is None or not out:
            return
        if o.proto.transport is None:  # the client's connection is lost
            o.gone()
            return
        transport = o.transport
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
                        self._deltas += 1
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

    def _openai_whole(self, out: bytes, m: int) -> bytes:
        """Strip mode, OpenAI, whole events with LF line ends and nothing held (a stream that came
        in one read or in event-sized reads), ``m`` the first marker (``_openai_marker``): the events
        that hold a usage object, ``[DONE]`` or an error go through ``_events`` (which drops the
        usage-only chunk); the content chunks between them are kept uncounted and passed as they
        are.  The same as ``_events(out)``."""
        pieces: list[bytes] = []
        pos = 0
        n = len(out)
        while m >= 0:
            k = out.rfind(b"\n\n", pos, m)
            start = pos if k < 0 else k + 2  # the event holding it
            if start > pos:
                pieces.append(self._content(out[pos:start]))
            end = out.find(b"\n\n", m) + 2  # (out ends with a blank line)
            if out.find(b"\n", start) == end - 2 and out.startswith(b"data:", start):
                # The usual event: one data line (OpenAI's usage chunk, [DONE], an error), parsed as
                # _events would parse it; the usage-only chunk is dropped.
                self._openai(out[start + 5 : end - 2].strip())
                if self._drop:
                    self._drop = False
                else:
                    pieces.append(out[start:end])
            else:
                pieces.append(self._events(out[start:end], send=False))
            pos = end
            m = _openai_marker(out, pos)
        if pos < n:
            pieces.append(self._content(out[pos:] if pos else out))
        passed = out if len(pieces) == 1 and len(pieces[0]) == n else b"".join(pieces)
        if self.outlet is not None:
            self._send(passed)
        return passed

    def _content(self, region: bytes) -> bytes:
        """OpenAI content chunks (whole events): kept uncounted, the last data line kept."""
        self._hold(region)
        if region[:5] == b"data:" or b"\ndata:" in region:
            self._last = region  # as in take(): the line is found when asked
        return region

    def _hold(self, region: bytes) -> None:
        """Content events only, whole lines: counted when asked (``deltas``), or once more than
        _COUNT_AFTER bytes are held."""
        if self._uncounted_bytes + len(region) > _COUNT_AFTER and self._uncounted:
            self._count()
        self._uncounted.append(region)
        self._uncounted_bytes += len(region)

    def _count(self) -> None:
        """Count the content events held uncounted (whole lines: each piece ends with a line end).
        Joined with a line end, so that no two pieces' lines share one: Anthropic's pattern begins and
        ends with a line end, and one piece's last line may be ``event: content_block_delta``, the
        next's first one too (an event parsed between them)."""
        held = self._uncounted
        self._deltas += (b"\n" + b"\n".join(held)).count(_DELTA_LINE if self.dialect == "anthropic" else b"\ndata:")
        held.clear()
        self._uncounted_bytes = 0

    @property
    def deltas(self) -> int:
        """Content events seen, the output estimate of a cut stream: OpenAI's content chunks
        (data lines), Anthropic's ``event: content_block_delta`` lines."""
        if self._uncounted:
            self._count()
        return self._deltas

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
                self._deltas += 1
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
            self._deltas += 1
            self._last = payload
            return
        if b'"usage":null' in payload and payload.count(b'"usage"') == 1:
            # OpenAI sends "usage":null in every chunk once include_usage is
            # on: a content chunk, no need to parse it.
            self._deltas += 1
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
            self._deltas += 1
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


def _openai_marker(out: bytes, pos: int) -> int:
    """Where, in OpenAI's whole lines ``out`` from ``pos`` on, the first event that needs parsing is
    marked: a usage object (not a content chunk's ``"usage":null``), ``[DONE]`` or an error; -1: none
    (content chunks only).  Three passes over the bytes at most, whatever the read holds."""
    n = len(out)
    m = out.find(b'"usage"', pos)
    if m >= 0 and out.startswith(_NULL_USAGE, m):
        # include_usage on: "usage":null in every content chunk, and the usage object (if the read
        # holds it) in the last chunk but [DONE]: the last "usage" is checked, the ones before it
        # counted; only an unusual read is searched chunk by chunk.
        r = out.rfind(b'"usage"', m + 12)
        if r < 0:
            m = -1
        elif out.count(b'"usage"', m, r) == out.count(_NULL_USAGE, m, r):
            m = -1 if out.startswith(_NULL_USAGE, r) else r
        else:
            while m >= 0 and out.startswith(_NULL_USAGE, m):
                m = out.find(b'"usage"', m + 12)
    end = n if m < 0 else m
    k = out.find(b'"error"', pos, end)
    if k >= 0:
        end = k
    k = out.find(b"[DONE]", pos, end)
    if k >= 0:
        end = k
    return end if end < n else -1


def _last_line(last: bytes) -> bytes:
    """``StreamTap._last``: a content chunk's line or payload, or a whole read of content chunks
    (it ends with a line end; a line has none): then its last data line."""
    if 10 not in last:
        return last
    i = last.rfind(b"\ndata:") + 1  # where that line begins (0: the first line, or none)
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
