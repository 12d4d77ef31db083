"""Token usage read from upstream responses, normalised across dialects.

``input_tokens`` never includes cache reads or writes (Anthropic's meaning);
OpenAI's ``prompt_tokens`` includes its cached tokens, so they are split out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson


@dataclass(slots=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    cache_write_tokens: int = 0
    cache_read_tokens: int = 0
    found: bool = False  # the response reported usage at all

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens + self.cache_write_tokens + self.cache_read_tokens


def _int(d: Any, key: str) -> int:
    if d.__class__ is not dict:
        return 0
    v = d.get(key)
    # ``__class__ is int``: not a bool, not an int subclass; no builtin call on the hot path.
    return v if v.__class__ is int and v > 0 else 0


def apply_anthropic(usage: Usage, u: Any) -> None:
    """Apply an Anthropic usage object; later values replace earlier ones (cumulative).

    ``_int`` inlined (every answer and stream has one or two of these): a count is an exact
    int above 0, else 0."""
    if u.__class__ is not dict:
        return
    usage.found = True
    if "input_tokens" in u:
        v = u["input_tokens"]
        usage.input_tokens = v if v.__class__ is int and v > 0 else 0
    if "output_tokens" in u:
        v = u["output_tokens"]
        usage.output_tokens = v if v.__class__ is int and v > 0 else 0
    if "cache_creation_input_tokens" in u:
        v = u["cache_creation_input_tokens"]
        usage.cache_write_tokens = v if v.__class__ is int and v > 0 else 0
    if "cache_read_input_tokens" in u:
        v = u["cache_read_input_tokens"]
        usage.cache_read_tokens = v if v.__class__ is int and v > 0 else 0


def apply_openai(usage: Usage, u: Any) -> None:
    if u.__class__ is not dict:
        return
    usage.found = True
    if "prompt_tokens" not in u and "input_tokens" in u:
        apply_responses(usage, u)
        return
    prompt = u.get("prompt_tokens")
    if prompt.__class__ is not int or prompt < 0:
        prompt = 0
    details = u.get("prompt_tokens_details")
    cached = _int(details, "cached_tokens") if details is not None else 0
    if cached > prompt:
        cached = prompt
    usage.input_tokens = prompt - cached
    usage.cache_read_tokens = cached
    out = u.get("completion_tokens")
    usage.output_tokens = out if out.__class__ is int and out > 0 else 0


def apply_responses(usage: Usage, u: Any) -> None:
    """The Responses API's names: input_tokens includes input_tokens_details.cached_tokens."""
    if not isinstance(u, dict):
        return
    usage.found = True
    prompt = _int(u, "input_tokens")
    cached = min(_int(u.get("input_tokens_details"), "cached_tokens"), prompt)
    usage.input_tokens = prompt - cached
    usage.cache_read_tokens = cached
    usage.output_tokens = _int(u, "output_tokens")


def from_body(dialect: str, body: bytes) -> Usage:
    """Usage of a non-streamed JSON response (messages, chat, embeddings)."""
    usage = Usage()
    if b'"usage"' not in body:
        return usage
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return usage
    if doc.__class__ is not dict:  # orjson gives exact types
        return usage
    if dialect == "anthropic":
        apply_anthropic(usage, doc.get("usage"))
    else:
        apply_openai(usage, doc.get("usage"))
    return usage
