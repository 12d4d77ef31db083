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


_OPENAI_CONTENT = ("content", "tool_calls", "function_call", "refusal", "reasoning_content", "audio")


class FirstContent:
    __slots__ = ("_event", "_tail", "dialect")

    def __init__(self, dialect: str) -> None:
        self.dialect = dialect
        self._tail = b""
        self._event = b""

    def feed(self, chunk: bytes) -> Seen:
        data = self._tail + chunk if self._tail else chunk
        end = data.rfind(b"\n")
        if end < 0:
            self._tail = data
            return Seen.NOTHING
        self._tail = data[end + 1 :]
        for raw in data[:end].split(b"\n"):
            line = raw[:-1] if raw.endswith(b"\r") else raw
            seen = self._line(line)
            if seen is not Seen.NOTHING:
                return seen
        return Seen.NOTHING

    def _line(self, line: bytes) -> Seen:
        if not line:
            self._event = b""
            return Seen.NOTHING
        if line.startswith(b"event:"):
            self._event = line[6:].strip()
            return Seen.NOTHING
        if not line.startswith(b"data:"):
            return Seen.NOTHING
        payload = line[5:].strip()
        if self.dialect == "anthropic":
            return self._anthropic(payload)
        if self.dialect == "openai":
            return _openai(payload)
        return Seen.CONTENT  # a format this scanner does not know: commit on its first event

    def _anthropic(self, payload: bytes) -> Seen:
        event = self._event
        if not event:  # no event line: the data's own "type" names it
            doc = _load(payload)
            event = str(doc.get("type", "")).encode() if doc is not None else b""
        if event == b"content_block_delta":
            return Seen.CONTENT
        if event in (b"message_delta", b"message_stop"):
            return Seen.END
        if event == b"error":
            return Seen.ERROR
        return Seen.NOTHING


def _load(payload: bytes) -> dict[str, Any] | None:
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    return doc if isinstance(doc, dict) else None


def _openai(payload: bytes) -> Seen:
    if payload == b"[DONE]":
        return Seen.END
    doc = _load(payload)
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
        if isinstance(delta, dict) and any(delta.get(k) for k in _OPENAI_CONTENT):
            return Seen.CONTENT
    return Seen.NOTHING
