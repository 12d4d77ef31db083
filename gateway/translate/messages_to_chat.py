"""An Anthropic Messages request as an OpenAI Chat Completions request.

- ``system`` (string or text blocks) -> a leading ``system`` message.
- Content blocks: text; ``image`` (base64 -> data: URL, url -> URL);
  ``document`` with a base64 PDF -> a ``file`` part; ``tool_use`` ->
  assistant ``tool_calls`` (input as a JSON string); ``tool_result`` -> a
  ``tool`` message (text only; ``is_error`` has no equivalent and is
  ignored), placed before the rest of that user turn.
- ``cache_control`` is a caching hint (OpenAI caches on its own): ignored.
- ``max_tokens`` -> ``max_completion_tokens``, ``stop_sequences`` -> ``stop``,
  ``metadata.user_id`` -> ``user``, ``tools``/``tool_choice`` (with
  ``disable_parallel_tool_use`` -> ``parallel_tool_calls: false``).
- ``thinking``, ``top_k``, server tools, thinking blocks in the history and
  other parameters without an equivalent are refused by name unless the
  route drops them.
"""

from __future__ import annotations

from typing import Any

import orjson

from gateway.translate.common import Options, bad, data_url, text_of

_IGNORED = frozenset({"service_tier", "cache_control"})
_HANDLED = frozenset(
    {
        "model", "messages", "system", "max_tokens", "stream", "temperature", "top_p", "stop_sequences",
        "metadata", "tools", "tool_choice", "thinking", "top_k",
    }
)


def messages_to_chat(doc: dict[str, Any], opts: Options) -> dict[str, Any]:
    """Translate a parsed Messages request; raise GatewayError(400) on what cannot be."""
    out: dict[str, Any] = {"model": doc["model"]}
    messages: list[dict[str, Any]] = []
    system = doc.get("system")
    if isinstance(system, list) and len(system) > 1:
        text_of(system, "system")  # only text blocks
        messages.append({"role": "system", "content": [{"type": "text", "text": b["text"]} for b in system]})
    elif system is not None:
        text = text_of(system, "system")
        if text:
            messages.append({"role": "system", "content": text})
    raw = doc.get("messages")
    if not isinstance(raw, list):
        raise bad("messages", "must be a list.")
    for i, msg in enumerate(raw):
        if not isinstance(msg, dict):
            raise bad(f"messages[{i}]", "must be an object.")
        role = msg.get("role")
        if role == "user":
            messages.extend(_user(msg.get("content"), f"messages[{i}].content", opts))
        elif role == "assistant":
            messages.append(_assistant(msg.get("content"), f"messages[{i}].content", opts))
        else:
            raise bad(f"messages[{i}].role", "must be 'user' or 'assistant'.")
    out["messages"] = messages
    if doc.get("max_tokens") is not None:
        out["max_completion_tokens"] = doc["max_tokens"]
    for name in ("temperature", "top_p"):
        if doc.get(name) is not None:
            out[name] = doc[name]
    if doc.get("stop_sequences"):
        out["stop"] = list(doc["stop_sequences"])
    if doc.get("stream"):
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}  # the usage the Anthropic stream must end with
    meta = doc.get("metadata")
    if isinstance(meta, dict) and isinstance(meta.get("user_id"), str):
        out["user"] = meta["user_id"]
    _tools(doc, out, opts)
    _refusals(doc, opts)
    return out


def _refusals(doc: dict[str, Any], opts: Options) -> None:
    thinking = doc.get("thinking")
    if thinking is not None and not (isinstance(thinking, dict) and thinking.get("type") == "disabled"):
        opts.refuse("thinking")
    if doc.get("top_k") is not None:
        opts.refuse("top_k")
    for name in doc:
        if name not in _HANDLED and name not in _IGNORED and doc[name] is not None:
            opts.refuse(name)


def _blocks(content: Any, p: str) -> list[Any]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise bad(p, "must be a string or a list of content blocks.")
    return content


