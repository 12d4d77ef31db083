"""The mock upstream's tool use: call the first tool, then answer with its result.

When a request offers ``tools`` (and ``tool_choice`` is not "none") and its
last turn is not a tool result, the mock calls the first (or the named)
tool with arguments made from its JSON schema; when the last turn carries a
tool result, the answer quotes it ("tool said: ...").  That is enough for a
client to run the whole call -> result -> answer round trip offline.
"""

from __future__ import annotations

from typing import Any

import orjson


def _args_for(schema: Any) -> dict[str, Any]:
    props = schema.get("properties") if isinstance(schema, dict) else None
    out: dict[str, Any] = {}
    for name, spec in (props or {}).items():
        kind = spec.get("type") if isinstance(spec, dict) else None
        out[name] = {"integer": 1, "number": 1.5, "boolean": True, "array": [], "object": {}}.get(str(kind), f"mock-{name}")
    return out


def tool_call(body: dict[str, Any], dialect: str) -> tuple[str, dict[str, Any]] | None:
    """(tool name, arguments) the mock calls, or None for a text answer."""
    tools = body.get("tools")
    if not isinstance(tools, list) or not tools or tool_result(body, dialect) is not None:
        return None
    choice = body.get("tool_choice")
    if choice in ("none", {"type": "none"}):
        return None
    named = None
    if isinstance(choice, dict):
        named = choice.get("name") or (choice.get("function") or {}).get("name")
    for tool in tools:
        if not isinstance(tool, dict):
            continue
        if dialect == "anthropic":
            name, schema = tool.get("name"), tool.get("input_schema")
        else:
            fn = tool.get("function") or {}
            name, schema = fn.get("name") or tool.get("name"), fn.get("parameters") or tool.get("parameters")
        if isinstance(name, str) and (named is None or name == named):
            return name, _args_for(schema)
    return None


def tool_result(body: dict[str, Any], dialect: str) -> str | None:
    """The text of the tool result the last turn carries, if it carries one."""
    msgs = body.get("messages") or body.get("input")
    if not isinstance(msgs, list) or not msgs or not isinstance(msgs[-1], dict):
        return None
    last = msgs[-1]
    if dialect == "anthropic":
        content = last.get("content")
        for block in content if isinstance(content, list) else ():
            if isinstance(block, dict) and block.get("type") == "tool_result":
                c = block.get("content")
                if isinstance(c, list):
                    c = "".join(p.get("text", "") for p in c if isinstance(p, dict))
                return str(c or "")
        return None
    if last.get("role") == "tool":
        c = last.get("content")
        if isinstance(c, list):
            c = "".join(p.get("text", "") for p in c if isinstance(p, dict))
        return str(c or "")
    if last.get("type") == "function_call_output":  # Responses API input item
        return str(last.get("output") or "")
    return None


def reply_pieces(body: dict[str, Any], dialect: str, word: str, n: int) -> list[str]:
    """The text deltas of a text answer."""
    result = tool_result(body, dialect)
    if result is None:
        return [word] * n
    text = f"tool said: {result}"
    return [text[i : i + 8] for i in range(0, len(text), 8)] or [text]


def arguments_json(args: dict[str, Any]) -> str:
    return orjson.dumps(args).decode()


def argument_pieces(args: dict[str, Any]) -> list[str]:
    """The argument JSON in a few pieces, as providers stream it."""
    s = arguments_json(args)
    step = max(1, len(s) // 3)
    return [s[i : i + step] for i in range(0, len(s), step)]
