"""The pre-commit scanner (gateway/proxy/readahead.py): when has a stream's first content event arrived?
A table of streams, and the property that any split of the bytes gives the same verdict."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.proxy.readahead import FirstContent, Seen


def oai(delta: dict[str, object] | None = None, finish: str | None = None, **extra: object) -> bytes:
    doc = {"id": "c", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta or {},
                                                                        "finish_reason": finish}], **extra}
    return b"data: " + orjson.dumps(doc) + b"\n\n"


def ant(event: str, doc: dict[str, object]) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps({"type": event, **doc}) + b"\n\n"


START = ant("message_start", {"message": {"id": "m", "usage": {"input_tokens": 5, "output_tokens": 1}}})
BLOCK = ant("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}})
PING = ant("ping", {})
DELTA = ant("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": "hi"}})
ROLE = oai({"role": "assistant", "content": ""})

TABLE = [
    ("anthropic", START + BLOCK + PING, Seen.NOTHING),
    ("anthropic", START + BLOCK + PING + DELTA, Seen.CONTENT),
    ("anthropic", START + ant("message_delta", {"delta": {"stop_reason": "end_turn"}}), Seen.END),
    ("anthropic", START + b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error"}}\n\n', Seen.ERROR),
    ("anthropic", START + BLOCK + DELTA + b'event: error\ndata: {"type":"error"}\n\n', Seen.CONTENT),
    ("anthropic", b'data: {"type":"message_start"}\n\ndata: {"type":"content_block_delta"}\n\n', Seen.CONTENT),
    ("openai", ROLE, Seen.NOTHING),
    ("openai", ROLE + oai({"content": "Hello"}), Seen.CONTENT),
    ("openai", ROLE + oai({"content": "say \"content\":\"\" please"}), Seen.CONTENT),
    ("openai", ROLE + oai({"tool_calls": [{"index": 0, "id": "t", "function": {"name": "f"}}]}), Seen.CONTENT),
    ("openai", ROLE + oai({"reasoning_content": "thinking"}), Seen.CONTENT),
    ("openai", ROLE + oai({}, "stop"), Seen.CONTENT),
    ("openai", ROLE + b"data: [DONE]\n\n", Seen.END),
    ("openai", ROLE + b'data: {"error":{"message":"overloaded","type":"server_error"}}\n\n', Seen.ERROR),
    ("openai", ROLE + oai({"content": ""}) + b": keep-alive comment\n\n", Seen.NOTHING),
    ("openai", b'data: {"choices":[],"usage":{"prompt_tokens":3}}\n\n', Seen.NOTHING),
    ("other", b"data: {}\n\n", Seen.CONTENT),
]


@pytest.mark.parametrize(("dialect", "stream", "expected"), TABLE)
def test_first_content_table(dialect: str, stream: bytes, expected: Seen) -> None:
    assert expected == FirstContent(dialect).feed(stream)


def verdict(dialect: str, pieces: list[bytes]) -> Seen:
    scan = FirstContent(dialect)
    for p in pieces:
        seen = scan.feed(p)
        if seen is not Seen.NOTHING:
            return seen
    return Seen.NOTHING


@settings(max_examples=300, deadline=None)
@given(case=st.sampled_from([(d, s) for d, s, _ in TABLE if d != "other"]),
       cuts=st.lists(st.integers(0, 10**5), max_size=12))
def test_any_split_gives_the_same_verdict(case: tuple[str, bytes], cuts: list[int]) -> None:
    dialect, data = case
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    assert verdict(dialect, [data]) == verdict(dialect, [p for p in pieces if p])


def test_openai_content_keys_are_found_in_any_order_and_only_when_set() -> None:
    """A delta's content keys count only with a truthy value, wherever they sit in the delta."""
    assert Seen.NOTHING == FirstContent("openai").feed(oai({"refusal": None, "role": "assistant", "content": ""}))
    assert Seen.CONTENT == FirstContent("openai").feed(oai({"role": "assistant", "audio": {"id": "a"}}))
    assert Seen.END == FirstContent("openai").feed(b"data:  [DONE] \r\n")


def test_openai_a_line_without_its_line_end_is_not_scanned_yet() -> None:
    """Whole lines only: the scan decides once the line end of the content event has come."""
    scan = FirstContent("openai")
    event = oai({"content": "Hello"})
    assert Seen.NOTHING == scan.feed(event[: event.index(b"\n")])
    assert Seen.CONTENT == scan.feed(event[event.index(b"\n") :])
