"""Response bodies: an Anthropic message as a chat completion, and back.

Usage: OpenAI's ``prompt_tokens`` includes cached tokens, Anthropic's
``input_tokens`` does not (cache reads and writes are counted apart).  So
``prompt_tokens = input + cache_read + cache_write`` and
``prompt_tokens_details.cached_tokens = cache_read``; back the other way
``input_tokens = prompt_tokens - cached_tokens``.  Ids are kept as the
upstream made them (a request can be traced at the provider).
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from gateway.translate.common import finish_reason, stop_reason


def _int(d: Any, key: str) -> int:
    v = d.get(key) if isinstance(d, dict) else None
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else 0


def chat_usage(u: Any) -> dict[str, Any]:
    """Anthropic usage -> OpenAI usage."""
    inp = _int(u, "input_tokens")
    read = _int(u, "cache_read_input_tokens")
    write = _int(u, "cache_creation_input_tokens")
    out = _int(u, "output_tokens")
    prompt = inp + read + write
    return {
        "prompt_tokens": prompt,
        "completion_tokens": out,
        "total_tokens": prompt + out,
        "prompt_tokens_details": {"cached_tokens": read},
    }


def messages_usage(u: Any) -> dict[str, Any]:
    """OpenAI usage -> Anthropic usage."""
    prompt = _int(u, "prompt_tokens")
    cached = min(_int(u.get("prompt_tokens_details") if isinstance(u, dict) else None, "cached_tokens"), prompt)
    return {
        "input_tokens": prompt - cached,
        "output_tokens": _int(u, "completion_tokens"),
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
    }


def message_to_completion(msg: dict[str, Any]) -> dict[str, Any]:
    """An Anthropic Messages response as a Chat Completions response."""
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for block in msg.get("content") or ():
        if not isinstance(block, dict):
            continue
        kind = block.get("type")
        if kind == "text":
            texts.append(str(block.get("text", "")))
        elif kind == "tool_use":
            calls.append(
                {
                    "id": block.get("id"),
                    "type": "function",
                    "function": {"name": block.get("name"), "arguments": orjson.dumps(block.get("input") or {}).decode()},
                }
            )
        # thinking and server-tool blocks have no place in a chat message
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts else None, "refusal": None}
    if calls:
        message["tool_calls"] = calls
    return {
        "id": msg.get("id"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": msg.get("model"),
        "choices": [
            {"index": 0, "message": message, "finish_reason": finish_reason(msg.get("stop_reason")) or "stop", "logprobs": None}
        ],
        "usage": chat_usage(msg.get("usage")),
    }


def completion_to_message(comp: dict[str, Any]) -> dict[str, Any]:
    """A Chat Completions response (its first choice) as an Anthropic Messages response."""
    choices = comp.get("choices") or [{}]
    choice = choices[0] if isinstance(choices[0], dict) else {}
    message = choice.get("message") or {}
    content: list[dict[str, Any]] = []
    text = message.get("content")
    if isinstance(text, list):  # some OpenAI-compatible servers answer in parts
        text = "".join(p.get("text", "") for p in text if isinstance(p, dict))
    if isinstance(text, str) and text:
        content.append({"type": "text", "text": text})
    refusal = message.get("refusal")
    if isinstance(refusal, str) and refusal:
        content.append({"type": "text", "text": refusal})
    for call in message.get("tool_calls") or ():
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict):
            continue
        content.append({"type": "tool_use", "id": call.get("id"), "name": fn.get("name"), "input": tool_input(fn.get("arguments"))})
    reason = stop_reason(choice.get("finish_reason")) or "end_turn"
    if isinstance(refusal, str) and refusal:
        reason = "refusal"
    return {
        "id": comp.get("id"),
        "type": "message",
        "role": "assistant",
        "model": comp.get("model"),
        "content": content,
        "stop_reason": reason,
        "stop_sequence": None,
        "usage": messages_usage(comp.get("usage")),
    }


def tool_input(arguments: Any) -> Any:
    """A tool call's JSON-string arguments as an Anthropic ``input`` object.

    A model can emit arguments that are not a JSON object; they are kept,
    wrapped, rather than silently lost.
    """
    if not isinstance(arguments, str) or not arguments:
        return {}
    try:
        parsed = orjson.loads(arguments)
    except orjson.JSONDecodeError:
        return {"_raw_arguments": arguments}
    return parsed if isinstance(parsed, dict) else {"_raw_arguments": arguments}
