"""An OpenAI Chat Completions request as an Anthropic Messages request.

- ``system`` and ``developer`` messages, wherever they stand, become the
  top-level ``system`` (text blocks, in order).
- User content parts: text, ``image_url`` (data: URL -> base64 source, other
  URLs -> url source; ``detail`` is a hint with no equivalent and is
  ignored), ``file`` with PDF ``file_data`` -> a base64 ``document``.
- Assistant ``tool_calls`` -> ``tool_use`` blocks (arguments parsed from
  their JSON string); ``tool`` messages -> ``tool_result`` blocks of the next
  user turn.  Consecutive turns of one role are merged (Anthropic wants tool
  results first in the user turn that follows the call).
- ``max_tokens`` / ``max_completion_tokens`` -> ``max_tokens`` (required by
  Anthropic: the route's ``default_max_tokens`` when absent), ``stop`` ->
  ``stop_sequences``, ``temperature``/``top_p`` as is, ``user`` ->
  ``metadata.user_id``, ``tools``/``tool_choice``/``parallel_tool_calls``.
- Anything else with no Anthropic equivalent (``n`` > 1, ``logprobs``,
  penalties, ``response_format`` other than text, ...) is refused by name
  unless the route drops it.
"""

from __future__ import annotations

from typing import Any

import orjson

from gateway.translate.common import Options, bad, parse_data_url, text_of

# Accepted without effect: bookkeeping or hints that change nothing in the answer.
_IGNORED = frozenset({"store", "metadata", "prompt_cache_key", "safety_identifier", "stream_options", "service_tier"})
_HANDLED = frozenset(
    {
        "model", "messages", "stream", "max_tokens", "max_completion_tokens", "temperature", "top_p",
        "stop", "tools", "tool_choice", "parallel_tool_calls", "user", "n", "logprobs", "top_logprobs",
        "response_format", "frequency_penalty", "presence_penalty", "logit_bias", "seed",
    }
)


