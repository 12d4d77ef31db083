"""Stream translators (gateway/translate/stream_to_*.py): event tables and properties.

The property tests build a whole upstream stream from a random answer, cut
its bytes at random places, feed the pieces one at a time and check that
what the client dialect's consumer reassembles equals the translated
non-streamed answer; a stream cut before its terminal event never yields
the client dialect's terminal event.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.translate.bodies import completion_to_message, message_to_completion
from gateway.translate.sse import SSEDecoder
from gateway.translate.stream_to_chat import AnthropicToChatStream
from gateway.translate.stream_to_messages import ChatToAnthropicStream


def ev(name: str, doc: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(doc) + b"\n\n"


def chunk(doc: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(doc) + b"\n\n"


def decode(data: bytes) -> list[tuple[str, Any]]:
    d = SSEDecoder()
    out = d.feed(data) + d.flush()
    return [(e.decode(), b"[DONE]" if p == b"[DONE]" else orjson.loads(p)) for e, p in out]


# ---------------------------------------------------------------- Anthropic -> OpenAI, table

START = ev("message_start", {"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x", "content": [], "stop_reason": None, "usage": {"input_tokens": 12, "output_tokens": 1, "cache_read_input_tokens": 3}}})


@pytest.mark.parametrize(
    ("upstream", "delta", "finish"),
    [
        (ev("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi"}}), {"content": "Hi"}, None),
        (ev("content_block_start", {"type": "content_block_start", "index": 1, "content_block": {"type": "tool_use", "id": "toolu_1", "name": "get", "input": {}}}),
         {"tool_calls": [{"index": 0, "id": "toolu_1", "type": "function", "function": {"name": "get", "arguments": ""}}]}, None),
        (ev("message_delta", {"type": "message_delta", "delta": {"stop_reason": "max_tokens"}, "usage": {"output_tokens": 9}}), {}, "length"),
    ],
)
def test_anthropic_event_as_chat_chunk(upstream: bytes, delta: dict[str, Any], finish: str | None) -> None:
    t = AnthropicToChatStream(include_usage=False)
    first = decode(t.feed(START))
    assert {"role": "assistant", "content": ""} == first[0][1]["choices"][0]["delta"]
    (_, doc), = decode(t.feed(upstream))
    assert "msg_1" == doc["id"] and "claude-x" == doc["model"] and "chat.completion.chunk" == doc["object"]
    assert delta == doc["choices"][0]["delta"]
    assert finish == doc["choices"][0]["finish_reason"]


def test_anthropic_input_json_delta_as_tool_call_arguments() -> None:
    t = AnthropicToChatStream(include_usage=False)
    t.feed(START)
    t.feed(ev("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}))
    t.feed(ev("content_block_start", {"type": "content_block_start", "index": 1, "content_block": {"type": "tool_use", "id": "toolu_1", "name": "get", "input": {}}}))
    (_, doc), = decode(t.feed(ev("content_block_delta", {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": '{"ci'}})))
    assert [{"index": 0, "function": {"arguments": '{"ci'}}] == doc["choices"][0]["delta"]["tool_calls"]


def test_message_stop_gives_usage_chunk_only_when_asked_then_done() -> None:
    for include, expected in ((True, 2), (False, 1)):
        t = AnthropicToChatStream(include_usage=include)
        t.feed(START)
        t.feed(ev("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 4}}))
        out = decode(t.feed(ev("message_stop", {"type": "message_stop"})))
        assert expected == len(out)
        assert ("", b"[DONE]") == out[-1]
        if include:
            assert {"prompt_tokens": 15, "completion_tokens": 4, "total_tokens": 19, "prompt_tokens_details": {"cached_tokens": 3}} == out[0][1]["usage"]
            assert [] == out[0][1]["choices"]


def test_anthropic_error_event_as_openai_stream_error() -> None:
    t = AnthropicToChatStream(include_usage=False)
    t.feed(START)
    (_, doc), = decode(t.feed(ev("error", {"type": "error", "error": {"type": "overloaded_error", "message": "busy"}})))
    assert {"error": {"message": "busy", "type": "server_error", "param": None, "code": "service_unavailable"}} == doc
    assert b"" == t.feed(ev("message_stop", {"type": "message_stop"})) + t.finish()  # nothing terminal after an error
    assert not t.done


# ---------------------------------------------------------------- OpenAI -> Anthropic, table

BASE = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "gpt-x"}


def choice(delta: dict[str, Any], finish: str | None = None) -> bytes:
    # OpenAI's own field order (the translator has a parse-free path for a plain text delta).
    return chunk({**BASE, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]})


def test_openai_chunks_as_anthropic_events() -> None:
    t = ChatToAnthropicStream()
    out = decode(t.feed(choice({"role": "assistant", "content": ""})))
    assert [("message_start", {"type": "message_start", "message": {"id": "chatcmpl-1", "type": "message", "role": "assistant", "model": "gpt-x", "content": [], "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 0, "output_tokens": 0}}})] == out
    out = decode(t.feed(choice({"content": "Hi"})))
    assert ["content_block_start", "content_block_delta"] == [e for e, _ in out]
    assert {"type": "text_delta", "text": "Hi"} == out[1][1]["delta"]
    out = decode(t.feed(choice({"tool_calls": [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "get", "arguments": ""}}]})))
    assert ["content_block_stop", "content_block_start"] == [e for e, _ in out]
    assert {"type": "tool_use", "id": "call_1", "name": "get", "input": {}} == out[1][1]["content_block"]
    assert 1 == out[1][1]["index"]
    out = decode(t.feed(choice({"tool_calls": [{"index": 0, "function": {"arguments": '{"a":1}'}}]})))
    assert [("content_block_delta", {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": '{"a":1}'}})] == out
    out = decode(t.feed(choice({}, "tool_calls")))
    assert [("content_block_stop", {"type": "content_block_stop", "index": 1})] == out
    usage = {"prompt_tokens": 40, "completion_tokens": 6, "total_tokens": 46, "prompt_tokens_details": {"cached_tokens": 10}}
    assert b"" == t.feed(chunk({**BASE, "choices": [], "usage": usage}))
    out = decode(t.feed(b"data: [DONE]\n\n"))
    assert [
        ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None}, "usage": {"input_tokens": 30, "output_tokens": 6, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 10}}),
        ("message_stop", {"type": "message_stop"}),
    ] == out
    assert t.done


def test_openai_stream_that_ends_after_finish_reason_without_done_is_ended_by_finish() -> None:
    t = ChatToAnthropicStream()
    t.feed(choice({"content": "x"}) + choice({}, "length"))
    assert ["message_delta", "message_stop"] == [e for e, _ in decode(t.finish())]


def test_openai_stream_cut_before_finish_gives_no_terminal_event() -> None:
    t = ChatToAnthropicStream()
    out = t.feed(choice({"content": "x"})) + t.finish()
    assert b"message_stop" not in out and not t.done


def test_openai_stream_error_as_anthropic_error_event() -> None:
    t = ChatToAnthropicStream()
    t.feed(choice({"content": "x"}))
    t.feed(choice({}, "stop"))
    out = decode(t.feed(chunk({"error": {"message": "overloaded", "type": "server_error"}})))
    assert [("error", {"type": "error", "error": {"type": "api_error", "message": "overloaded"}})] == out
    assert b"" == t.feed(b"data: [DONE]\n\n") + t.finish()  # nothing terminal after an error
    assert not t.done


# ---------------------------------------------------------------- properties

text = st.text(min_size=1, max_size=10)
ident = st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True)
json_obj = st.dictionaries(ident, st.one_of(st.integers(-5, 5), text, st.booleans()), max_size=3)


def pieces(s: str, cuts: list[int]) -> list[str]:
    points = sorted({c % (len(s) + 1) for c in cuts} | {0, len(s)})
    return [s[a:b] for a, b in zip(points, points[1:], strict=False) if s[a:b]] or [s]


def split_bytes(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:], strict=False)]


anthropic_answer = st.fixed_dictionaries(
    {
        "id": st.just("msg_1"),
        "model": ident,
        "content": st.lists(
            st.one_of(
                st.builds(lambda t: {"type": "text", "text": t}, text),
                st.builds(lambda i, n, a: {"type": "tool_use", "id": f"toolu_{i}", "name": n, "input": a}, st.integers(0, 99), ident, json_obj),
            ),
            max_size=4,
        ),
        "stop_reason": st.sampled_from(["end_turn", "max_tokens", "tool_use", "stop_sequence"]),
        "usage": st.fixed_dictionaries({"input_tokens": st.integers(0, 10**5), "output_tokens": st.integers(0, 10**4), "cache_read_input_tokens": st.integers(0, 10**5)}),
    }
)


def anthropic_stream(msg: dict[str, Any], cuts: list[int]) -> bytes:
    out = [ev("message_start", {"type": "message_start", "message": {**msg, "content": [], "stop_reason": None, "usage": {**msg["usage"], "output_tokens": 1}}}), ev("ping", {"type": "ping"})]
    for i, block in enumerate(msg["content"]):
        if block["type"] == "text":
            out.append(ev("content_block_start", {"type": "content_block_start", "index": i, "content_block": {"type": "text", "text": ""}}))
            out += [ev("content_block_delta", {"type": "content_block_delta", "index": i, "delta": {"type": "text_delta", "text": p}}) for p in pieces(block["text"], cuts)]
        else:
            out.append(ev("content_block_start", {"type": "content_block_start", "index": i, "content_block": {**block, "input": {}}}))
            args = orjson.dumps(block["input"]).decode()
            out += [ev("content_block_delta", {"type": "content_block_delta", "index": i, "delta": {"type": "input_json_delta", "partial_json": p}}) for p in pieces(args, cuts)]
        out.append(ev("content_block_stop", {"type": "content_block_stop", "index": i}))
    out.append(ev("message_delta", {"type": "message_delta", "delta": {"stop_reason": msg["stop_reason"], "stop_sequence": None}, "usage": {"output_tokens": msg["usage"]["output_tokens"]}}))
    out.append(ev("message_stop", {"type": "message_stop"}))
    return b"".join(out)


def assemble_chat(data: bytes) -> tuple[dict[str, Any], bool]:
    """What the OpenAI SDK's stream accumulator makes of a chat stream."""
    content = ""
    calls: dict[int, dict[str, Any]] = {}
    finish = None
    usage = None
    done = False
    for _, doc in decode(data):
        if doc == b"[DONE]":
            done = True
            continue
        assert "error" not in doc
        if doc.get("usage"):
            usage = doc["usage"]
        for c in doc["choices"]:
            d = c["delta"]
            content += d.get("content") or ""
            for tc in d.get("tool_calls") or ():
                slot = calls.setdefault(tc["index"], {"id": None, "type": "function", "function": {"name": "", "arguments": ""}})
                slot["id"] = tc.get("id") or slot["id"]
                fn = tc.get("function") or {}
                slot["function"]["name"] += fn.get("name") or ""
                slot["function"]["arguments"] += fn.get("arguments") or ""
            finish = c.get("finish_reason") or finish
    message: dict[str, Any] = {"role": "assistant", "content": content or None, "refusal": None}
    if calls:
        message["tool_calls"] = [calls[i] for i in sorted(calls)]
    return {"message": message, "finish_reason": finish, "usage": usage}, done


