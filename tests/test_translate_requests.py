"""Pure request/response translation between OpenAI Chat and Anthropic Messages (gateway/translate/).

Table tests pin each mapping; property tests check that a random valid
OpenAI request translated to Anthropic and back keeps its meaning, and that
response bodies survive the round trip.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.errors import ErrorKind, GatewayError
from gateway.translate.bodies import completion_to_message, message_to_completion
from gateway.translate.chat_to_messages import chat_to_messages
from gateway.translate.common import DEFAULT_MAX_TOKENS, Options
from gateway.translate.errors import error_body_for_anthropic, error_body_for_openai
from gateway.translate.messages_to_chat import messages_to_chat

PNG = "iVBORw0KGgo="


def to_anthropic(doc: dict[str, Any], **kw: Any) -> dict[str, Any]:
    return chat_to_messages({"model": "m", **doc}, Options(**kw))


def to_openai(doc: dict[str, Any], **kw: Any) -> dict[str, Any]:
    return messages_to_chat({"model": "m", "max_tokens": 100, **doc}, Options(**kw))


# ---------------------------------------------------------------- OpenAI -> Anthropic, table


@pytest.mark.parametrize(
    ("chat", "expected"),
    [
        pytest.param(
            {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]},
            {"system": "be brief", "messages": [{"role": "user", "content": "hi"}]},
            id="system-to-top-level",
        ),
        pytest.param(
            {"messages": [{"role": "developer", "content": [{"type": "text", "text": "a"}]}, {"role": "system", "content": "b"}, {"role": "user", "content": "hi"}]},
            {"system": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}], "messages": [{"role": "user", "content": "hi"}]},
            id="developer-and-system-as-blocks",
        ),
        pytest.param(
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "what is it?"}, {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}", "detail": "low"}}]}]},
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "what is it?"}, {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}}]}]},
            id="data-url-image-to-base64",
        ),
        pytest.param(
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x.test/cat.jpg"}}]}]},
            {"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "url", "url": "https://x.test/cat.jpg"}}]}]},
            id="https-image-to-url-source",
        ),
        pytest.param(
            {"messages": [
                {"role": "user", "content": "weather?"},
                {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get", "arguments": '{"city":"Paris"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
                {"role": "user", "content": "thanks"},
            ]},
            {"messages": [
                {"role": "user", "content": "weather?"},
                {"role": "assistant", "content": [{"type": "tool_use", "id": "call_1", "name": "get", "input": {"city": "Paris"}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_1", "content": "sunny"}, {"type": "text", "text": "thanks"}]},
            ]},
            id="tool-call-and-result-round",
        ),
        pytest.param(
            {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 77, "stop": "END", "temperature": 0.2, "top_p": 0.9, "user": "u-1", "stream": True},
            {"messages": [{"role": "user", "content": "x"}], "max_tokens": 77, "stop_sequences": ["END"], "temperature": 0.2, "top_p": 0.9, "metadata": {"user_id": "u-1"}, "stream": True},
            id="sampling-stop-user-stream",
        ),
        pytest.param(
            {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function": {"name": "f", "description": "d", "parameters": {"type": "object", "properties": {"a": {"type": "string"}}}}}], "tool_choice": "required", "parallel_tool_calls": False},
            {"messages": [{"role": "user", "content": "x"}], "tools": [{"name": "f", "description": "d", "input_schema": {"type": "object", "properties": {"a": {"type": "string"}}}}], "tool_choice": {"type": "any", "disable_parallel_tool_use": True}},
            id="tools-required-no-parallel",
        ),
        pytest.param(
            {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": {"type": "function", "function": {"name": "f"}}},
            {"messages": [{"role": "user", "content": "x"}], "tools": [{"name": "f", "input_schema": {"type": "object", "properties": {}}}], "tool_choice": {"type": "tool", "name": "f"}},
            id="named-tool-choice",
        ),
    ],
)
def test_openai_request_to_anthropic(chat: dict[str, Any], expected: dict[str, Any]) -> None:
    """Each OpenAI request field lands on its Anthropic equivalent."""
    expected = {"model": "m", "max_tokens": DEFAULT_MAX_TOKENS, **expected}
    assert expected == to_anthropic(chat)


def test_max_tokens_default_comes_from_the_route_options() -> None:
    assert 123 == to_anthropic({"messages": [{"role": "user", "content": "x"}]}, default_max_tokens=123)["max_tokens"]
    assert 9 == to_anthropic({"messages": [{"role": "user", "content": "x"}], "max_tokens": 9})["max_tokens"]


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"n": 2}, "n"),
        ({"logprobs": True}, "logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"logit_bias": {"1": 2}}, "logit_bias"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"seed": 1}, "seed"),
        ({"reasoning_effort": "high"}, "reasoning_effort"),
        ({"audio": {"voice": "x"}}, "audio"),
    ],
)
def test_openai_parameters_without_equivalent_are_refused_by_name_or_dropped(extra: dict[str, Any], param: str) -> None:
    doc = {"messages": [{"role": "user", "content": "x"}], **extra}
    with pytest.raises(GatewayError) as info:
        to_anthropic(doc)
    assert ErrorKind.INVALID_REQUEST is info.value.kind
    assert info.value.message.startswith(param + ":")
    opts = Options(drop_unsupported=True)
    out = chat_to_messages({"model": "m", **doc}, opts)
    assert [param] == opts.dropped
    assert param not in out


def test_harmless_openai_values_are_not_refused() -> None:
    out = to_anthropic({"messages": [{"role": "user", "content": "x"}], "n": 1, "logprobs": False, "response_format": {"type": "text"}, "store": False, "frequency_penalty": 0})
    assert {"model", "messages", "max_tokens"} == set(out)


def test_bad_tool_arguments_are_a_400_naming_the_field() -> None:
    doc = {"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "not json"}}]}]}
    with pytest.raises(GatewayError, match=r"messages\[0\]\.tool_calls\[0\]\.function\.arguments"):
        to_anthropic(doc)


# ---------------------------------------------------------------- Anthropic -> OpenAI, table


@pytest.mark.parametrize(
    ("msgs", "expected"),
    [
        pytest.param(
            {"system": "be brief", "messages": [{"role": "user", "content": "hi"}]},
            {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]},
            id="system-string",
        ),
        pytest.param(
            {"system": [{"type": "text", "text": "a", "cache_control": {"type": "ephemeral"}}], "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]},
            {"messages": [{"role": "system", "content": "a"}, {"role": "user", "content": "hi"}]},
            id="system-blocks-cache-control-ignored",
        ),
        pytest.param(
            {"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": PNG}}, {"type": "image", "source": {"type": "url", "url": "https://x.test/a.png"}}]}]},
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{PNG}"}}, {"type": "image_url", "image_url": {"url": "https://x.test/a.png"}}]}]},
            id="images",
        ),
        pytest.param(
            {"messages": [
                {"role": "user", "content": "weather?"},
                {"role": "assistant", "content": [{"type": "text", "text": "checking"}, {"type": "tool_use", "id": "toolu_1", "name": "get", "input": {"city": "Paris"}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "sunny"}]}, {"type": "text", "text": "and?"}]},
            ]},
            {"messages": [
                {"role": "user", "content": "weather?"},
                {"role": "assistant", "content": "checking", "tool_calls": [{"id": "toolu_1", "type": "function", "function": {"name": "get", "arguments": '{"city":"Paris"}'}}]},
                {"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"},
                {"role": "user", "content": "and?"},
            ]},
            id="tool-use-and-result",
        ),
        pytest.param(
            {"messages": [{"role": "user", "content": "x"}], "stop_sequences": ["a", "b"], "temperature": 0.5, "top_p": 0.8, "metadata": {"user_id": "u"}, "stream": True},
            {"messages": [{"role": "user", "content": "x"}], "stop": ["a", "b"], "temperature": 0.5, "top_p": 0.8, "user": "u", "stream": True, "stream_options": {"include_usage": True}},
            id="sampling-stop-user-stream-asks-usage",
        ),
        pytest.param(
            {"messages": [{"role": "user", "content": "x"}], "tools": [{"name": "f", "description": "d", "input_schema": {"type": "object"}}], "tool_choice": {"type": "any", "disable_parallel_tool_use": True}},
            {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function": {"name": "f", "description": "d", "parameters": {"type": "object"}}}], "tool_choice": "required", "parallel_tool_calls": False},
            id="tools-any",
        ),
    ],
)
def test_anthropic_request_to_openai(msgs: dict[str, Any], expected: dict[str, Any]) -> None:
    """Each Anthropic request field lands on its OpenAI equivalent."""
    assert {"model": "m", "max_completion_tokens": 100, **expected} == to_openai(msgs)


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"thinking": {"type": "enabled", "budget_tokens": 1024}}, "thinking"),
        ({"top_k": 5}, "top_k"),
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools[0]"),
        ({"container": "c"}, "container"),
        ({"messages": [{"role": "assistant", "content": [{"type": "thinking", "thinking": "...", "signature": "s"}]}]}, "messages[0].content[0]"),
    ],
)
def test_anthropic_parameters_without_equivalent_are_refused_by_name_or_dropped(extra: dict[str, Any], param: str) -> None:
    doc = {"messages": [{"role": "user", "content": "x"}], **extra}
    with pytest.raises(GatewayError) as info:
        to_openai(doc)
    assert info.value.message.startswith(param + ":")
    opts = Options(drop_unsupported=True)
    messages_to_chat({"model": "m", "max_tokens": 5, **doc}, opts)
    assert [param] == opts.dropped


# ---------------------------------------------------------------- responses, table


def test_anthropic_message_as_chat_completion() -> None:
    msg = {
        "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x",
        "content": [{"type": "text", "text": "Let me check."}, {"type": "tool_use", "id": "toolu_9", "name": "get", "input": {"city": "Paris"}}],
        "stop_reason": "tool_use", "stop_sequence": None,
        "usage": {"input_tokens": 10, "output_tokens": 5, "cache_read_input_tokens": 100, "cache_creation_input_tokens": 20},
    }
    comp = message_to_completion(msg)
    assert "msg_1" == comp["id"] and "claude-x" == comp["model"] and "chat.completion" == comp["object"]
    choice = comp["choices"][0]
    assert "tool_calls" == choice["finish_reason"]
    assert "Let me check." == choice["message"]["content"]
    assert [{"id": "toolu_9", "type": "function", "function": {"name": "get", "arguments": '{"city":"Paris"}'}}] == choice["message"]["tool_calls"]
    assert {"prompt_tokens": 130, "completion_tokens": 5, "total_tokens": 135, "prompt_tokens_details": {"cached_tokens": 100}} == comp["usage"]


@pytest.mark.parametrize(
    ("stop", "finish"),
    [("end_turn", "stop"), ("stop_sequence", "stop"), ("max_tokens", "length"), ("tool_use", "tool_calls"), ("refusal", "content_filter")],
)
def test_stop_reasons_map_to_finish_reasons(stop: str, finish: str) -> None:
    assert finish == message_to_completion({"content": [], "stop_reason": stop})["choices"][0]["finish_reason"]


@pytest.mark.parametrize(
    ("finish", "stop"), [("stop", "end_turn"), ("length", "max_tokens"), ("tool_calls", "tool_use"), ("content_filter", "refusal")]
)
def test_finish_reasons_map_to_stop_reasons(finish: str, stop: str) -> None:
    assert stop == completion_to_message({"choices": [{"message": {"content": "x"}, "finish_reason": finish}]})["stop_reason"]


def test_chat_completion_as_anthropic_message() -> None:
    comp = {
        "id": "chatcmpl-1", "object": "chat.completion", "model": "gpt-x",
        "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {"role": "assistant", "content": "ok", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a": [1, 2]}'}},
            {"id": "call_2", "type": "function", "function": {"name": "g", "arguments": "oops"}},
        ]}}],
        "usage": {"prompt_tokens": 50, "completion_tokens": 7, "total_tokens": 57, "prompt_tokens_details": {"cached_tokens": 30}},
    }
    msg = completion_to_message(comp)
    assert {
        "id": "chatcmpl-1", "type": "message", "role": "assistant", "model": "gpt-x",
        "content": [
            {"type": "text", "text": "ok"},
            {"type": "tool_use", "id": "call_1", "name": "f", "input": {"a": [1, 2]}},
            {"type": "tool_use", "id": "call_2", "name": "g", "input": {"_raw_arguments": "oops"}},
        ],
        "stop_reason": "tool_use", "stop_sequence": None,
        "usage": {"input_tokens": 20, "output_tokens": 7, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 30},
    } == msg


@pytest.mark.parametrize(
    ("status", "etype", "out_status", "otype", "code"),
    [
        (400, "invalid_request_error", 400, "invalid_request_error", "invalid_request"),
        (429, "rate_limit_error", 429, "rate_limit_error", "rate_limit_exceeded"),
        (529, "overloaded_error", 503, "server_error", "service_unavailable"),
        (500, "api_error", 500, "server_error", "upstream_error"),
    ],
)
def test_anthropic_errors_for_openai_clients(status: int, etype: str, out_status: int, otype: str, code: str) -> None:
    body = orjson.dumps({"type": "error", "error": {"type": etype, "message": "boom"}})
    got_status, got = error_body_for_openai(status, body)
    assert out_status == got_status
    assert {"error": {"message": "boom", "type": otype, "param": None, "code": code}} == orjson.loads(got)


@pytest.mark.parametrize(
    ("status", "out_status", "etype"),
    [(400, 400, "invalid_request_error"), (404, 404, "not_found_error"), (429, 429, "rate_limit_error"), (503, 529, "overloaded_error"), (500, 500, "api_error"), (502, 502, "api_error")],
)
def test_openai_errors_for_anthropic_clients(status: int, out_status: int, etype: str) -> None:
    body = orjson.dumps({"error": {"message": "boom", "type": "whatever", "param": None, "code": None}})
    got_status, got = error_body_for_anthropic(status, body)
    assert out_status == got_status
    assert {"type": "error", "error": {"type": etype, "message": "boom"}} == orjson.loads(got)


def test_context_length_errors_stay_recognisable_in_both_dialects() -> None:
    oai = orjson.dumps({"error": {"message": "too many tokens", "type": "invalid_request_error", "code": "context_length_exceeded"}})
    assert orjson.loads(error_body_for_anthropic(400, oai)[1])["error"]["message"].startswith("prompt is too long")
    ant = orjson.dumps({"type": "error", "error": {"type": "invalid_request_error", "message": "prompt is too long: 300000 tokens"}})
    assert "context_length_exceeded" == orjson.loads(error_body_for_openai(400, ant)[1])["error"]["code"]


def test_unparseable_upstream_error_still_gets_an_envelope() -> None:
    status, body = error_body_for_anthropic(502, b"<html>bad gateway</html>")
    assert (502, "api_error") == (status, orjson.loads(body)["error"]["type"])


# ---------------------------------------------------------------- property: round trip keeps meaning

text = st.text(min_size=1, max_size=12)
ident = st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True)
json_obj = st.dictionaries(ident, st.one_of(st.integers(-5, 5), text, st.booleans(), st.none()), max_size=3)
image = st.one_of(
    st.builds(lambda d: f"data:image/png;base64,{d}", st.from_regex(r"[A-Za-z0-9+/]{4,16}", fullmatch=True)),
    st.builds(lambda p: f"https://img.test/{p}.png", ident),
)
user_part = st.one_of(
    st.builds(lambda t: {"type": "text", "text": t}, text),
    st.builds(lambda u: {"type": "image_url", "image_url": {"url": u}}, image),
)
user_msg = st.builds(lambda c: {"role": "user", "content": c}, st.one_of(text, st.lists(user_part, min_size=1, max_size=3)))


@st.composite
def conversation(draw: st.DrawFn) -> list[dict[str, Any]]:
    msgs: list[dict[str, Any]] = []
    for i in range(draw(st.integers(0, 2))):
        role = draw(st.sampled_from(["system", "developer"]))
        msgs.append({"role": role, "content": draw(st.one_of(text, st.lists(st.builds(lambda t: {"type": "text", "text": t}, text), min_size=1, max_size=2)))})
    msgs.append(draw(user_msg))
    for turn in range(draw(st.integers(0, 3))):
        calls = [
            {"id": f"call_{turn}_{k}", "type": "function", "function": {"name": draw(ident), "arguments": orjson.dumps(draw(json_obj)).decode()}}
            for k in range(draw(st.integers(0, 2)))
        ]
        content = draw(st.one_of(st.none(), text)) if calls else draw(text)
        msgs.append({"role": "assistant", "content": content, **({"tool_calls": calls} if calls else {})})
        msgs.extend({"role": "tool", "tool_call_id": c["id"], "content": draw(text)} for c in calls)
        if not calls or draw(st.booleans()):
            msgs.append(draw(user_msg))
    return msgs


tool_def = st.builds(
    lambda n, d, props: {"type": "function", "function": {"name": n, "description": d, "parameters": {"type": "object", "properties": {p: {"type": "string"} for p in props}}}},
    ident, text, st.lists(ident, max_size=2),
)

openai_request = st.fixed_dictionaries(
    {"model": st.just("m"), "messages": conversation()},
    optional={
        "max_tokens": st.integers(1, 10_000),
        "temperature": st.floats(0, 1),
        "top_p": st.floats(0, 1),
        "stop": st.one_of(text, st.lists(text, min_size=1, max_size=3)),
        "user": text,
        "stream": st.booleans(),
        "tools": st.lists(tool_def, min_size=1, max_size=3, unique_by=lambda t: t["function"]["name"]),
        "tool_choice": st.sampled_from(["auto", "required", "none"]),
    },
)


def meaning(req: dict[str, Any]) -> dict[str, Any]:
    """What a Chat request asks for, independent of how it is spelled."""
    system: list[str] = []
    items: list[tuple[Any, ...]] = []
    for m in req["messages"]:
        c = m.get("content")
        parts = [{"type": "text", "text": c}] if isinstance(c, str) else (c or [])
        if m["role"] in ("system", "developer"):
            system += [p["text"] for p in parts if p["text"]]
            continue
        role = "user" if m["role"] == "tool" else m["role"]
        if m["role"] == "tool":
            items.append((role, "result", m["tool_call_id"], c))
            continue
        for p in parts:
            if p["type"] == "text" and p["text"]:
                items.append((role, "text", p["text"]))
            elif p["type"] == "image_url":
                items.append((role, "image", p["image_url"]["url"]))
        for call in m.get("tool_calls") or ():
            items.append((role, "call", call["id"], call["function"]["name"], orjson.loads(call["function"]["arguments"])))
    stop = req.get("stop")
    tools = req.get("tools") or []
    return {
        "system": system,
        "items": items,
        "max_tokens": req.get("max_completion_tokens", req.get("max_tokens", DEFAULT_MAX_TOKENS)),
        "temperature": req.get("temperature"),
        "top_p": req.get("top_p"),
        "stop": [stop] if isinstance(stop, str) else stop,
        "user": req.get("user"),
        "stream": bool(req.get("stream")),
        "tools": [(t["function"]["name"], t["function"].get("description"), t["function"].get("parameters")) for t in tools],
        "tool_choice": req.get("tool_choice") if tools else None,
    }


@settings(max_examples=300, deadline=None)
@given(openai_request)
def test_openai_request_to_anthropic_and_back_keeps_its_meaning(req: dict[str, Any]) -> None:
    anthropic = chat_to_messages(req, Options())
    orjson.dumps(anthropic)  # plain JSON all the way
    back = messages_to_chat(anthropic, Options())
    assert meaning(req) == meaning(back)


anthropic_message = st.fixed_dictionaries(
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
        "stop_reason": st.sampled_from(["end_turn", "max_tokens", "tool_use", "refusal"]),
        "usage": st.fixed_dictionaries(
            {"input_tokens": st.integers(0, 10**6), "output_tokens": st.integers(0, 10**5), "cache_read_input_tokens": st.integers(0, 10**6)}
        ),
    }
)


@settings(max_examples=200, deadline=None)
@given(anthropic_message)
def test_anthropic_response_to_openai_and_back_keeps_its_meaning(msg: dict[str, Any]) -> None:
    back = completion_to_message(message_to_completion(msg))
    texts = "".join(b["text"] for b in msg["content"] if b["type"] == "text")
    assert ([{"type": "text", "text": texts}] if texts else []) == [b for b in back["content"] if b["type"] == "text"]
    assert [b for b in msg["content"] if b["type"] == "tool_use"] == [b for b in back["content"] if b["type"] == "tool_use"]
    assert msg["stop_reason"] == back["stop_reason"]
    assert {**msg["usage"], "cache_creation_input_tokens": 0} == back["usage"]