def chat_to_messages(doc: dict[str, Any], opts: Options) -> dict[str, Any]:
    """Translate a parsed Chat Completions request; raise GatewayError(400) on what cannot be."""
    out: dict[str, Any] = {"model": doc["model"]}
    system, messages = _messages(doc.get("messages"), opts)
    if len(system) == 1:
        out["system"] = system[0]["text"]
    elif system:
        out["system"] = system
    out["messages"] = messages
    max_tokens = doc.get("max_completion_tokens")
    if max_tokens is None:
        max_tokens = doc.get("max_tokens")
    out["max_tokens"] = max_tokens if max_tokens is not None else opts.default_max_tokens
    for name in ("temperature", "top_p"):
        if doc.get(name) is not None:
            out[name] = doc[name]
    stop = doc.get("stop")
    if stop is not None:
        out["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    if doc.get("stream"):
        out["stream"] = True
    user = doc.get("user")
    if isinstance(user, str) and user:
        out["metadata"] = {"user_id": user}
    _tools(doc, out, opts)
    _refusals(doc, opts)
    return out


def _refusals(doc: dict[str, Any], opts: Options) -> None:
    n = doc.get("n")
    if n is not None and n != 1:
        opts.refuse("n", "more than one choice has no equivalent")
    if doc.get("logprobs"):
        opts.refuse("logprobs")
    if doc.get("top_logprobs") is not None:
        opts.refuse("top_logprobs")
    fmt = doc.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        opts.refuse("response_format")
    for name in ("frequency_penalty", "presence_penalty"):
        if doc.get(name):
            opts.refuse(name)
    if doc.get("logit_bias"):
        opts.refuse("logit_bias")
    if doc.get("seed") is not None:
        opts.refuse("seed")
    for name in doc:
        if name not in _HANDLED and name not in _IGNORED and doc[name] is not None:
            opts.refuse(name)


# ---------------------------------------------------------------- messages


def _messages(raw: Any, opts: Options) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    if not isinstance(raw, list):
        raise bad("messages", "must be a list.")
    system: list[dict[str, Any]] = []
    turns: list[dict[str, Any]] = []  # {"role", "content": [blocks]}, merged by role

    def add(role: str, blocks: list[dict[str, Any]]) -> None:
        if not blocks:
            return
        if turns and turns[-1]["role"] == role:
            last = turns[-1]["content"]
            if role == "user" and blocks[0].get("type") == "tool_result":
                # Tool results lead the user turn that follows the call.
                n = sum(1 for b in last if b.get("type") == "tool_result")
                last[n:n] = blocks
            else:
                last.extend(blocks)
        else:
            turns.append({"role": role, "content": blocks})

    for i, msg in enumerate(raw):
        p = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise bad(p, "must be an object.")
        role = msg.get("role")
        content = msg.get("content")
        if role in ("system", "developer"):
            text_of(content, p + ".content")  # only text
            parts = [content] if isinstance(content, str) else [x["text"] for x in content or ()]
            system.extend({"type": "text", "text": t} for t in parts if t)
        elif role == "user":
            add("user", _user_blocks(content, p + ".content", opts))
        elif role == "assistant":
            add("assistant", _assistant_blocks(msg, p, opts))
        elif role == "tool":
            call_id = msg.get("tool_call_id")
            if not isinstance(call_id, str):
                raise bad(p + ".tool_call_id", "a tool message needs the id of the call it answers.")
            add("user", [{"type": "tool_result", "tool_use_id": call_id, "content": _tool_result(content, p + ".content")}])
        else:
            opts.refuse(f"{p}.role", f"the role {role!r} has no equivalent")
    return system, [_compact(t) for t in turns]


def _compact(turn: dict[str, Any]) -> dict[str, Any]:
    blocks = turn["content"]
    if len(blocks) == 1 and blocks[0].get("type") == "text" and "cache_control" not in blocks[0]:
        return {"role": turn["role"], "content": blocks[0]["text"]}
    return turn


def _user_blocks(content: Any, p: str, opts: Options) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    if not isinstance(content, list):
        raise bad(p, "must be a string or a list of content parts.")
    out: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        pp = f"{p}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise bad(pp + ".text", "must be a string.")
            if part["text"]:
                out.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            out.append(_image(part.get("image_url"), pp + ".image_url"))
        elif kind == "file":
            block = _file(part.get("file"), pp + ".file", opts)
            if block is not None:
                out.append(block)
        else:
            opts.refuse(pp, f"the content part type {kind!r} has no equivalent")
    return out


def _image(spec: Any, p: str) -> dict[str, Any]:
    url = spec.get("url") if isinstance(spec, dict) else None
    if not isinstance(url, str) or not url:
        raise bad(p + ".url", "an image part needs a url.")
    data = parse_data_url(url)
    if data is not None:
        return {"type": "image", "source": {"type": "base64", "media_type": data[0], "data": data[1]}}
    if url.startswith(("https://", "http://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    raise bad(p + ".url", "must be an http(s) URL or a base64 data: URL.")


def _file(spec: Any, p: str, opts: Options) -> dict[str, Any] | None:
    file_data = spec.get("file_data") if isinstance(spec, dict) else None
    data = parse_data_url(file_data) if isinstance(file_data, str) else None
    if data is None or data[0] != "application/pdf":
        opts.refuse(p, "only PDF files sent inline as file_data have an equivalent")
        return None
    block: dict[str, Any] = {"type": "document", "source": {"type": "base64", "media_type": data[0], "data": data[1]}}
    if isinstance(spec.get("filename"), str):
        block["title"] = spec["filename"]
    return block


def _assistant_blocks(msg: dict[str, Any], p: str, opts: Options) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    content = msg.get("content")
    if isinstance(content, list):
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                if part["text"]:
                    out.append({"type": "text", "text": part["text"]})
            elif kind == "refusal" and isinstance(part.get("refusal"), str):
                out.append({"type": "text", "text": part["refusal"]})
            else:
                raise bad(f"{p}.content[{j}]", "assistant content parts must be text or refusal.")
    elif isinstance(content, str):
        if content:
            out.append({"type": "text", "text": content})
    elif content is not None:
        raise bad(p + ".content", "must be a string, a list of parts or null.")
    if msg.get("function_call") is not None:
        opts.refuse(p + ".function_call", "the deprecated function_call has no equivalent (use tool_calls)")
    calls = msg.get("tool_calls")
    if calls is None:
        return out
    if not isinstance(calls, list):
        raise bad(p + ".tool_calls", "must be a list.")
    for k, call in enumerate(calls):
        cp = f"{p}.tool_calls[{k}]"
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not isinstance(call.get("id"), str):
            raise bad(cp, "a tool call needs an id and a function name.")
        args = fn.get("arguments") or "{}"
        try:
            parsed = orjson.loads(args) if isinstance(args, str) else None
        except orjson.JSONDecodeError:
            parsed = None
        if not isinstance(parsed, dict):
            raise bad(cp + ".function.arguments", "must be a JSON object encoded as a string.")
        out.append({"type": "tool_use", "id": call["id"], "name": fn["name"], "input": parsed})
    return out


def _tool_result(content: Any, p: str) -> str | list[dict[str, Any]]:
    if isinstance(content, str):
        return content
    return [{"type": "text", "text": text_of(content, p)}]


# ---------------------------------------------------------------- tools


def _tools(doc: dict[str, Any], out: dict[str, Any], opts: Options) -> None:
    tools = doc.get("tools")
    if tools:
        if not isinstance(tools, list):
            raise bad("tools", "must be a list.")
        converted = []
        for i, tool in enumerate(tools):
            fn = tool.get("function") if isinstance(tool, dict) else None
            if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict):
                opts.refuse(f"tools[{i}]", "only function tools have an equivalent")
                continue
            if not isinstance(fn.get("name"), str):
                raise bad(f"tools[{i}].function.name", "is required.")
            t: dict[str, Any] = {"name": fn["name"]}
            if isinstance(fn.get("description"), str):
                t["description"] = fn["description"]
            params = fn.get("parameters")
            t["input_schema"] = params if isinstance(params, dict) else {"type": "object", "properties": {}}
            if fn.get("strict") is True:
                t["strict"] = True
            converted.append(t)
        if converted:
            out["tools"] = converted
    choice = _tool_choice(doc.get("tool_choice"), opts)
    if doc.get("parallel_tool_calls") is False:
        choice = choice or {"type": "auto"}
        if choice["type"] != "none":
            choice["disable_parallel_tool_use"] = True
    if choice is not None and out.get("tools"):  # both APIs refuse a tool_choice without tools
        out["tool_choice"] = choice


def _tool_choice(choice: Any, opts: Options) -> dict[str, Any] | None:
    if choice is None:
        return None
    if choice == "auto":
        return {"type": "auto"}
    if choice == "required":
        return {"type": "any"}
    if choice == "none":
        return {"type": "none"}
    if isinstance(choice, dict) and choice.get("type") == "function":
        fn = choice.get("function")
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            return {"type": "tool", "name": fn["name"]}
    opts.refuse("tool_choice", "this tool_choice has no equivalent")
    return None
