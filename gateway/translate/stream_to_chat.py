"""An Anthropic Messages stream as an OpenAI Chat Completions stream, event by event.

message_start -> a first chunk with the assistant role; text_delta ->
``delta.content``; a tool_use block -> a ``tool_calls`` entry (id, name),
its input_json_delta -> that entry's ``function.arguments``; message_delta
-> the chunk with ``finish_reason``; message_stop -> the usage chunk (only
when the client asked with ``stream_options.include_usage``) and
``data: [DONE]``.  An upstream ``error`` event becomes OpenAI's in-stream
error.  Nothing terminal is sent unless the upstream sent message_stop: a
cut stream is ended by the relay with the client dialect's error event.
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from gateway.errors import OPENAI
from gateway.translate.bodies import chat_usage
from gateway.translate.common import finish_reason
from gateway.translate.errors import openai_error_of_anthropic
from gateway.translate.sse import SSEDecoder

DONE = b"data: [DONE]\n\n"


class AnthropicToChatStream:
    __slots__ = ("_base", "_decoder", "_head", "_include_usage", "_tool_index", "_tools", "_usage", "done", "failed")

    dialect = OPENAI  # the client's

    def __init__(self, *, include_usage: bool) -> None:
        self._decoder = SSEDecoder()
        self._include_usage = include_usage
        self._base: dict[str, Any] = {"id": "", "object": "chat.completion.chunk", "created": int(time.time()), "model": ""}
        self._usage: dict[str, Any] = {}
        self._tools: dict[int, int] = {}  # Anthropic block index -> OpenAI tool_calls index
        self._tool_index = 0
        self._head = b""  # 'data: {"id":...,"choices":[{"index":0,"delta":' once the id is known
        self.done = False  # the terminal [DONE] was sent
        self.failed = False  # the upstream sent its error: nothing after it, never a [DONE]

    def feed(self, chunk: bytes) -> bytes:
        out: list[bytes] = []
        if (
            chunk[:7] == b"event: " and chunk[-2:] == b"\n\n" and self._decoder.idle
            and chunk.count(b"\n") == 3 and 13 not in chunk
        ):
            # The usual read: one whole event (an event line and a data line).
            name, _, rest = chunk[7:-2].partition(b"\n")
            if rest[:6] == b"data: ":
                self._event(name.strip(), rest[6:], out)
                return b"".join(out)
        for event, data in self._decoder.feed(chunk):
            self._event(event, data, out)
        return b"".join(out)

    def finish(self) -> bytes:
        """The upstream ended cleanly: anything an unterminated last event still gives."""
        out: list[bytes] = []
        for event, data in self._decoder.flush():
            self._event(event, data, out)
        return b"".join(out)

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> bytes:
        doc = {**self._base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
        return b"data: " + orjson.dumps(doc) + b"\n\n"

    def _text(self, text: str) -> bytes:
        """The hot chunk, assembled from bytes: a prefix made once, the text, a fixed tail."""
        if not self._head:
            self._head = b"data: " + orjson.dumps(self._base)[:-1] + b',"choices":[{"index":0,"delta":{"content":'
        return self._head + orjson.dumps(text) + b'},"finish_reason":null,"logprobs":null}]}\n\n'

    def _event(self, event: bytes, data: bytes, out: list[bytes]) -> None:
        if event == b"ping" or self.failed:
            return
        try:
            doc = orjson.loads(data)
        except orjson.JSONDecodeError:
            return
        if not isinstance(doc, dict):
            return
        kind = doc.get("type") or event.decode()
        if kind == "content_block_delta":
            delta = doc.get("delta") or {}
            dk = delta.get("type")
            if dk == "text_delta":
                out.append(self._text(delta.get("text", "")))
            elif dk == "input_json_delta":
                i = self._tools.get(doc.get("index", -1))
                if i is not None:
                    out.append(self._chunk({"tool_calls": [{"index": i, "function": {"arguments": delta.get("partial_json", "")}}]}))
            # thinking and signature deltas have no place in a chat stream
        elif kind == "content_block_start":
            block = doc.get("content_block") or {}
            if block.get("type") == "tool_use":
                i = self._tool_index
                self._tool_index += 1
                self._tools[doc.get("index", -1)] = i
                call = {"index": i, "id": block.get("id"), "type": "function", "function": {"name": block.get("name"), "arguments": ""}}
                out.append(self._chunk({"tool_calls": [call]}))
            elif block.get("type") == "text" and block.get("text"):
                out.append(self._chunk({"content": block["text"]}))
        elif kind == "message_start":
            msg = doc.get("message") or {}
            self._base["id"] = msg.get("id", "")
            self._base["model"] = msg.get("model", "")
            self._head = b""
            self._usage = dict(msg.get("usage") or {})
            out.append(self._chunk({"role": "assistant", "content": ""}))
        elif kind == "message_delta":
            u = doc.get("usage")
            if isinstance(u, dict):
                self._usage.update({k: v for k, v in u.items() if v is not None})
            reason = finish_reason((doc.get("delta") or {}).get("stop_reason"))
            if reason is not None:
                out.append(self._chunk({}, reason))
        elif kind == "message_stop":
            if self._include_usage:
                usage = {**self._base, "choices": [], "usage": chat_usage(self._usage)}
                out.append(b"data: " + orjson.dumps(usage) + b"\n\n")
            out.append(DONE)
            self.done = True
        elif kind == "error":
            out.append(b"data: " + orjson.dumps(openai_error_of_anthropic(doc)) + b"\n\n")
            self.failed = True
