"""The client's headers made from the upstream's (gateway/proxy/streaming.py ``client_headers``).

The relay decides what to do with each of an upstream's fields once per set of
header names (a plan, kept on the client's HeadShape for those names in order),
not per answer.  An
upstream whose names change from one answer to the next must still get each
answer's own fields relayed, in order; the cache stays bounded whatever names
the upstream invents.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.providers.base import HOP_BY_HOP, UPSTREAM_ONLY
from gateway.proxy import streaming
from gateway.proxy.context import RequestContext
from gateway.upstream import client
from tests.conftest import TEST_KEY, GatewayFactory, gateway_toml

CHAT = {"model": "demo-gpt", "messages": [{"role": "user", "content": "hi"}]}
BODY = orjson.dumps({
    "id": "chatcmpl-1", "object": "chat.completion", "model": "demo-gpt",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
})
# Names the gateway relays from these answers (the rest are hop-by-hop, upstream-only or its own).
RELAYED = {"content-type", "x-custom", "x-other", "x-upstream-request-id", "cache-control"}


class RawUpstream:
    """An upstream that answers each request with the next head of a script, spelt exactly as given."""

    def __init__(self, heads: list[list[tuple[str, str]]]) -> None:
        self.heads = heads
        self.server: asyncio.Server | None = None
        self.url = ""

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while self.heads:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.decode("latin-1").split("\r\n"):
                    if line.lower().startswith("content-length:"):
                        length = int(line.split(":", 1)[1])
                await reader.readexactly(length)
                fields = "".join(f"{name}: {value}\r\n" for name, value in self.heads.pop(0))
                writer.write(f"HTTP/1.1 200 OK\r\n{fields}Content-Length: {len(BODY)}\r\n\r\n".encode() + BODY)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@pytest.fixture
async def raw_upstream() -> AsyncIterator[RawUpstream]:
    up = RawUpstream([])
    await up.start()
    yield up
    await up.close()


def _relayed(raw_headers: Any) -> list[tuple[str, str]]:
    pairs = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in raw_headers]
    return [(k, v) for k, v in pairs if k.lower() in RELAYED]


async def test_a_changed_header_set_between_answers_relays_each_answers_own(
    make_gateway: GatewayFactory, raw_upstream: RawUpstream
) -> None:
    first = [("Content-Type", "application/json"), ("X-Request-Id", "up-1"), ("Server", "nginx"),
             ("x-custom", "a")]
    second = [("Content-Type", "application/json"), ("x-custom", "b"), ("Set-Cookie", "s=1"), ("x-other", "c"),
              ("Connection", "keep-alive"), ("x-request-id", "up-2a"), ("X-REQUEST-ID", "up-2b")]
    third = [("x-custom", "d"), ("Content-Type", "application/json"), ("Cache-Control", "no-cache"),
             ("Alt-Svc", "h3")]
    fourth = [("Content-Type", "application/json"), ("X-Request-Id", "up-4"), ("Server", "nginx"),
              ("x-custom", "e")]  # the first answer's names again: its plan, cached
    raw_upstream.heads = [first, second, third, fourth]
    gateway = await make_gateway(gateway_toml(raw_upstream.url))
    seen = []
    for _ in range(4):
        r = await gateway.post("/v1/chat/completions", headers={"authorization": f"Bearer {TEST_KEY}"}, json=CHAT)
        assert 200 == r.status
        assert BODY == await r.read()
        assert 1 == len(r.headers.getall("x-request-id"))
        assert r.headers["x-request-id"].startswith("req_")
        assert "set-cookie" not in r.headers and "alt-svc" not in r.headers
        seen.append(_relayed(r.raw_headers))
    assert seen == [
        [("Content-Type", "application/json"), ("x-custom", "a"), ("x-upstream-request-id", "up-1")],
        [("Content-Type", "application/json"), ("x-custom", "b"), ("x-other", "c"),
         ("x-upstream-request-id", "up-2b")],  # the last of the upstream's ids, as before
        [("x-custom", "d"), ("Content-Type", "application/json"), ("Cache-Control", "no-cache")],
        [("Content-Type", "application/json"), ("x-custom", "e"), ("x-upstream-request-id", "up-4")],
    ]


# -- client_headers alone, against the rule it implements

_SKIP = HOP_BY_HOP | UPSTREAM_ONLY


def _expected(fields: list[tuple[str, str]], rid_header: str, ctx: RequestContext) -> list[tuple[str, str]]:
    """The rule, field by field: hop-by-hop and upstream-only fields dropped, the upstream's x-request-id
    (the last) kept as x-upstream-request-id for a provider that names its id so, the gateway's own after."""
    out = [(n, v) for n, v in fields if n.lower() not in _SKIP and n.lower() != "x-request-id"]
    rids = [v for n, v in fields if n.lower() == "x-request-id"]
    if rids and rid_header == "x-request-id":
        out.append(("x-upstream-request-id", rids[-1]))
    return out + [("x-request-id", ctx.request_id), ("x-gateway-upstream", ctx.upstream),
                  ("x-gateway-model", ctx.served_model), ("x-gateway-attempts", str(ctx.attempts))]


def _ctx() -> RequestContext:
    ctx = RequestContext.start_now()
    ctx.upstream, ctx.served_model, ctx.attempts = "up", "m", 1
    return ctx


NAMES = st.sampled_from(["Content-Type", "content-type", "X-Request-Id", "x-request-id", "Server", "Date",
                         "Connection", "Keep-Alive", "Set-Cookie", "x-custom", "X-Custom", "Server-Timing",
                         "request-id", "Transfer-Encoding", "Alt-Svc"])


def _answer(fields: list[tuple[str, str]]) -> Any:
    """A LeanResponse's header side, as the client makes it from a head with these fields."""
    head = ("HTTP/1.1 200 OK\r\n" + "".join(f"{n}: {v}\r\n" for n, v in fields) + "\r\n").encode("latin-1")
    parts, names, _ = client._headers(head)
    shape = client._SHAPES.get(names) or client._shape(names)
    return SimpleNamespace(parts=parts, shape=shape)


@settings(max_examples=300, deadline=None)
@given(answers=st.lists(st.lists(st.tuples(NAMES, st.sampled_from(["a", "b", ""])), max_size=8), max_size=6),
       rid_header=st.sampled_from(["x-request-id", "request-id"]))
def test_each_answer_gets_the_rules_headers_whatever_was_cached(
    answers: list[list[tuple[str, str]]], rid_header: str
) -> None:
    dep: Any = SimpleNamespace(provider=SimpleNamespace(request_id_header=rid_header))
    for fields in answers + answers:  # the second round: every plan from the cache
        ctx = _ctx()
        assert list(streaming.client_headers(dep, _answer(fields), ctx).items()) == _expected(fields, rid_header, ctx)


def test_a_full_shape_cache_starts_over_and_stays_right(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client, "_SHAPES", {})
    dep: Any = SimpleNamespace(provider=SimpleNamespace(request_id_header="x-request-id"))
    for i in range(3 * client.SHAPES_MAX):
        fields = [("Content-Type", "application/json"), (f"x-invented-{i % (2 * client.SHAPES_MAX)}", "v"),
                  ("X-Request-Id", "up"), ("Server", "s")]
        ctx = _ctx()
        assert list(streaming.client_headers(dep, _answer(fields), ctx).items()) == _expected(fields, "x-request-id",
                                                                                             ctx)
        assert len(client._SHAPES) <= client.SHAPES_MAX