@settings(max_examples=200, deadline=None)
@given(anthropic_answer, st.lists(st.integers(0, 10_000), max_size=8))
def test_anthropic_stream_as_chat_stream_reassembles_to_the_translated_answer(msg: dict[str, Any], cuts: list[int]) -> None:
    upstream = anthropic_stream(msg, cuts)
    t = AnthropicToChatStream(include_usage=True)
    out = b"".join(t.feed(p) for p in split_bytes(upstream, cuts)) + t.finish()
    got, done = assemble_chat(out)
    want = message_to_completion(msg)
    assert done and t.done
    assert want["choices"][0]["message"] == got["message"]
    assert want["choices"][0]["finish_reason"] == got["finish_reason"]
    assert want["usage"] == got["usage"]


@settings(max_examples=100, deadline=None)
@given(anthropic_answer, st.lists(st.integers(0, 10_000), max_size=8), st.integers(0, 10_000))
def test_anthropic_stream_cut_anywhere_before_message_stop_never_sends_done(msg: dict[str, Any], cuts: list[int], at: int) -> None:
    upstream = anthropic_stream(msg, cuts)
    upstream = upstream[: at % upstream.rindex(b"event: message_stop")]
    t = AnthropicToChatStream(include_usage=True)
    out = b"".join(t.feed(p) for p in split_bytes(upstream, cuts))
    assert b"[DONE]" not in out and not t.done


