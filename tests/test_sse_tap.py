"""Property tests of the SSE usage tap (gateway/accounting/sse.py) and usage parsing.

The tap sees the stream in whatever pieces TCP hands over: any split of the
bytes (mid-line, mid-UTF-8 character, between \\r and \\n) must give the same
bytes to the client and the same usage as the stream in one piece.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.accounting.sse import StreamTap
from gateway.accounting.usage import Usage, apply_anthropic, apply_openai, from_body

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)
TOKENS = st.integers(min_value=0, max_value=10**7)
# Texts holding the names the tap looks for (its counted path must step aside for them).
WORDS = st.sampled_from(["error", "an error occurred", "message_start", "message_delta", "event: message_stop\n"])


@dataclass
class Stream:
    events: list[bytes]  # each a complete SSE event, blank line included
    usage: Usage  # what the tap must report
    completed: bool
    usage_event: int | None = None  # index of OpenAI's usage-only chunk


def event(lines: list[bytes], eols: list[bytes]) -> bytes:
    return b"".join(line + eol for line, eol in zip([*lines, b""], eols, strict=True))


@st.composite
def eol_for(draw: Any, n: int) -> list[bytes]:
    return draw(st.lists(st.sampled_from([b"\n", b"\r\n"]), min_size=n, max_size=n))


@st.composite
def anthropic_streams(draw: Any) -> Stream:
    start = {k: draw(TOKENS) for k in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")}
    start["output_tokens"] = draw(st.integers(0, 5))
    docs: list[tuple[str, dict[str, Any]]] = [
        ("message_start", {"type": "message_start", "message": {"id": "m", "role": "assistant", "usage": start}}),
        ("content_block_start", {"type": "content_block_start", "index": 0}),
    ]
    for text in draw(st.lists(TEXT | WORDS, max_size=8)):
        docs.append(("content_block_delta", {"type": "content_block_delta", "delta": {"type": "text_delta", "text": text}}))
        if draw(st.booleans()):
            docs.append(("ping", {"type": "ping"}))
    docs.append(("content_block_stop", {"type": "content_block_stop", "index": 0}))
    # message_delta usage is cumulative: each carries the running total (last wins).
    totals = sorted(draw(st.lists(TOKENS, max_size=3)))
    for total in totals:
        docs.append(("message_delta", {"type": "message_delta", "delta": {}, "usage": {"output_tokens": total}}))
    completed = draw(st.booleans())
    if completed:
        docs.append(("message_stop", {"type": "message_stop"}))
    lf_only = draw(st.booleans())  # as Anthropic sends them (the tap's counted path), or mixed line ends
    events = [
        event([b"event: " + name.encode(), b"data: " + orjson.dumps(doc)], [b"\n"] * 3 if lf_only else draw(eol_for(3)))
        for name, doc in docs
    ]
    usage = Usage(
        input_tokens=start["input_tokens"],
        output_tokens=totals[-1] if totals else start["output_tokens"],
        cache_write_tokens=start["cache_creation_input_tokens"],
        cache_read_tokens=start["cache_read_input_tokens"],
        found=True,
    )
    return Stream(events, usage, completed)


@st.composite
def openai_streams(draw: Any, *, with_usage: bool | None = None) -> Stream:
    include = draw(st.booleans()) if with_usage is None else with_usage
    base = {"id": "c", "object": "chat.completion.chunk", "model": "m"}
    extra = {"usage": None} if include else {}
    docs: list[dict[str, Any]] = [{**base, "choices": [{"index": 0, "delta": {"role": "assistant"}}], **extra}]
    docs += [
        {**base, "choices": [{"index": 0, "delta": {"content": t}}], **extra} for t in draw(st.lists(TEXT, max_size=8))
    ]
    docs.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], **extra})
    usage = Usage()
    usage_event = None
    if include:
        prompt, completion = draw(TOKENS), draw(TOKENS)
        cached = draw(st.integers(0, prompt))
        usage_event = len(docs)
        docs.append({**base, "choices": [], "usage": {
            "prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
        }})
        usage = Usage(input_tokens=prompt - cached, output_tokens=completion, cache_read_tokens=cached, found=True)
    lf_only = draw(st.booleans())  # as OpenAI sends them (the tap's counted paths), or mixed line ends
    events = [event([b"data: " + orjson.dumps(d)], [b"\n"] * 2 if lf_only else draw(eol_for(2))) for d in docs]
    completed = draw(st.booleans())
    if completed:
        events.append(event([b"data: [DONE]"], [b"\n"] * 2 if lf_only else draw(eol_for(2))))
    return Stream(events, usage, completed, usage_event)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


def run(dialect: str, chunks: list[bytes], strip: bool = False) -> tuple[bytes, StreamTap]:
    tap = StreamTap(dialect, strip_usage=strip)
    out = b"".join(tap.feed(c) for c in chunks if c) + tap.flush()
    return out, tap


def same_tap(a: StreamTap, b: StreamTap) -> None:
    assert a.usage == b.usage
    assert a.completed == b.completed
    assert a.deltas == b.deltas
    assert a.output_estimate == b.output_estimate


CUTS = st.lists(st.integers(min_value=0, max_value=10**6), max_size=40)


def run_push(dialect: str, chunks: list[bytes], strip: bool = False) -> tuple[list[bytes], bytes, StreamTap]:
    """Push mode: what each take() passes on (whole lines or events only), and the rest at the end."""
    tap = StreamTap(dialect, strip_usage=strip)
    take = tap.taker()
    passed = [take(c) for c in chunks if c]
    return passed, tap.rest(), tap


@SETTINGS
@given(stream=st.one_of(anthropic_streams(), openai_streams()), strip=st.booleans(), cuts=CUTS)
def test_push_mode_passes_whole_lines_and_reads_the_same_usage_for_any_split(stream, strip, cuts):
    """take() passes on only whole lines (whole events when stripping), the same bytes and usage as feed()."""
    dialect = "anthropic" if stream.events[0].startswith(b"event:") else "openai"
    strip = strip and dialect == "openai"
    data = b"".join(stream.events)
    chunks = split(data, cuts)
    passed, rest, tap = run_push(dialect, chunks, strip)
    fed, fed_tap = run(dialect, chunks, strip)
    assert fed == b"".join(passed) + rest
    for piece in passed:
        assert piece == b"" or piece.endswith(b"\n")
    same_tap(fed_tap, tap)
    assert stream.usage == tap.usage
    assert fed_tap.end_clean() == tap.end_clean()


@SETTINGS
@given(stream=anthropic_streams(), cuts=CUTS)
def test_anthropic_any_split_gives_same_bytes_and_usage(stream, cuts):
    data = b"".join(stream.events)
    out, tap = run("anthropic", split(data, cuts))
    whole_out, whole = run("anthropic", [data])
    assert data == out
    assert data == whole_out
    same_tap(whole, tap)
    assert stream.usage == tap.usage
    assert stream.completed == tap.completed


@SETTINGS
@given(stream=openai_streams(), cuts=CUTS)
def test_openai_any_split_gives_same_bytes_and_usage(stream, cuts):
    data = b"".join(stream.events)
    out, tap = run("openai", split(data, cuts))
    _, whole = run("openai", [data])
    assert data == out
    same_tap(whole, tap)
    assert stream.usage == tap.usage
    assert stream.completed == tap.completed


@SETTINGS
@given(stream=openai_streams(with_usage=True), cuts=CUTS)
def test_openai_strip_usage_removes_exactly_the_usage_chunk_for_any_split(stream, cuts):
    """With strip_usage the usage-only event is dropped whole, and every other byte passes unchanged."""
    data = b"".join(stream.events)
    expected = b"".join(e for i, e in enumerate(stream.events) if i != stream.usage_event)
    out, tap = run("openai", split(data, cuts), strip=True)
    assert expected == out
    assert stream.usage == tap.usage
    assert stream.completed == tap.completed


@SETTINGS
@given(stream=openai_streams(with_usage=False), cuts=CUTS)
def test_openai_strip_usage_without_a_usage_chunk_changes_nothing(stream, cuts):
    data = b"".join(stream.events)
    out, tap = run("openai", split(data, cuts), strip=True)
    assert data == out
    assert tap.usage.found is False


@SETTINGS
@given(stream=anthropic_streams(), cut=st.integers(min_value=0, max_value=10**6))
def test_a_cut_stream_reports_usage_so_far_and_is_not_completed(stream, cut):
    """A stream cut anywhere before message_stop is never 'completed'; usage is what arrived."""
    data = b"".join(stream.events)
    stop = data.find(b"event: message_stop")
    if stop < 0:
        stop = len(data)
    prefix = data[: cut % (stop + 1)]
    out, tap = run("anthropic", split(prefix, [cut // 3, cut // 2]))
    assert prefix == out
    assert tap.completed is False
    assert tap.output_estimate >= tap.usage.output_tokens


# ------------------------------------------------------------------ cumulative usage (Anthropic)


def test_anthropic_message_delta_usage_is_cumulative_last_wins():
    """Three message_delta events of 10, 25, 40 output tokens mean 40, not 75."""
    stream = (
        b'event: message_start\ndata: {"type":"message_start","message":{"usage":{"input_tokens":7,"output_tokens":1}}}\n\n'
        + b"".join(
            b'event: message_delta\ndata: {"type":"message_delta","usage":{"output_tokens":%d}}\n\n' % n
            for n in (10, 25, 40)
        )
        + b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
    )
    _, tap = run("anthropic", [stream])
    assert Usage(input_tokens=7, output_tokens=40, found=True) == tap.usage
    assert 40 == tap.output_estimate


def test_anthropic_message_delta_may_restate_input_tokens():
    """Newer APIs repeat input/cache counts in message_delta: they replace, never add."""
    stream = (
        b'event: message_start\ndata: {"message":{"usage":{"input_tokens":100,"cache_read_input_tokens":50,"output_tokens":1}}}\n\n'
        b'event: message_delta\ndata: {"usage":{"input_tokens":100,"cache_read_input_tokens":50,"output_tokens":9}}\n\n'
    )
    _, tap = run("anthropic", [stream])
    assert Usage(input_tokens=100, output_tokens=9, cache_read_tokens=50, found=True) == tap.usage


def test_upstream_error_event_is_noticed():
    _, tap = run("anthropic", [b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error"}}\n\n'])
    assert tap.errored is True
    assert tap.completed is False
    _, tap = run("openai", [b'data: {"error":{"message":"x","type":"server_error"}}\n\n'])
    assert tap.errored is True


@SETTINGS
@given(texts=st.lists(TEXT, max_size=12), crlf=st.booleans(), cuts=CUTS, stop_at=st.integers(0, 10**6))
def test_anthropic_deltas_are_the_content_events_seen_whatever_the_reads(texts, crlf, cuts, stop_at):
    """``deltas`` (a cut stream's output estimate) counts the content events that arrived, whether
    a read held only content events (counted in C) or also a usage, stop or error event (parsed line
    by line), with LF or CRLF line ends, whatever words the text holds ("error", "message_")."""
    eol = b"\r\n" if crlf else b"\n"
    events = [b"event: message_start" + eol + b'data: {"type":"message_start","message":{"usage":{"input_tokens":3}}}'
              + eol + eol]
    for text in texts:
        doc = orjson.dumps({"type": "content_block_delta", "delta": {"type": "text_delta", "text": text}})
        events.append(b"event: content_block_delta" + eol + b"data: " + doc + eol + eol)
    events.append(b"event: message_delta" + eol + b'data: {"type":"message_delta","usage":{"output_tokens":7}}'
                  + eol + eol)
    data = b"".join(events)
    out, tap = run("anthropic", split(data, cuts))
    assert out == data
    assert tap.deltas == len(texts)
    assert tap.usage == Usage(input_tokens=3, output_tokens=7, found=True)
    # Cut anywhere: the content events whose event line arrived are counted (a last line without
    # its line end too: the stream ended there).
    prefix = data[: stop_at % (len(data) + 1)]
    _, cut = run("anthropic", split(prefix, cuts))
    line = b"event: content_block_delta"
    assert cut.deltas == prefix.count(line + eol) + prefix.endswith((line, line + b"\r"))
    _, cut = run("anthropic", [prefix + b"x"])  # the same, the last line cut one byte later
    assert cut.deltas == prefix.count(line + eol)


@SETTINGS
@given(stream=openai_streams(), cuts=CUTS, stop_at=st.integers(0, 10**6))
def test_openai_any_split_reads_as_the_whole_stream(stream, cuts, stop_at):
    """Reads of content chunks only (counted in C) and the others (parsed line by line) give the
    same deltas, usage and end as the stream in one piece, cut anywhere or not, and the same bytes
    when the usage chunk is stripped."""
    data = b"".join(stream.events)
    prefix = data[: stop_at % (len(data) + 1)]
    for body in (data, prefix):
        for strip in (False, True):
            out, tap = run("openai", split(body, cuts), strip)
            whole_out, whole = run("openai", [body], strip)
            assert out == whole_out
            if not strip:
                assert out == body
            same_tap(tap, whole)
            assert tap.end_clean() == whole.end_clean()


# ------------------------------------------------------------------ usage.py


@given(
    inp=TOKENS, out=TOKENS, cw=TOKENS, cr=TOKENS,
)
@SETTINGS
def test_from_body_anthropic(inp, out, cw, cr):
    body = orjson.dumps({"type": "message", "usage": {
        "input_tokens": inp, "output_tokens": out, "cache_creation_input_tokens": cw, "cache_read_input_tokens": cr,
    }})
    assert Usage(inp, out, cw, cr, True) == from_body("anthropic", body)


@given(prompt=TOKENS, completion=TOKENS, cached=TOKENS)
@SETTINGS
def test_from_body_openai_splits_cached_tokens_out_of_prompt(prompt, completion, cached):
    body = orjson.dumps({"usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                                   "prompt_tokens_details": {"cached_tokens": cached}}})
    u = from_body("openai", body)
    assert min(cached, prompt) == u.cache_read_tokens
    assert prompt == u.input_tokens + u.cache_read_tokens
    assert completion == u.output_tokens
    assert prompt + completion == u.total_tokens


def test_embeddings_usage_has_no_completion_tokens():
    assert Usage(input_tokens=12, found=True) == from_body("openai", b'{"usage":{"prompt_tokens":12,"total_tokens":12}}')


def test_from_body_without_usage_or_with_garbage():
    for body in (b"", b"{}", b"not json", b'{"usage": "lots"}', b"[1]", b'"usage"'):
        assert Usage() == from_body("anthropic", body)


def test_usage_ignores_bools_negatives_and_non_ints():
    u = Usage()
    apply_anthropic(u, {"input_tokens": True, "output_tokens": -5, "cache_read_input_tokens": "3"})
    assert Usage(found=True) == u
    u = Usage()
    apply_openai(u, {"prompt_tokens": 1.5, "completion_tokens": None})
    assert Usage(found=True) == u


class _Transport:
    """Records what the tap writes (the client's transport, as far as the tap uses it)."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.frames.append(data)

    def writelines(self, parts: list[bytes]) -> None:
        self.frames.append(b"".join(parts))


class _Proto:
    """aiohttp's protocol as the tap reads it: paused or not, and its transport (None once lost)."""

    _paused = False
    transport: Any = None


class _Outlet:
    def __init__(self, chunked: bool) -> None:
        self.transport: Any = _Transport()
        self.proto: Any = _Proto()
        self.proto.transport = self.transport
        self.chunked = chunked
        self.sent = 0
        self.last = b""

    def gone(self) -> None:  # pragma: no cover - the transport never closes here
        raise AssertionError

    def slow(self) -> None:  # pragma: no cover - never paused here
        raise AssertionError


def unchunk(frame: bytes) -> bytes:
    size, _, rest = frame.partition(b"\r\n")
    assert rest.endswith(b"\r\n")
    body = rest[:-2]
    assert int(size, 16) == len(body)
    return body


@SETTINGS
@given(stream=st.one_of(anthropic_streams(), openai_streams()), strip=st.booleans(), chunked=st.booleans(), cuts=CUTS)
def test_push_mode_writes_to_its_outlet_exactly_what_it_passes_on(stream, strip, chunked, cuts):
    """With an outlet, take() writes each piece it passes on as one write (one chunked frame), counts the
    bytes and remembers the last piece; nothing empty is written, whatever the split."""
    dialect = "anthropic" if stream.events[0].startswith(b"event:") else "openai"
    strip = strip and dialect == "openai"
    chunks = split(b"".join(stream.events), cuts)
    expected, expected_rest, _ = run_push(dialect, chunks, strip)
    tap = StreamTap(dialect, strip_usage=strip)
    outlet = _Outlet(chunked)
    tap.outlet = outlet
    passed = [tap.take(c) for c in chunks if c]
    tap.outlet = None
    assert expected == passed
    assert expected_rest == tap.rest()
    written = [unchunk(f) if chunked else f for f in outlet.transport.frames]
    assert [p for p in passed if p] == written
    assert sum(len(p) for p in passed) == outlet.sent
    assert (written[-1] if written else b"") == outlet.last


@pytest.mark.parametrize("n", [1, 5, 30])
@pytest.mark.parametrize("usage_null", [False, True])
def test_openai_stream_in_one_read_strips_as_event_by_event(n: int, usage_null: bool) -> None:
    """A stream in one read (the tap's whole-read path, from 512 bytes) and the same stream an event a
    read give the same bytes to the client (the usage-only chunk dropped), usage, end and deltas;
    with include_usage's "usage":null in every content chunk too."""
    null = {"usage": None} if usage_null else {}
    chunks = [{"choices": [{"index": 0, "delta": {"content": f"word{i} "}, "finish_reason": None}], **null}
              for i in range(n)]
    chunks.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], **null})
    usage = {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": n}}
    events = [b"data: " + orjson.dumps(c) + b"\n\n" for c in [*chunks, usage]] + [b"data: [DONE]\n\n"]
    data = b"".join(events)
    whole_out, whole = run("openai", [data], strip=True)
    split_out, split = run("openai", events, strip=True)
    assert whole_out == split_out == data.replace(events[-2], b"")
    same_tap(whole, split)
    assert whole.usage == Usage(input_tokens=9, output_tokens=n, found=True)
    assert whole.completed and whole.end_clean()
    assert whole.deltas == n + 1  # the content chunks and the finish chunk


def test_push_mode_stops_once_the_client_connection_is_lost() -> None:
    """aiohttp clears its protocol's transport when the client's connection is lost: the tap then
    writes nothing more and tells its outlet (which stops reading the upstream)."""
    gone: list[bool] = []
    outlet = _Outlet(chunked=True)
    outlet.gone = lambda: gone.append(True)  # type: ignore[method-assign]
    tap = StreamTap("anthropic")
    tap.outlet = outlet  # type: ignore[assignment]
    event = b'event: content_block_delta\ndata: {"type":"content_block_delta"}\n\n'
    tap.take(event)
    assert len(outlet.transport.frames) == 1 and not gone
    outlet.proto.transport = None
    tap.take(event)
    tap._send(event)
    assert len(outlet.transport.frames) == 1
    assert gone == [True, True]
    assert tap.deltas == 2  # still counted: a cut stream's output estimate
