"""A fake Anthropic + OpenAI server for tests, demos and load tests.

Realistic bodies, usage and SSE sequences.  Behaviour is switched per request
by headers (which the gateway forwards when its server.forward_headers allows
``x-mock-*``, as the test configurations do) or for the
whole server by its config:

- ``x-mock-latency-ms``: delay before the response headers
- ``x-mock-ttft-ms``: delay before the first SSE event (streams)
- ``x-mock-chunk-gap-ms``: delay between SSE events
- ``x-mock-chunks``: number of content deltas in a stream
- ``x-mock-status``: answer with this error status in the provider's shape
- ``x-mock-drop-after``: drop the connection after N content events (streams),
  or half-way through the body (non-streamed answers)
  (with ``x-mock-drop-mid-event``, half-way through the next event)
- ``x-mock-stall-after``: stop sending (but keep the connection) after N events,
  or half-way through the body (non-streamed answers)
- ``x-mock-gzip``: gzip a non-streamed body whatever the request asked for
- ``x-mock-error-after``: send the provider's in-stream error event after N
  content events, then end the stream (no terminal success event)
- ``x-mock-cache-read`` / ``x-mock-cache-write``: cache tokens to report
- ``x-mock-no-done``: end a stream without its terminal event (OpenAI's
  ``data: [DONE]``, Anthropic's ``message_stop``), closing cleanly
- ``x-mock-retry-after`` / ``x-mock-retry-after-ms``: sent with an error status
- ``x-mock-error: context_length | content_filter``: with status 400, the
  provider's context-length or content-filter error body
- ``x-mock-reset``: reset the connection before answering
- ``x-mock-first-delta-ms``: send a stream's opening events (headers,
  ``message_start``, the role chunk, pings) at once, then wait this long
  before the first content event

Faults per server (several mocks in one test, each failing its own way):
``POST /_mock/faults`` with ``{"steps": [{switch: value, ...}, ...],
"then": {...}, "cycle": false}``: each data-plane request takes the next
step's switches (header names as above, e.g. ``{"x-mock-status": "503"}``;
``{}`` is a normal answer), then ``then`` for every later request (or the
steps again with ``"cycle": true``: a flapping upstream).  ``DELETE
/_mock/faults`` clears them.  A step overrides the request's own headers.

A request that offers ``tools`` gets a call of the first tool, one whose
last turn is a tool result gets "tool said: ..." (gateway/mock/tools.py);
``POST /v1/responses`` answers as the OpenAI Responses API (mock/responses.py).

``/_mock/status/{code}/...`` always answers ``code`` in the provider's shape
(point a deployment's base_url there to make it fail).  ``GET /_mock/requests`` returns the last requests seen (path, headers, body)
and ``GET /_mock/stats`` the counters; ``POST /_mock/reset`` clears both.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gzip
import time
from typing import Any

import orjson
from aiohttp import web

from gateway.config import MockUpstreamConfig
from gateway.mock.tools import argument_pieces, arguments_json, reply_pieces, tool_call

STATS: web.AppKey[dict[str, int]] = web.AppKey("mock_stats")
FAULTS: web.AppKey[dict[str, Any]] = web.AppKey("mock_faults")
STEP: web.RequestKey[dict[str, Any]] = web.RequestKey("mock_step")
SEEN: web.AppKey[collections.deque[dict[str, Any]]] = web.AppKey("mock_seen")
CFG: web.AppKey[MockUpstreamConfig] = web.AppKey("mock_cfg")

WORD = "lorem "


def _sw(request: web.Request, name: str) -> str | None:
    """A switch: the server's current fault step first, then the request's header."""
    step = request.get(STEP)
    if step is not None and name in step:
        v = step[name]
        return None if v is None else str(v)
    return request.headers.get(name)


def _num(request: web.Request, name: str, default: float) -> float:
    v = _sw(request, name)
    if v is None:
        return default
    try:
        return float(v)
    except ValueError:
        return default


async def _sleep_ms(ms: float) -> None:
    if ms > 0:
        await asyncio.sleep(ms / 1000.0)


# 400 bodies as the providers send them for a prompt over the context window / a content filter.
_KIND_400 = {
    ("anthropic", "context_length"): ("invalid_request_error", "prompt is too long: 250123 tokens > 200000 maximum", None),
    ("openai", "context_length"): (
        "invalid_request_error",
        "This model's maximum context length is 128000 tokens. However, your messages resulted in 250123 tokens.",
        "context_length_exceeded",
    ),
    ("anthropic", "content_filter"): ("invalid_request_error", "Output blocked by content filtering policy", None),
    ("openai", "content_filter"): (
        "invalid_request_error", "The response was filtered due to the prompt triggering the content management policy.",
        "content_filter",
    ),
}


def _error(dialect: str, status: int, request: web.Request | None = None) -> web.Response:
    kind = _sw(request, "x-mock-error") if request is not None else None
    special = _KIND_400.get((dialect, kind or "")) if status == 400 else None
    if dialect == "anthropic":
        etype = {429: "rate_limit_error", 529: "overloaded_error", 400: "invalid_request_error"}.get(status, "api_error")
        msg = special[1] if special else f"mock error {status}"
        body: dict[str, Any] = {"type": "error", "error": {"type": etype, "message": msg}}
        headers = {"request-id": "req_mock_error"}
    else:
        etype, msg, code = special if special else ("server_error", f"mock error {status}", None)
        body = {"error": {"message": msg, "type": etype, "param": "messages" if special else None, "code": code}}
        headers = {"x-request-id": "req_mock_error"}
    if status == 429:
        headers["retry-after"] = "1"
    if request is not None:
        for name in ("retry-after", "retry-after-ms"):
            v = _sw(request, "x-mock-" + name)
            if v is not None:
                headers[name] = v
    return web.json_response(body, status=status, headers=headers, dumps=lambda o: orjson.dumps(o).decode())


async def _body(request: web.Request, payload: bytes, headers: dict[str, str]) -> web.StreamResponse:
    """A JSON answer; with ``x-mock-drop-after`` the connection dies half-way through it,
    with ``x-mock-stall-after`` it stops sending half-way (and keeps the connection)."""
    stall = _sw(request, "x-mock-stall-after") is not None
    if _sw(request, "x-mock-gzip") is not None:  # a provider that compresses whatever was asked
        payload = gzip.compress(payload)
        headers = {**headers, "content-encoding": "gzip"}
    if not stall and _sw(request, "x-mock-drop-after") is None:
        return web.Response(body=payload, content_type="application/json", headers=headers)
    resp = web.StreamResponse(headers={"content-type": "application/json", **headers})
    resp.content_length = len(payload)
    await resp.prepare(request)
    await resp.write(payload[: len(payload) // 2])
    if stall:
        await asyncio.sleep(3600)
    request.app[STATS]["bodies_dropped"] += 1
    if request.transport is not None:
        request.transport.abort()
    return resp


def _input_tokens(body: dict[str, Any]) -> int:
    return max(1, len(orjson.dumps(body.get("messages") or body.get("input") or "")) // 4)


async def _common(request: web.Request, dialect: str) -> tuple[dict[str, Any], web.Response | None]:
    stats = request.app[STATS]
    stats["requests"] += 1
    raw = await request.read()
    try:
        body = orjson.loads(raw) if raw else {}
    except orjson.JSONDecodeError:
        body = {}
    step = _next_step(request.app)
    if step is not None:
        request[STEP] = step
        stats["fault_steps"] += 1
    seen = request.app[SEEN]
    seen.append({"path": request.path_qs, "raw_path": request.raw_path, "headers": {str(k).lower(): v for k, v in request.headers.items()}, "body": body, "ts": time.time()})
    cfg = request.app[CFG]
    try:
        await _sleep_ms(_num(request, "x-mock-latency-ms", cfg.latency_ms))
    except asyncio.CancelledError:
        stats["requests_cancelled"] += 1  # the caller went away before the answer
        raise
    if _sw(request, "x-mock-reset") is not None:
        stats["resets"] += 1
        if request.transport is not None:
            request.transport.abort()
        return body, web.Response(status=500)  # never reaches the (reset) client
    status = int(_num(request, "x-mock-status", 0))
    if status:
        stats[f"answered_{status}"] += 1
        return body, _error(dialect, status, request)
    if not isinstance(body, dict) or not body.get("model"):
        return body, _error(dialect, 400)
    return body, None


# ----------------------------------------------------------------- Anthropic


async def messages(request: web.Request) -> web.StreamResponse:
    body, err = await _common(request, "anthropic")
    if err is not None:
        return err
    cfg = request.app[CFG]
    model = body["model"]
    n = int(_num(request, "x-mock-chunks", cfg.chunks))
    in_tok = _input_tokens(body)
    cache_read = int(_num(request, "x-mock-cache-read", 0))
    cache_write = int(_num(request, "x-mock-cache-write", 0))
    usage_start = {
        "input_tokens": in_tok,
        "cache_creation_input_tokens": cache_write,
        "cache_read_input_tokens": cache_read,
        "output_tokens": 1,
    }
    msg_id = f"msg_mock{request.app[STATS]['requests']:08d}"
    call = tool_call(body, "anthropic")
    pieces = argument_pieces(call[1]) if call else reply_pieces(body, "anthropic", WORD, n)
    n = len(pieces)
    if call:
        block: dict[str, Any] = {"type": "tool_use", "id": "toolu_mock" + msg_id[8:], "name": call[0], "input": {}}
        delta_type, delta_key, stop = "input_json_delta", "partial_json", "tool_use"
    else:
        block = {"type": "text", "text": ""}
        delta_type, delta_key, stop = "text_delta", "text", "end_turn"
    if not body.get("stream"):
        return await _body(
            request,
            orjson.dumps(
                {
                    "id": msg_id,
                    "type": "message",
                    "role": "assistant",
                    "model": model,
                    "content": [{**block, "input": call[1]} if call else {"type": "text", "text": "".join(pieces)}],
                    "stop_reason": stop,
                    "stop_sequence": None,
                    "usage": {**usage_start, "output_tokens": n},
                }
            ),
            {"request-id": "req_mock_" + msg_id},
        )
    events: list[tuple[str, dict[str, Any]]] = [
        (
            "message_start",
            {
                "type": "message_start",
                "message": {
                    "id": msg_id, "type": "message", "role": "assistant", "model": model, "content": [],
                    "stop_reason": None, "stop_sequence": None, "usage": usage_start,
                },
            },
        ),
        ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": block}),
        ("ping", {"type": "ping"}),
    ]
    deltas = [
        ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": delta_type, delta_key: piece}})
        for piece in pieces
    ]
    tail = [
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        (
            "message_delta",
            {"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": None}, "usage": {"output_tokens": n}},
        ),
        ("message_stop", {"type": "message_stop"}),
    ]
    if _sw(request, "x-mock-no-done") is not None:
        tail.pop()
    encoded = [b"event: " + e.encode() + b"\ndata: " + orjson.dumps(d) + b"\n\n" for e, d in events + deltas + tail]
    return await _stream(request, encoded, first_delta=len(events), headers={"request-id": "req_mock_" + msg_id})


async def count_tokens(request: web.Request) -> web.StreamResponse:
    body, err = await _common(request, "anthropic")
    if err is not None:
        return err
    return web.Response(body=orjson.dumps({"input_tokens": _input_tokens(body)}), content_type="application/json")


async def anthropic_models(request: web.Request) -> web.Response:
    return web.json_response({"data": [{"type": "model", "id": "demo-claude"}], "has_more": False})


# ----------------------------------------------------------------- OpenAI


async def chat_completions(request: web.Request) -> web.StreamResponse:
    body, err = await _common(request, "openai")
    if err is not None:
        return err
    cfg = request.app[CFG]
    model = body["model"]
    n = int(_num(request, "x-mock-chunks", cfg.chunks))
    call = tool_call(body, "openai")
    pieces = argument_pieces(call[1]) if call else reply_pieces(body, "openai", WORD, n)
    n = len(pieces)
    in_tok = _input_tokens(body)
    cached = int(_num(request, "x-mock-cache-read", 0))
    usage = {
        "prompt_tokens": in_tok + cached,
        "completion_tokens": n,
        "total_tokens": in_tok + cached + n,
        "prompt_tokens_details": {"cached_tokens": cached},
    }
    cid = f"chatcmpl-mock{request.app[STATS]['requests']:08d}"
    created = int(time.time())
    call_id = "call_mock" + cid[13:]
    finish = "tool_calls" if call else "stop"
    message: dict[str, Any] = {"role": "assistant", "content": None if call else "".join(pieces)}
    if call:
        message["tool_calls"] = [{"id": call_id, "type": "function", "function": {"name": call[0], "arguments": arguments_json(call[1])}}]
    if not body.get("stream"):
        return await _body(
            request,
            orjson.dumps(
                {
                    "id": cid, "object": "chat.completion", "created": created, "model": model,
                    "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                    "usage": usage,
                }
            ),
            {"x-request-id": "req_mock_" + cid},
        )
    include = isinstance(body.get("stream_options"), dict) and body["stream_options"].get("include_usage") is True
    base = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model}
    extra = {"usage": None} if include else {}

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        doc = {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
        return b"data: " + orjson.dumps(doc) + b"\n\n"

    encoded = [chunk({"role": "assistant", "content": None if call else ""})]
    if call:
        head = {"index": 0, "id": call_id, "type": "function", "function": {"name": call[0], "arguments": ""}}
        encoded.append(chunk({"tool_calls": [head]}))
        encoded += [chunk({"tool_calls": [{"index": 0, "function": {"arguments": p}}]}) for p in pieces]
    else:
        encoded += [chunk({"content": p}) for p in pieces]
    encoded.append(chunk({}, finish))
    if include:
        encoded.append(b"data: " + orjson.dumps({**base, "choices": [], "usage": usage}) + b"\n\n")
    if _sw(request, "x-mock-no-done") is None:
        encoded.append(b"data: [DONE]\n\n")
    return await _stream(request, encoded, first_delta=1, headers={"x-request-id": "req_mock_" + cid})


async def embeddings(request: web.Request) -> web.StreamResponse:
    body, err = await _common(request, "openai")
    if err is not None:
        return err
    inputs = body.get("input")
    items = inputs if isinstance(inputs, list) else [inputs]
    tokens = _input_tokens(body)
    return web.Response(
        body=orjson.dumps(
            {
                "object": "list",
                "data": [{"object": "embedding", "index": i, "embedding": [0.001 * (i + 1)] * 8} for i in range(len(items))],
                "model": body["model"],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        ),
        content_type="application/json",
    )


async def openai_models(request: web.Request) -> web.Response:
    if "anthropic-version" in request.headers:
        return await anthropic_models(request)
    return web.json_response({"object": "list", "data": [{"id": "demo-gpt", "object": "model", "created": 0, "owned_by": "mock"}]})


# ----------------------------------------------------------------- streaming

# The in-stream error each provider sends when it fails mid-answer (index: is Anthropic).
_STREAM_ERROR = (
    b'data: {"error":{"message":"mock overloaded mid-stream","type":"server_error","param":null,"code":null}}\n\n',
    b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error","message":"mock overloaded mid-stream"}}\n\n',
)


async def _stream(
    request: web.Request, events: list[bytes], *, first_delta: int, headers: dict[str, str]
) -> web.StreamResponse:
    cfg = request.app[CFG]
    stats = request.app[STATS]
    ttft = _num(request, "x-mock-ttft-ms", cfg.ttft_ms)
    gap = _num(request, "x-mock-chunk-gap-ms", cfg.chunk_gap_ms)
    drop_after = int(_num(request, "x-mock-drop-after", -1))
    stall_after = int(_num(request, "x-mock-stall-after", -1))
    error_after = int(_num(request, "x-mock-error-after", -1))
    delta_wait = _num(request, "x-mock-first-delta-ms", 0)
    # -1 disables a switch; event i is content event i - first_delta.
    drop_at = first_delta + drop_after if drop_after >= 0 else -1
    stall_at = first_delta + stall_after if stall_after >= 0 else -1
    error_at = first_delta + error_after if error_after >= 0 else -1
    resp = web.StreamResponse(
        headers={"content-type": "text/event-stream; charset=utf-8", "cache-control": "no-cache", **headers}
    )
    await resp.prepare(request)
    stats["streams_started"] += 1
    try:
        await _sleep_ms(ttft)
        if delta_wait > 0:
            await resp.write(b"".join(events[:first_delta]))  # the opening events at once
            events = events[first_delta:]
            drop_at, stall_at, error_at = (x - first_delta if x >= 0 else x for x in (drop_at, stall_at, error_at))
            first_delta = 0
            await _sleep_ms(delta_wait)
        if gap <= 0 and drop_after < 0 and stall_after < 0 and error_after < 0:
            await resp.write(b"".join(events))
        else:
            for i, ev in enumerate(events):
                if i == drop_at:
                    stats["streams_dropped"] += 1
                    if _sw(request, "x-mock-drop-mid-event") is not None:
                        await resp.write(ev[: len(ev) // 2])  # cut inside the event's data line
                    if request.transport is not None:
                        request.transport.abort()
                    return resp
                if i == stall_at:
                    await asyncio.sleep(3600)
                if i == error_at:
                    stats["streams_errored"] += 1
                    await resp.write(_STREAM_ERROR[request.path.startswith("/v1/messages")])
                    break
                await resp.write(ev)
                if i >= first_delta:
                    await _sleep_ms(gap)
        await resp.write_eof()
        stats["streams_completed"] += 1
    except (asyncio.CancelledError, ConnectionResetError):
        stats["streams_cancelled"] += 1
        raise
    return resp


# ----------------------------------------------------------------- control


async def fixed_status(request: web.Request) -> web.Response:
    """``/_mock/status/{code}/v1/...``: an upstream that always fails (base_url of a bad deployment)."""
    tail = "/" + request.match_info["tail"]
    request.app[STATS]["requests"] += 1
    request.app[STATS][f"status_{request.match_info['code']}"] += 1
    request.app[SEEN].append({"path": request.path_qs, "headers": {str(k).lower(): v for k, v in request.headers.items()}, "body": None, "ts": time.time()})
    return _error("anthropic" if tail.startswith("/v1/messages") else "openai", int(request.match_info["code"]))



def _next_step(app: web.Application) -> dict[str, Any] | None:
    faults = app[FAULTS]
    steps: list[dict[str, Any]] = faults.get("steps") or []
    i = faults.get("i", 0)
    if i < len(steps):
        faults["i"] = i + 1
        if faults.get("cycle") and i + 1 == len(steps):
            faults["i"] = 0
        step: dict[str, Any] = steps[i]
        return step
    then = faults.get("then")
    return then if isinstance(then, dict) else None


async def set_faults(request: web.Request) -> web.Response:
    """``POST /_mock/faults``: switches for the next requests (see the module doc)."""
    doc = orjson.loads(await request.read() or b"{}")
    request.app[FAULTS].clear()
    request.app[FAULTS].update({"steps": list(doc.get("steps") or []), "then": doc.get("then"),
                                "cycle": bool(doc.get("cycle")), "i": 0})
    return web.Response(status=204)


async def clear_faults(request: web.Request) -> web.Response:
    request.app[FAULTS].clear()
    return web.Response(status=204)


async def seen(request: web.Request) -> web.Response:
    return web.Response(body=orjson.dumps(list(request.app[SEEN].copy())), content_type="application/json")


async def stats(request: web.Request) -> web.Response:
    return web.Response(body=orjson.dumps(request.app[STATS]), content_type="application/json")


async def reset(request: web.Request) -> web.Response:
    request.app[SEEN].clear()
    request.app[STATS].clear()
    return web.Response(status=204)


def create_mock_app(cfg: MockUpstreamConfig | None = None) -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[CFG] = cfg or MockUpstreamConfig()
    app[STATS] = collections.defaultdict(int)
    app[FAULTS] = {}
    app[SEEN] = collections.deque(maxlen=200)
    app.router.add_post("/v1/messages", messages)
    app.router.add_post("/v1/messages/count_tokens", count_tokens)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/embeddings", embeddings)
    from gateway.mock.responses import responses  # here: that module builds on this one

    app.router.add_post("/v1/responses", responses)
    app.router.add_get("/v1/models", openai_models)
    app.router.add_route("*", r"/_mock/status/{code:\d{3}}/{tail:.*}", fixed_status)
    app.router.add_get("/_mock/requests", seen)
    app.router.add_get("/_mock/stats", stats)
    app.router.add_post("/_mock/reset", reset)
    app.router.add_post("/_mock/faults", set_faults)
    app.router.add_delete("/_mock/faults", clear_faults)
    return app


def run(cfg: MockUpstreamConfig) -> None:
    import uvloop

    async def main() -> None:
        runner = web.AppRunner(create_mock_app(cfg), access_log=None, handler_cancellation=True)
        await runner.setup()
        site = web.TCPSite(runner, cfg.host, cfg.port, backlog=4096, reuse_address=True)
        await site.start()
        print(f'{{"event":"mock upstream listening","host":"{cfg.host}","port":{cfg.port}}}', flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        import signal

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        with contextlib.suppress(Exception):
            await runner.cleanup()

    uvloop.run(main())