openai_answer = st.fixed_dictionaries(
    {
        "content": st.one_of(st.none(), text),
        "calls": st.lists(st.tuples(ident, json_obj), max_size=3),
        "finish": st.sampled_from(["stop", "length", "tool_calls"]),
        "usage": st.fixed_dictionaries({"prompt_tokens": st.integers(100, 10**5), "completion_tokens": st.integers(0, 10**4), "cached": st.integers(0, 100)}),
    }
)


def openai_stream(a: dict[str, Any], cuts: list[int]) -> tuple[dict[str, Any], bytes]:
    u = a["usage"]
    usage = {"prompt_tokens": u["prompt_tokens"], "completion_tokens": u["completion_tokens"], "total_tokens": u["prompt_tokens"] + u["completion_tokens"], "prompt_tokens_details": {"cached_tokens": u["cached"]}}
    calls = [{"id": f"call_{i}", "type": "function", "function": {"name": n, "arguments": orjson.dumps(args).decode()}} for i, (n, args) in enumerate(a["calls"])]
    comp = {"id": "chatcmpl-1", "model": "gpt-x", "choices": [{"index": 0, "message": {"role": "assistant", "content": a["content"], **({"tool_calls": calls} if calls else {})}, "finish_reason": a["finish"]}], "usage": usage}
    out = [choice({"role": "assistant", "content": ""})]
    if a["content"]:
        out += [choice({"content": p}) for p in pieces(a["content"], cuts)]
    for i, c in enumerate(calls):
        out.append(choice({"tool_calls": [{"index": i, "id": c["id"], "type": "function", "function": {"name": c["function"]["name"], "arguments": ""}}]}))
        out += [choice({"tool_calls": [{"index": i, "function": {"arguments": p}}]}) for p in pieces(c["function"]["arguments"], cuts)]
    out.append(choice({}, a["finish"]))
    out.append(chunk({**BASE, "choices": [], "usage": usage}))
    out.append(b"data: [DONE]\n\n")
    return comp, b"".join(out)


