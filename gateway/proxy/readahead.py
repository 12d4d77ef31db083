"""Before a stream is committed: has its first content event arrived?

A stream is committed to the client (status and headers sent) only once its
first content event has arrived: a provider that sends its headers, a
``message_start`` or a role-only chunk at once and then nothing is still
"waiting for the first token".  This scanner reads the bytes read ahead
(only until the commit, so it may parse JSON) and says what they hold.
"""

from __future__ import annotations

import enum
from typing import Any

import orjson


class Seen(enum.Enum):
    NOTHING = 0  # nothing that commits yet (headers, message_start, pings, role chunk, usage)
    CONTENT = 1  # a content event: commit
    END = 2  # the answer's terminal event without content: commit (an empty answer is an answer)
    ERROR = 3  # the upstream's in-stream error event before any content: a failed attempt


_OPENAI_CONTENT = frozenset({"content", "tool_calls", "function_call", "refusal", "reasoning_content", "audio"})


class FirstContent:
    """Incremental: feed the chunks as they arrive; any split of the bytes gives the same answer."""

    __slots__ = ("_event", "_tail", "dialect")

    def __init__(self, dialect: str) -> None:
        self.dialect = dialect
        self._tail = b""
        self._event = b""

    def feed(self, chunk: bytes) -> Seen:
        if self.dialect != "openai":
            return self._anthropic(chunk) if self.dialect == "anthropic" else Seen.CONTENT
        # OpenAI (chat streams, and the Responses API's named events): line by line, whole lines only.
        data = self._tail + chunk if self._tail else chunk
        # Line by line with find, not one split: the answer is usually in the first few lines of a
        # read that may hold the whole stream (a split would copy out every line of it).
        start = 0
        end = data.find(b"\n")
        while end >= 0:
            line = data[start:end]
            start = end + 1
            end = data.find(b"\n", start)
            if line[:5] == b"data:":
                seen = _openai(line[5:])
            elif line[:6] == b"event:":  # named events are the Responses API's (chat streams have none)
                seen = _responses(line[6:].strip())
            else:
                continue
            if seen is not Seen.NOTHING:
                self._tail = b""
                return seen
        self._tail = data[start:] if start else data
        return Seen.NOTHING

    def _anthropic(self, chunk: bytes) -> Seen:
        # Event names are enough, and they cannot occur inside an earlier event's JSON: the
        # earliest of these markers says what came first.  The tail keeps a marker cut in two.
        data = self._tail + chunk if self._tail else chunk
        self._tail = data[-_ANTHROPIC_KEEP:]
        best, seen = len(data), Seen.NOTHING
        for marker, what in _ANTHROPIC_MARKERS:
            # Each search ends where the earliest marker so far begins: a stream in one read is searched
            # up to its first content event, not through to its end once per marker.
            i = data.find(marker, 0, best)
            if i >= 0:
                best, seen = i, what
        return seen


# Anthropic events that decide a commit, by name (``event: x`` lines, or ``"type":"x"`` without them).
_ANTHROPIC_MARKERS = (
    (b"content_block_delta", Seen.CONTENT),
    (b"message_delta", Seen.END),
    (b"message_stop", Seen.END),
    (b"event: error", Seen.ERROR),
    (b"event:error", Seen.ERROR),
    (b'"type":"error"', Seen.ERROR),
)
_ANTHROPIC_KEEP = max(len(m) for m, _ in _ANTHROPIC_MARKERS) - 1


def _responses(event: bytes) -> Seen:
    if event.endswith(b".delta"):
        return Seen.CONTENT
    if event in (b"response.completed", b"response.incomplete"):
        return Seen.END
    if event in (b"error", b"response.failed"):
        return Seen.ERROR
    return Seen.NOTHING


def _load(payload: bytes) -> dict[str, Any] | None:
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    return doc if isinstance(doc, dict) else None


def _openai(payload: bytes) -> Seen:
    """One data line's payload (after "data:", blanks around it)."""
    if len(payload) < 16 and payload.strip() == b"[DONE]":  # (a chunk is longer: no strip, no search)
        return Seen.END
    # The common case without a parse: a non-empty text delta.  (A quote inside a string value
    # is escaped, so this key pattern only matches a key.)
    i = payload.find(b'"content":"')
    if i >= 0 and payload[i + 11 : i + 12] not in (b'"', b""):
        return Seen.CONTENT
    doc = _load(payload.strip())
    if doc is None:
        return Seen.NOTHING
    if "error" in doc:
        return Seen.ERROR
    choices = doc.get("choices")
    if not isinstance(choices, list):
        return Seen.NOTHING
    for choice in choices:
        if not isinstance(choice, dict):
            continue
        if choice.get("finish_reason") is not None:
            return Seen.CONTENT
        delta = choice.get("delta")
        if isinstance(delta, dict):
            for key, value in delta.items():
                if value and key in _OPENAI_CONTENT:
                    return Seen.CONTENT
    return Seen.NOTHING
