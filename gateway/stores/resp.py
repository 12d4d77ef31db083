"""A minimal pipelining Redis connection for the limiter's hot path.

One TCP connection per worker carries every request's script call:
commands are written as they come (the writes of one loop iteration go out
in one ``write``), replies are matched in order and parsed by hiredis.
Concurrent requests therefore share one connection and one syscall per
batch instead of a pooled connection each, which is what makes one Redis
round trip per request cheap in CPU (redis-py costs ~10x more per call).

Timeouts cost nothing per call: a watchdog checks the oldest pending reply;
when it is older than the timeout the connection is treated as hung and
closed, failing every pending call with TimeoutError at once.  Used for the
``single`` topology over plain TCP; Sentinel, Cluster and TLS use redis-py.

A caller that stops waiting (its task cancelled) cancels its reply future;
the reply still arrives in its turn and goes to the ``orphan`` handler given
with the command, if any (the limiter gives back what an abandoned ADMIT
reserved), at no cost to replies that are awaited.
"""

from __future__ import annotations

import asyncio
import collections
import typing
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote, urlsplit

import hiredis
from redis.exceptions import NoScriptError, ResponseError


def encode_parts(*args: object) -> bytes:
    """RESP bulk strings for ``args``, without the array header (callers cache constant parts)."""
    out = []
    for a in args:
        if isinstance(a, bytes):
            b = a
        elif isinstance(a, str):
            b = a.encode()
        else:
            b = b"%d" % a if isinstance(a, int) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


def _encode(args: tuple[object, ...]) -> bytes:
    return b"*%d\r\n" % len(args) + encode_parts(*args)


# Called with (its context, the reply) when a command's caller cancelled its wait before the reply came.
Orphan = tuple[Callable[[Any, object], None], Any]
_Pending = tuple[asyncio.Future[object], float, Orphan | None]
_ReplyError = hiredis.ReplyError


class _Protocol(asyncio.Protocol):
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.reader = hiredis.Reader()
        self.pending: collections.deque[_Pending] = collections.deque()
        self.transport: asyncio.Transport | None = None
        self.out: list[bytes] = []
        self.lost: BaseException | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = typing.cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        gets = self.reader.gets
        pending = self.pending
        while (reply := gets()) is not False:
            fut, _, orphan = pending.popleft()
            if reply.__class__ is _ReplyError:
                if not fut.done():
                    msg = str(reply)
                    fut.set_exception(NoScriptError(msg) if msg.startswith("NOSCRIPT") else ResponseError(msg))
                continue
            try:
                fut.set_result(reply)
            except asyncio.InvalidStateError:  # its caller stopped waiting (cancelled): rare, so no check per reply
                if orphan is not None:
                    orphan[0](orphan[1], reply)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost = exc or ConnectionResetError("redis closed the connection")
        self.transport = None
        self.fail(self.lost)

    def fail(self, exc: BaseException) -> None:
        while self.pending:
            fut = self.pending.popleft()[0]
            if not fut.done():
                fut.set_exception(type(exc)(*exc.args))

    def flush(self) -> None:
        data, self.out = b"".join(self.out), []
        if self.transport is not None and data:
            self.transport.write(data)


