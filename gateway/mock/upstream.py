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

STATS: web.AppKey[dict[str, int]] = web.AppKey("mock_stats")
SEEN: web.AppKey[collections.deque[dict[str, Any]]] = web.AppKey("mock_seen")
CFG: web.AppKey[MockUpstreamConfig] = web.AppKey("mock_cfg")

WORD = "lorem "


def _num(request: web.Request, name: str, default: float) -> float:
    v = request.headers.get(name)
    if v is None:
        return default
    try:
        return float(v)
    except ValueError:
        return default


async def _sleep_ms(ms: float) -> None:
    if ms > 0:
        await asyncio.sleep(ms / 1000.0)


def _error(dialect: str, status: int) -> web.Response:
    if dialect == "anthropic":
        etype = {429: "rate_limit_error", 529: "overloaded_error", 400: "invalid_request_error"}.get(status, "api_error")
        body = {"type": "error", "error": {"type": etype, "message": f"mock error {status}"}}
        headers = {"request-id": "req_mock_error"}
    else:
        body = {"error": {"message": f"mock error {status}", "type": "server_error", "param": None, "code": None}}
        headers = {"x-request-id": "req_mock_error"}
    if status == 429:
        headers["retry-after"] = "1"
    return web.json_response(body, status=status, headers=headers, dumps=lambda o: orjson.dumps(o).decode())


async def _body(request: web.Request, payload: bytes, headers: dict[str, str]) -> web.StreamResponse:
    """A JSON answer; with ``x-mock-drop-after`` the connection dies half-way through it,
    with ``x-mock-stall-after`` it stops sending half-way (and keeps the connection)."""
    stall = "x-mock-stall-after" in request.headers
    if "x-mock-gzip" in request.headers:  # a provider that compresses whatever was asked
        payload = gzip.compress(payload)
        headers = {**headers, "content-encoding": "gzip"}
    if not stall and "x-mock-drop-after" not in request.headers:
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
    seen = request.app[SEEN]
    seen.append({"path": request.path_qs, "raw_path": request.raw_path, "headers": {str(k).lower(): v for k, v in request.headers.items()}, "body": body, "ts": time.time()})
    cfg = request.app[CFG]
    try:
        await _sleep_ms(_num(request, "x-mock-latency-ms", cfg.latency_ms))
    except asyncio.CancelledError:
        stats["requests_cancelled"] += 1  # the caller went away before the answer
        raise
    status = int(_num(request, "x-mock-status", 0))
    if status:
        return body, _error(dialect, status)
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
    if not body.get("stream"):
        return await _body(
            request,
            orjson.dumps(
                {
                    "id": msg_id,
                    "type": "message",
                    "role": "assistant",
                    "model": model,
                    "content": [{"type": "text", "text": WORD * n}],
                    "stop_reason": "end_turn",
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
        ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ("ping", {"type": "ping"}),
    ]
    deltas = [
        ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": WORD}})
    ] * n
    tail = [
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        (
            "message_delta",
            {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None}, "usage": {"output_tokens": n}},
        ),
        ("message_stop", {"type": "message_stop"}),
    ]
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
    if not body.get("stream"):
        return await _body(
            request,
            orjson.dumps(
                {
                    "id": cid, "object": "chat.completion", "created": created, "model": model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": WORD * n}, "finish_reason": "stop"}],
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

    encoded = [chunk({"role": "assistant", "content": ""})]
    encoded += [chunk({"content": WORD})] * n
    encoded.append(chunk({}, "stop"))
    if include:
        encoded.append(b"data: " + orjson.dumps({**base, "choices": [], "usage": usage}) + b"\n\n")
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
        if gap <= 0 and drop_after < 0 and stall_after < 0 and error_after < 0:
            await resp.write(b"".join(events))
        else:
            for i, ev in enumerate(events):
                if i == drop_at:
                    stats["streams_dropped"] += 1
                    if "x-mock-drop-mid-event" in request.headers:
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
    app[SEEN] = collections.deque(maxlen=200)
    app.router.add_post("/v1/messages", messages)
    app.router.add_post("/v1/messages/count_tokens", count_tokens)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_get("/v1/models", openai_models)
    app.router.add_route("*", r"/_mock/status/{code:\d{3}}/{tail:.*}", fixed_status)
    app.router.add_get("/_mock/requests", seen)
    app.router.add_get("/_mock/stats", stats)
    app.router.add_post("/_mock/reset", reset)
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