def assemble_message(data: bytes) -> tuple[dict[str, Any], bool]:
    """What the Anthropic SDK's accumulator makes of a Messages stream."""
    msg: dict[str, Any] = {}
    json_buf: dict[int, str] = {}
    stopped = False
    open_blocks: set[int] = set()
    for name, doc in decode(data):
        assert name == doc["type"]
        if name == "message_start":
            msg = doc["message"]
        elif name == "content_block_start":
            assert doc["index"] == len(msg["content"])
            msg["content"].append(doc["content_block"])
            open_blocks.add(doc["index"])
        elif name == "content_block_delta":
            assert doc["index"] in open_blocks
            block = msg["content"][doc["index"]]
            if doc["delta"]["type"] == "text_delta":
                block["text"] += doc["delta"]["text"]
            else:
                json_buf[doc["index"]] = json_buf.get(doc["index"], "") + doc["delta"]["partial_json"]
                block["input"] = orjson.loads(json_buf[doc["index"]]) if _complete(json_buf[doc["index"]]) else block["input"]
        elif name == "content_block_stop":
            open_blocks.remove(doc["index"])
        elif name == "message_delta":
            msg["stop_reason"] = doc["delta"]["stop_reason"]
            msg["usage"].update(doc["usage"])
        elif name == "message_stop":
            stopped = True
            assert not open_blocks
    return msg, stopped


def _complete(s: str) -> bool:
    try:
        orjson.loads(s)
    except orjson.JSONDecodeError:
        return False
    return True


@settings(max_examples=200, deadline=None)
@given(openai_answer, st.lists(st.integers(0, 10_000), max_size=8))
def test_chat_stream_as_anthropic_stream_reassembles_to_the_translated_answer(a: dict[str, Any], cuts: list[int]) -> None:
    comp, upstream = openai_stream(a, cuts)
    t = ChatToAnthropicStream()
    out = b"".join(t.feed(p) for p in split_bytes(upstream, cuts)) + t.finish()
    got, stopped = assemble_message(out)
    want = completion_to_message(comp)
    assert stopped and t.done
    for key in ("id", "model", "content", "stop_reason", "usage"):
        assert want[key] == got[key], key


@settings(max_examples=100, deadline=None)
@given(openai_answer, st.lists(st.integers(0, 10_000), max_size=8), st.integers(0, 10_000))
def test_chat_stream_cut_before_its_finish_never_sends_message_stop(a: dict[str, Any], cuts: list[int], at: int) -> None:
    _, upstream = openai_stream(a, cuts)
    upstream = upstream[: at % upstream.rindex(b'"finish_reason":"')]
    t = ChatToAnthropicStream()
    out = b"".join(t.feed(p) for p in split_bytes(upstream, cuts)) + t.finish()
    assert b"message_stop" not in out and not t.done


@pytest.mark.parametrize("literal", [rb'"plain"', rb'"quote \" and backslash \\ and newline \n"', rb'"\u00e9\ud83d\ude00 caf\u00e9"', '"é 😀"'.encode()])
def test_a_plain_text_delta_crosses_as_its_json_string(literal: bytes) -> None:
    """The parse-free path copies the JSON string as sent: the Anthropic event decodes to the same text."""
    t = ChatToAnthropicStream()
    t.feed(choice({"role": "assistant", "content": ""}) + choice({"content": "x"}))
    raw = b'data: {"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":' + literal + b'},"logprobs":null,"finish_reason":null}]}\n\n'
    (name, doc), = decode(t.feed(raw))
    assert ("content_block_delta", {"type": "text_delta", "text": orjson.loads(literal)}) == (name, doc["delta"])
