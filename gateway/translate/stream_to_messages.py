"""An OpenAI Chat Completions stream as an Anthropic Messages stream, event by event.

The first chunk -> message_start (input tokens are not known yet: OpenAI
reports usage at the end, so message_start carries 0 and message_delta the
real counts, which the Anthropic SDK takes over); ``delta.content`` -> a text
block's text_delta; a ``tool_calls`` entry -> a tool_use block, its argument
pieces -> input_json_delta; ``finish_reason`` closes the open block; the
usage chunk is remembered; ``[DONE]`` (or a clean end after a finish_reason)
-> message_delta with stop reason and usage, then message_stop.  An
in-stream ``{"error": ...}`` becomes Anthropic's ``event: error``.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from gateway.errors import ANTHROPIC
from gateway.translate.bodies import messages_usage
from gateway.translate.common import stop_reason
from gateway.translate.errors import anthropic_error_of_openai
from gateway.translate.sse import SSEDecoder


def sse_event(name: bytes, doc: dict[str, Any]) -> bytes:
    return b"event: " + name + b"\ndata: " + orjson.dumps(doc) + b"\n\n"


_STOP = sse_event(b"message_stop", {"type": "message_stop"})
# The hot event, assembled from bytes (no dict, no whole-document dumps per delta).
_TEXT_HEAD = b'event: content_block_delta\ndata: {"type":"content_block_delta","index":'
_TEXT_MID = b',"delta":{"type":"text_delta","text":'
_JSON_MID = b',"delta":{"type":"input_json_delta","partial_json":'
_TAIL = b"}}\n\n"
# A chunk whose only choice is a plain text delta, nothing else to note (OpenAI's field order).
# Anchored at the end: the top-level choices, never a quoted look-alike (quotes inside
# strings are escaped).
_PLAIN_TEXT = re.compile(
    rb'"choices":\[\{"index":0,"delta":\{"content":("(?:[^"\\]|\\.)*")\},"logprobs":null,'
    rb'"finish_reason":null\}\](?:,"usage":null)?\}$'
)


class ChatToAnthropicStream:
    __slots__ = ("_decoder", "_kind", "_next", "_open", "_stop", "_tools", "_usage", "done", "failed", "started")

    dialect = ANTHROPIC  # the client's

    def __init__(self) -> None:
        self._decoder = SSEDecoder()
        self.started = False
        self.done = False  # message_stop was sent
        self.failed = False  # the upstream sent its error: nothing after it, never a message_stop
        self._open: int | None = None  # Anthropic index of the open block
        self._kind = ""  # "text" | "tool_use" (the open block's)
        self._next = 0
        self._tools: dict[int, int] = {}  # OpenAI tool_calls index -> Anthropic block index
        self._stop: str | None = None
        self._usage: dict[str, Any] = {"input_tokens": 0, "output_tokens": 0}

    def feed(self, chunk: bytes) -> bytes:
        out: list[bytes] = []
        if chunk[:6] == b"data: " and chunk[-2:] == b"\n\n" and self._decoder.idle and chunk.count(b"\n") == 2:
            data = chunk[6:-2]  # the usual read: one whole chunk of one data line
            self._data(data[:-1] if data[-1:] == b"\r" else data, out)
        else:
            for _, data in self._decoder.feed(chunk):
                self._data(data, out)
        return b"".join(out)

    def finish(self) -> bytes:
        """The upstream ended cleanly: end the message if a finish_reason was seen."""
        out: list[bytes] = []
        for _, data in self._decoder.flush():
            self._data(data, out)
        if not self.done and not self.failed and self._stop is not None:
            self._end(out)
        return b"".join(out)

    # ------------------------------------------------------------------

    def _data(self, data: bytes, out: list[bytes]) -> None:
        if self.done or self.failed:
            return
        if data == b"[DONE]":
            self._end(out)
            return
        if self._kind == "text":
            m = _PLAIN_TEXT.search(data)
            if m is not None and len(m.group(1)) > 2:
                # A text delta of the usual shape: its JSON string goes across as it is
                # (valid JSON in, valid JSON out; no parse, no re-encode).
                out.append(_TEXT_HEAD + str(self._open).encode() + _TEXT_MID + m.group(1) + _TAIL)
                return
        try:
            doc = orjson.loads(data)
        except orjson.JSONDecodeError:
            return
        if not isinstance(doc, dict):
            return
        if doc.get("error"):
            out.append(sse_event(b"error", anthropic_error_of_openai(doc, 0)))
            self.failed = True
            return
        if not self.started:
            self._start(doc, out)
        u = doc.get("usage")
        if isinstance(u, dict):
            self._usage = messages_usage(u)
        for choice in doc.get("choices") or ():
            if isinstance(choice, dict) and choice.get("index", 0) == 0:
                self._choice(choice, out)

    def _start(self, doc: dict[str, Any], out: list[bytes]) -> None:
        self.started = True
        message = {
            "id": doc.get("id", ""), "type": "message", "role": "assistant", "model": doc.get("model", ""),
            "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0},
        }
        out.append(sse_event(b"message_start", {"type": "message_start", "message": message}))

    def _choice(self, choice: dict[str, Any], out: list[bytes]) -> None:
        delta = choice.get("delta")
        if isinstance(delta, dict):
            text = delta.get("content")
            if not text:
                text = delta.get("refusal")
            if isinstance(text, str) and text:
                if self._kind != "text":
                    self._open_block({"type": "text", "text": ""}, "text", out)
                out.append(_TEXT_HEAD + str(self._open).encode() + _TEXT_MID + orjson.dumps(text) + _TAIL)
            for call in delta.get("tool_calls") or ():
                if isinstance(call, dict):
                    self._tool_call(call, out)
        reason = choice.get("finish_reason")
        if reason is not None:
            self._stop = stop_reason(reason)
            self._close(out)

    def _tool_call(self, call: dict[str, Any], out: list[bytes]) -> None:
        oi = call.get("index", 0)
        raw = call.get("function")
        fn: dict[str, Any] = raw if isinstance(raw, dict) else {}
        block = self._tools.get(oi)
        if block is None:
            block = self._open_block(
                {"type": "tool_use", "id": call.get("id") or f"toolu_{oi}", "name": fn.get("name") or "", "input": {}},
                "tool_use",
                out,
            )
            self._tools[oi] = block
        args = fn.get("arguments")
        if isinstance(args, str) and args:
            out.append(_TEXT_HEAD + str(block).encode() + _JSON_MID + orjson.dumps(args) + _TAIL)

    def _open_block(self, block: dict[str, Any], kind: str, out: list[bytes]) -> int:
        self._close(out)
        index = self._next
        self._next += 1
        self._open = index
        self._kind = kind
        out.append(sse_event(b"content_block_start", {"type": "content_block_start", "index": index, "content_block": block}))
        return index

    def _close(self, out: list[bytes]) -> None:
        if self._open is not None:
            out.append(sse_event(b"content_block_stop", {"type": "content_block_stop", "index": self._open}))
            self._open = None
            self._kind = ""

    def _end(self, out: list[bytes]) -> None:
        if not self.started:
            self._start({}, out)
        self._close(out)
        delta = {"stop_reason": self._stop or "end_turn", "stop_sequence": None}
        out.append(sse_event(b"message_delta", {"type": "message_delta", "delta": delta, "usage": self._usage}))
        out.append(_STOP)
        self.done = True