def _user(content: Any, p: str, opts: Options) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for j, block in enumerate(_blocks(content, p)):
        bp = f"{p}[{j}]"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            if not isinstance(block.get("text"), str):
                raise bad(bp + ".text", "must be a string.")
            parts.append({"type": "text", "text": block["text"]})
        elif kind == "image":
            parts.append({"type": "image_url", "image_url": {"url": _source_url(block.get("source"), bp + ".source")}})
        elif kind == "document":
            part = _document(block, bp, opts)
            if part is not None:
                parts.append(part)
        elif kind == "tool_result":
            if not isinstance(block.get("tool_use_id"), str):
                raise bad(bp + ".tool_use_id", "is required.")
            results.append(
                {"role": "tool", "tool_call_id": block["tool_use_id"], "content": _result_text(block.get("content"), bp, opts)}
            )
        else:
            opts.refuse(bp, f"the content block type {kind!r} has no equivalent")
    out = results
    if parts:
        if len(parts) == 1 and parts[0]["type"] == "text":
            out.append({"role": "user", "content": parts[0]["text"]})
        else:
            out.append({"role": "user", "content": parts})
    return out


def _source_url(source: Any, p: str) -> str:
    if isinstance(source, dict):
        if source.get("type") == "base64" and isinstance(source.get("data"), str):
            return data_url(str(source.get("media_type") or "image/png"), source["data"])
        if source.get("type") == "url" and isinstance(source.get("url"), str):
            return str(source["url"])
    raise bad(p, "must be a base64 or url source.")


def _document(block: dict[str, Any], p: str, opts: Options) -> dict[str, Any] | None:
    source = block.get("source")
    if (
        isinstance(source, dict) and source.get("type") == "base64"
        and source.get("media_type") == "application/pdf" and isinstance(source.get("data"), str)
    ):
        f: dict[str, Any] = {"file_data": data_url("application/pdf", source["data"])}
        if isinstance(block.get("title"), str):
            f["filename"] = block["title"]
        return {"type": "file", "file": f}
    opts.refuse(p, "only base64 PDF documents have an equivalent")
    return None


def _result_text(content: Any, p: str, opts: Options) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise bad(p + ".content", "must be a string or a list of blocks.")
    texts = []
    for k, part in enumerate(content):
        if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        else:
            opts.refuse(f"{p}.content[{k}]", "tool results other than text have no equivalent")
    return "".join(texts)


def _assistant(content: Any, p: str, opts: Options) -> dict[str, Any]:
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for j, block in enumerate(_blocks(content, p)):
        bp = f"{p}[{j}]"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif kind == "tool_use":
            if not isinstance(block.get("id"), str) or not isinstance(block.get("name"), str):
                raise bad(bp, "a tool_use block needs an id and a name.")
            args = orjson.dumps(block.get("input") if block.get("input") is not None else {}).decode()
            calls.append({"id": block["id"], "type": "function", "function": {"name": block["name"], "arguments": args}})
        else:
            opts.refuse(bp, f"the content block type {kind!r} has no equivalent")
    text: str | list[dict[str, str]] | None = None
    if len(texts) == 1:
        text = texts[0]
    elif texts:
        text = [{"type": "text", "text": t} for t in texts]
    msg: dict[str, Any] = {"role": "assistant", "content": text}
    if calls:
        msg["tool_calls"] = calls
    return msg


def _tools(doc: dict[str, Any], out: dict[str, Any], opts: Options) -> None:
    tools = doc.get("tools")
    if tools:
        if not isinstance(tools, list):
            raise bad("tools", "must be a list.")
        converted = []
        for i, tool in enumerate(tools):
            if not isinstance(tool, dict) or tool.get("type") not in (None, "custom") or "input_schema" not in tool:
                opts.refuse(f"tools[{i}]", "server tools have no equivalent")
                continue
            if not isinstance(tool.get("name"), str):
                raise bad(f"tools[{i}].name", "is required.")
            fn: dict[str, Any] = {"name": tool["name"]}
            if isinstance(tool.get("description"), str):
                fn["description"] = tool["description"]
            fn["parameters"] = tool["input_schema"]
            if tool.get("strict") is True:
                fn["strict"] = True
            converted.append({"type": "function", "function": fn})
        if converted:
            out["tools"] = converted
    choice = doc.get("tool_choice")
    if choice is None:
        return
    if not isinstance(choice, dict):
        raise bad("tool_choice", "must be an object.")
    kind = choice.get("type")
    if kind == "auto":
        mapped: Any = "auto"
    elif kind == "any":
        mapped = "required"
    elif kind == "none":
        mapped = "none"
    elif kind == "tool" and isinstance(choice.get("name"), str):
        mapped = {"type": "function", "function": {"name": choice["name"]}}
    else:
        opts.refuse("tool_choice", "this tool_choice has no equivalent")
        return
    if "tools" in out:  # both APIs refuse a tool_choice without tools
        out["tool_choice"] = mapped
        if choice.get("disable_parallel_tool_use") is True:
            out["parallel_tool_calls"] = False
