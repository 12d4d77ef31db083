"""When is a stream complete?  An OpenAI stream that closes cleanly after a chunk with a
``finish_reason`` is whole even without ``data: [DONE]``; a stream without any terminal
event is cut (error event, partial record, breaker failure).

The gateway runs in database mode so that the usage record is read back from Postgres.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway.accounting.sse import StreamTap, finish_reason_set
from tests.conftest import TEST_KEY, gateway_toml
from tests.test_ledger_gateway import wait_rows

AV = {"anthropic-version": "2023-06-01"}
OAI = {"authorization": f"Bearer {TEST_KEY}"}
ANTH = {"x-api-key": TEST_KEY, **AV}
CHAT = {"model": "demo-gpt", "messages": [{"role": "user", "content": "hi"}], "stream": True}
MSG = {"model": "demo-claude", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}], "stream": True}

# A breaker that opens on the first failure: a wrongly counted failure shows on the next request.
TRIP_AT_ONE = """
    [upstreams.mock-openai.breaker]
    failure_threshold = 1
    cooldown_seconds = 60
    [upstreams.mock-anthropic.breaker]
    failure_threshold = 1
    cooldown_seconds = 60
    """


def toml(upstream: str, journal: Path) -> str:
    return gateway_toml(upstream, extra=f"""
        [accounting]
        journal_dir = "{journal}"
        flush_ms = 50
        """ + TRIP_AT_ONE)


def data_lines(raw: bytes) -> list[bytes]:
    return [line[5:].strip() for line in raw.split(b"\n") if line.startswith(b"data:")]


@pytest.mark.parametrize("opts", [{}, {"stream_options": {"include_usage": True}}], ids=["stripped", "asked"])
async def test_openai_stream_without_done_after_finish_reason_is_complete(
        make_gateway, mock_upstream, pg_env, tmp_path, opts):
    """No [DONE], but a finish_reason chunk then a clean close: relayed as is (no error event), the usage
    record is whole (not partial, the reported output tokens), and the breaker counts no failure: three
    such answers in a row on a breaker that opens at one failure all reach the same upstream."""
    text = toml(mock_upstream.base_url, tmp_path)
    assert "failure_threshold = 1" in text
    gw = await make_gateway(text)
    ids = []
    for _ in range(3):
        r = await gw.post("/v1/chat/completions", json={**CHAT, **opts}, headers={**OAI, "x-mock-no-done": "1"})
        raw = await r.read()
        assert 200 == r.status, raw
        data = data_lines(raw)
        assert b"[DONE]" not in data
        assert all(b'"error"' not in d for d in data), raw
        last = orjson.loads(data[-1])
        assert "stop" == last["choices"][0]["finish_reason"] if last["choices"] else "usage" in last
        ids.append(r.headers["x-request-id"])
    stats = await mock_upstream.stats()
    assert 3 == stats["streams_completed"]
    assert 3 == stats["requests"]
    got = await wait_rows(pg_env, 3)
    for rid in ids:
        row = got[rid]
        assert (False, 200, 5, None) == (row["partial"], row["status"], row["output_tokens"], row["error_kind"])
        assert row["input_tokens"] > 0


async def test_anthropic_stream_without_message_stop_is_cut(make_gateway, mock_upstream, pg_env, tmp_path):
    """Anthropic has no finish chunk that ends a stream: without message_stop it is cut, told as an error
    event, recorded partial, and counted against the breaker (the next request finds it open)."""
    gw = await make_gateway(toml(mock_upstream.base_url, tmp_path))
    r = await gw.post("/v1/messages", json=MSG, headers={**ANTH, "x-mock-no-done": "1"})
    raw = await r.read()
    assert 200 == r.status
    assert raw.rstrip().endswith(b"}")
    assert b"event: error" in raw
    assert b"message_stop" not in raw
    rid = r.headers["x-request-id"]
    r = await gw.post("/v1/messages", json=MSG, headers=ANTH)
    await r.read()
    assert 529 == r.status  # the only deployment's circuit is open
    row = (await wait_rows(pg_env, 2))[rid]
    assert (True, "upstream_error") == (row["partial"], row["error_kind"])


async def test_openai_stream_cut_before_finish_reason_is_still_cut(make_gateway, mock_upstream, pg_env, tmp_path):
    """A connection cut before any finish_reason is an incomplete answer: error event, partial record."""
    gw = await make_gateway(toml(mock_upstream.base_url, tmp_path))
    r = await gw.post("/v1/chat/completions", json={**CHAT, "max_tokens": 5},
                      headers={**OAI, "x-mock-no-done": "1", "x-mock-drop-after": "2"})
    raw = await r.read()
    assert 200 == r.status
    assert b'"error"' in data_lines(raw)[-1]
    row = (await wait_rows(pg_env, 1))[r.headers["x-request-id"]]
    assert row["partial"] is True


FINISH_TABLE = [
    (b'{"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}', True),
    (b'{"choices":[{"index":0,"delta":{},"finish_reason": "length"}]}', True),
    (b'{"choices":[{"index":0,"delta":{},"finish_reason" : "tool_calls"}]}', True),
    (b'{"choices":[{"index":0,"delta":{"content":"x"},"finish_reason":null}]}', False),
    (b'{"choices":[{"index":0,"delta":{"content":"x"}}]}', False),
    (b'{"choices":[{"index":0,"delta":{"content":"say \\"finish_reason\\":\\"stop\\""},"finish_reason":null}]}', False),
    (b'{"choices":[{"index":0,"finish_reason":null},{"index":1,"finish_reason":"stop"}]}', True),
    (b"", False),
]


@pytest.mark.parametrize(("payload", "expected"), FINISH_TABLE)
def test_finish_reason_set_table(payload: bytes, expected: bool) -> None:
    assert expected == finish_reason_set(payload)


def _chunks(*docs: dict[str, Any], done: bool = False) -> bytes:
    out = b"".join(b"data: " + orjson.dumps(d) + b"\n\n" for d in docs)
    return out + (b"data: [DONE]\n\n" if done else b"")


def test_tap_end_clean_needs_the_finish_chunk_last() -> None:
    """end_clean: complete after a finish chunk (a usage chunk may follow), not after a content chunk."""
    content = {"choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": None}]}
    finish = {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
    usage = {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}
    for strip in (False, True):
        tap = StreamTap("openai", strip_usage=strip)
        tap.feed(_chunks(content, finish, usage))
        tap.flush()
        assert tap.completed is False
        assert tap.end_clean() is True
        assert 2 == tap.output_estimate
        tap = StreamTap("openai", strip_usage=strip)
        tap.feed(_chunks(content, content))
        tap.flush()
        assert tap.end_clean() is False
        assert 2 == tap.output_estimate
    tap = StreamTap("openai")
    tap.feed(_chunks(content, finish))
    assert tap.end_clean() is True
    assert 2 == tap.output_estimate, "no usage reported: the deltas seen"
    # A finish chunk followed by a content chunk in the same read (or the next): not complete.
    for reads in ([_chunks(finish, content)], [_chunks(content, finish), _chunks(content)]):
        tap = StreamTap("openai")
        for read in reads:
            tap.feed(read)
        tap.flush()
        assert tap.end_clean() is False


def test_tap_end_clean_looks_past_comments_and_blank_reads() -> None:
    """A read without a data line (an SSE comment, a keep-alive) after the finish chunk does not hide
    it: the stream is still whole, whether the comment came in its own read or with the chunks, and
    whether the reads were large (several events) or one event each."""
    content = {"choices": [{"index": 0, "delta": {"content": "x" * 300}, "finish_reason": None}]}
    finish = {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
    ping = b": keep-alive\n\n"
    for strip in (False, True):
        for reads in (
            [_chunks(content, finish), ping],
            [_chunks(content), _chunks(finish), ping, ping],
            [_chunks(content, content, finish) + ping],
            [_chunks(content, finish) + ping + b": data: not a line\n\n"],
        ):
            tap = StreamTap("openai", strip_usage=strip)
            for read in reads:
                tap.feed(read)
            tap.flush()
            assert tap.end_clean() is True, reads
        tap = StreamTap("openai", strip_usage=strip)
        for read in (_chunks(finish, content), ping):
            tap.feed(read)
        tap.flush()
        assert tap.end_clean() is False