class PipelinedRedis:
    """``await call(*args)``: one command over the shared connection (reconnects lazily)."""

    def __init__(self, url: str, timeout: float) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 6379
        self.username = unquote(parts.username) if parts.username else None
        self.password = unquote(parts.password) if parts.password else None
        path = parts.path.strip("/")
        self.db = int(path) if path else 0
        self.timeout = timeout
        self._proto: _Protocol | None = None
        self._connecting: asyncio.Future[_Protocol] | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self._suspect: asyncio.Future[object] | None = None

    @staticmethod
    def supports(url: str) -> bool:
        return urlsplit(url).scheme == "redis"

    async def _connect(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self.timeout):
            _, proto = await loop.create_connection(lambda: _Protocol(loop), self.host, self.port)
            self._proto = proto
            if self.password is not None:
                auth = ("AUTH", self.username, self.password) if self.username else ("AUTH", self.password)
                await self._send(proto, auth)
            if self.db:
                await self._send(proto, ("SELECT", self.db))
        return proto

    async def _proto_ready(self) -> _Protocol:
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._connect())
        try:
            return await asyncio.shield(self._connecting)
        except BaseException:
            self._proto = None
            raise
        finally:
            if self._connecting is not None and self._connecting.done():
                self._connecting = None

    def _send(self, proto: _Protocol, args: tuple[object, ...]) -> asyncio.Future[object]:
        return self._send_raw(proto, _encode(args))

    def _send_raw(self, proto: _Protocol, command: bytes, orphan: Orphan | None = None) -> asyncio.Future[object]:
        fut: asyncio.Future[object] = proto.loop.create_future()
        if not proto.out:
            proto.loop.call_soon(proto.flush)
        proto.out.append(command)
        proto.pending.append((fut, proto.loop.time() + self.timeout, orphan))
        if self._watchdog is None:
            self._watchdog = proto.loop.call_later(self.timeout / 2, self._watch)
        return fut

    def _watch(self) -> None:
        self._watchdog = None
        proto = self._proto
        if proto is None or not proto.pending:
            self._suspect = None
            return
        oldest, deadline, _ = proto.pending[0]
        if deadline <= proto.loop.time():
            if oldest is self._suspect:
                # Still overdue after the loop polled I/O again: the connection (or Redis) is hung.
                self._suspect = None
                self._proto = None
                if proto.transport is not None:
                    proto.transport.abort()
                proto.fail(TimeoutError("redis did not answer in time"))
                return
            # A busy loop may not have read a reply that already arrived: look again after one more poll.
            self._suspect = oldest
            self._watchdog = proto.loop.call_later(0.005, self._watch)
            return
        self._watchdog = proto.loop.call_later(self.timeout / 2, self._watch)

    async def call(self, *args: object) -> object:
        proto = self._proto
        if proto is None or proto.transport is None:
            proto = await self._proto_ready()
        return await self._send(proto, args)

    async def call_encoded(self, count: int, parts: bytes) -> object:
        """A command of ``count`` arguments already encoded by ``encode_parts``."""
        return await (await self.send_encoded(count, parts))

    async def send_encoded(self, count: int, parts: bytes, orphan: Orphan | None = None) -> asyncio.Future[object]:
        """Send now; the returned future holds the reply (``orphan`` gets it if the future is cancelled first)."""
        proto = self._proto
        if proto is None or proto.transport is None:
            proto = await self._proto_ready()
        return self._send_raw(proto, b"*%d\r\n" % count + parts, orphan)

    def send_now(self, count: int, parts: bytes, orphan: Orphan | None = None) -> asyncio.Future[object] | None:
        """``send_encoded`` without waiting: None when not connected (the caller takes its async path)."""
        return self.send_command(b"*%d\r\n" % count + parts, orphan)

    def send_command(self, command: bytes, orphan: Orphan | None = None) -> asyncio.Future[object] | None:
        """A whole RESP command (array header included), sent with this loop pass's others; None when
        not connected.  ``_send_raw`` written out: this is the hot path's one call per request."""
        proto = self._proto
        if proto is None or proto.transport is None:
            return None
        loop = proto.loop
        fut: asyncio.Future[object] = loop.create_future()
        if not proto.out:
            loop.call_soon(proto.flush)
        proto.out.append(command)
        proto.pending.append((fut, loop.time() + self.timeout, orphan))
        if self._watchdog is None:
            self._watchdog = loop.call_later(self.timeout / 2, self._watch)
        return fut

    async def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        proto, self._proto = self._proto, None
        if proto is not None and proto.transport is not None:
            proto.transport.close()
