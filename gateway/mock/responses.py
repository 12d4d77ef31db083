"""The mock upstream's OpenAI Responses API (``POST /v1/responses``), JSON and SSE.

The same switches as the other endpoints (latency, chunks, status, drop,
stall, error-after, cache-read).  A stream is the Responses event sequence:
response.created, response.in_progress, output_item.added,
content_part.added, output_text.delta x N, output_text.done,
content_part.done, output_item.done, response.completed (with usage); a
request with ``tools`` gets a function_call item instead of text.
"""

from __future__ import annotations

import time
from typing import Any

import orjson
from aiohttp import web

from gateway.mock import upstream as mock
from gateway.mock.tools import argument_pieces, arguments_json, reply_pieces, tool_call


def _envelope(rid: str, model: str, body: dict[str, Any], status: str, output: list[Any], usage: Any) -> dict[str, Any]:
    return {
        "id": rid, "object": "response", "created_at": int(time.time()), "status": status, "model": model,
        "output": output, "usage": usage, "error": None, "incomplete_details": None,
        "instructions": body.get("instructions"), "metadata": {}, "parallel_tool_calls": True,
        "temperature": body.get("temperature", 1.0), "top_p": body.get("top_p", 1.0),
        "tool_choice": body.get("tool_choice", "auto"), "tools": body.get("tools") or [],
    }


async def responses(request: web.Request) -> web.StreamResponse:
    body, err = await mock._common(request, "openai")
    if err is not None:
        return err
    cfg = request.app[mock.CFG]
    n = int(mock._num(request, "x-mock-chunks", cfg.chunks))
    call = tool_call(body, "openai")
    pieces = argument_pieces(call[1]) if call else reply_pieces(body, "openai", mock.WORD, n)
    n = len(pieces)
    seq = request.app[mock.STATS]["requests"]
    rid, item_id = f"resp_mock{seq:08d}", f"msg_mock{seq:08d}"
    in_tok = mock._input_tokens(body)
    cached = int(mock._num(request, "x-mock-cache-read", 0))
    usage = {
        "input_tokens": in_tok + cached, "input_tokens_details": {"cached_tokens": cached},
        "output_tokens": n, "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": in_tok + cached + n,
    }
    if call:
        item: dict[str, Any] = {
            "type": "function_call", "id": "fc_mock" + rid[9:], "call_id": "call_mock" + rid[9:],
            "name": call[0], "arguments": arguments_json(call[1]), "status": "completed",
        }
    else:
        part = {"type": "output_text", "text": "".join(pieces), "annotations": [], "logprobs": []}
        item = {"type": "message", "id": item_id, "status": "completed", "role": "assistant", "content": [part]}
    headers = {"x-request-id": "req_mock_" + rid}
    if not body.get("stream"):
        return await mock._body(request, orjson.dumps(_envelope(rid, body["model"], body, "completed", [item], usage)), headers)
    counter = iter(range(1_000_000))

    def ev(kind: str, **doc: Any) -> bytes:
        return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps({"type": kind, "sequence_number": next(counter), **doc}) + b"\n\n"

    pending = _envelope(rid, body["model"], body, "in_progress", [], None)
    events = [ev("response.created", response=pending), ev("response.in_progress", response=pending)]
    if call:
        events.append(ev("response.output_item.added", output_index=0, item={**item, "arguments": "", "status": "in_progress"}))
        first = len(events)
        events += [ev("response.function_call_arguments.delta", item_id=item["id"], output_index=0, delta=p) for p in pieces]
        events.append(ev("response.function_call_arguments.done", item_id=item["id"], output_index=0, arguments=item["arguments"]))
    else:
        empty = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        events.append(ev("response.output_item.added", output_index=0, item={**item, "content": [], "status": "in_progress"}))
        events.append(ev("response.content_part.added", item_id=item_id, output_index=0, content_index=0, part=empty))
        first = len(events)
        events += [
            ev("response.output_text.delta", item_id=item_id, output_index=0, content_index=0, delta=p, logprobs=[])
            for p in pieces
        ]
        text = "".join(pieces)
        events.append(ev("response.output_text.done", item_id=item_id, output_index=0, content_index=0, text=text, logprobs=[]))
        events.append(ev("response.content_part.done", item_id=item_id, output_index=0, content_index=0, part=item["content"][0]))
    events.append(ev("response.output_item.done", output_index=0, item=item))
    if mock._sw(request, "x-mock-no-done") is None:
        events.append(ev("response.completed", response=_envelope(rid, body["model"], body, "completed", [item], usage)))
    return await mock._stream(request, events, first_delta=first, headers=headers)
