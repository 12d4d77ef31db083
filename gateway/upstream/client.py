"""A lean HTTP/1.1 client built for one job: POST a body to a provider, relay the answer.

What aiohttp's client does per call that a gateway does not need (cookie jars,
redirects, tracing signals, per-request connector bookkeeping, a task switch
per chunk) costs about three times the Python work of the call itself.  This
client keeps what the job needs:

* keep-alive pools per (scheme, host, port), bounded per upstream;
* llhttp (``httptools``, the C parser uvicorn uses) on an asyncio Protocol:
  the body is handed to the reader as it arrives, without a task per chunk;
* TLS through the loop (``ssl`` + ``server_hostname``);
* connect and total timeouts, as ``aiohttp.ClientTimeout`` names them
  (first-byte, first-token and idle timeouts stay with the caller);
* content-length, chunked and read-until-close bodies;
* the error classes aiohttp raises (``aiohttp.ClientConnectionError``,
  ``aiohttp.ClientPayloadError``, ``asyncio.TimeoutError``), so the one failure
  classifier sees no difference;
* the subset of ``aiohttp.ClientResponse`` the proxy uses: ``status``,
  ``headers``, ``content.readany()``, ``content.is_eof()``, ``read()``,
  ``release()``, ``close()``.

A request that fails on a reused connection before any byte of an answer came
back is sent once more on a new connection: the server closed an idle
connection as we wrote, so it never saw the request (Go's net/http does the same).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl as ssl_mod
from collections import deque
from collections.abc import Mapping
from typing import Any, cast

import aiohttp
import httptools
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

# Flow control: stop reading from the socket while this much is unread.
HIGH_WATER = 256 * 1024
MAX_HEADER_BYTES = 64 * 1024


class _Body:
    """The answer's body as the reader sees it: chunks in arrival order, then EOF or an error."""

    __slots__ = ("_chunks", "_conn", "_eof", "_exc", "_size", "_waiter")

    def __init__(self, conn: _Connection) -> None:
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self._eof = False
        self._exc: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._conn = conn

    # -- fed by the protocol
    def feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)
        if self._size > HIGH_WATER:
            self._conn.pause()
        self._wake()

    def feed_eof(self) -> None:
        self._eof = True
        self._wake()

    def set_exception(self, exc: BaseException) -> None:
        if not self._eof:
            self._exc = exc
        self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    # -- read by the proxy
    def is_eof(self) -> bool:
        return self._eof and not self._chunks

    async def readany(self) -> bytes:
        while not self._chunks:
            if self._eof:
                return b""
            if self._exc is not None:
                raise self._exc
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        data = self._chunks.popleft() if len(self._chunks) == 1 else b"".join(self._drain())
        self._size -= len(data)
        if self._size <= HIGH_WATER // 4:
            self._conn.resume()
        return data

    def _drain(self) -> list[bytes]:
        out = list(self._chunks)
        self._chunks.clear()
        return out

    async def read(self) -> bytes:
        parts: list[bytes] = []
        while True:
            chunk = await self.readany()
            if not chunk:
                return b"".join(parts)
            parts.append(chunk)


class _Connection(asyncio.Protocol):
    """One upstream connection: writes a request, parses its answer with llhttp."""

    __slots__ = ("_header_bytes", "_headers", "_loop", "_paused", "_pool", "_raw_headers", "_status_seen",
                 "_until_close", "body", "closed", "complete", "head_future", "keep_alive", "parser", "reused",
                 "transport")

    def __init__(self, pool: _Pool) -> None:
        self._pool = pool
        self._loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.complete = True  # no request in flight
        self.reused = False
        self._paused = False
        self.head_future: asyncio.Future[None] | None = None
        self.body: _Body | None = None
        self._raw_headers: list[tuple[str, str]] = []
        self._header_bytes = 0
        self._status_seen = False
        self._until_close = False
        self.keep_alive = False

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(aiohttp.ClientPayloadError("upstream switched protocols"))
        except httptools.HttpParserError as exc:
            self._fail(aiohttp.ClientPayloadError(f"malformed upstream response: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._pool.forget(self)
        if not self.complete and self._until_close and self.body is not None:
            # A body without content-length or chunking ends when the connection does.
            self.complete = True
            self.body.feed_eof()
        elif not self.complete:
            if self.head_future is not None and not self.head_future.done():
                self.head_future.set_exception(aiohttp.ServerDisconnectedError())
            elif self.body is not None:
                self.body.set_exception(aiohttp.ClientPayloadError("upstream connection closed mid-answer"))

    # -- httptools callbacks
    def on_status(self, status: bytes) -> None:
        self._status_seen = True

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value)
        if self._header_bytes > MAX_HEADER_BYTES:
            raise httptools.HttpParserError("response headers too large")
        self._raw_headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        names = {n.lower() for n, _ in self._raw_headers}
        status = self.parser.get_status_code()
        self._until_close = (
            "content-length" not in names and "transfer-encoding" not in names and status >= 200
            and status not in (204, 304)
        )
        fut = self.head_future
        if fut is not None and not fut.done():
            fut.set_result(None)

    def on_body(self, body: bytes) -> None:
        if self.body is not None:
            self.body.feed(body)

    def on_message_complete(self) -> None:
        self.keep_alive = self.parser.should_keep_alive()  # llhttp resets it once the message is done
        self.complete = True
        if self.body is not None:
            self.body.feed_eof()

    # -- used by the client
    def _fail(self, exc: BaseException) -> None:
        if self.head_future is not None and not self.head_future.done():
            self.head_future.set_exception(exc)
        elif self.body is not None:
            self.body.set_exception(exc)
        self.abort()

    def pause(self) -> None:
        if not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self._paused and self.transport is not None and not self.closed:
            self._paused = False
            self.transport.resume_reading()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def send(self, head: bytes, body: bytes) -> None:
        assert self.transport is not None
        self.complete = False
        self._status_seen = False
        self._raw_headers = []
        self._header_bytes = 0
        self.keep_alive = False
        self.body = _Body(self)
        self.head_future = self._loop.create_future()
        if len(body) < 16384:
            self.transport.write(head + body)
        else:
            self.transport.writelines((head, body))


class LeanResponse:
    """The part of ``aiohttp.ClientResponse`` the proxy reads."""

    __slots__ = ("_conn", "_done", "_timer", "content", "headers", "status")

    def __init__(self, conn: _Connection, timer: asyncio.TimerHandle | None) -> None:
        self._conn = conn
        self._timer = timer
        self._done = False
        self.status: int = conn.parser.get_status_code()
        self.headers: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict(conn._raw_headers))
        assert conn.body is not None
        self.content = conn.body

    async def read(self) -> bytes:
        try:
            return await self.content.read()
        finally:
            self.release()

    def release(self) -> None:
        """Done with the answer: the connection goes back to its pool if it is reusable."""
        if self._done:
            return
        self._done = True
        if self._timer is not None:
            self._timer.cancel()
        conn = self._conn
        if conn.complete and not conn.closed and conn.keep_alive and self.content.is_eof():
            conn._pool.put(conn)
        else:
            conn.abort()
            conn._pool.forget(conn)

    def close(self) -> None:
        """Abandon the answer: the connection is closed (the upstream stops generating)."""
        if self._done:
            return
        self._done = True
        if self._timer is not None:
            self._timer.cancel()
        self._conn.abort()
        self._conn._pool.forget(self._conn)


class _Pool:
    """Idle connections to one origin, and a bound on all of them."""

    __slots__ = ("_idle", "_live", "_sem", "host", "port", "ssl")

    def __init__(self, host: str, port: int, ssl: ssl_mod.SSLContext | None, limit: int) -> None:
        self.host, self.port, self.ssl = host, port, ssl
        self._idle: list[_Connection] = []
        self._live: set[_Connection] = set()
        self._sem = asyncio.Semaphore(limit) if limit > 0 else None

    def put(self, conn: _Connection) -> None:
        conn.reused = True
        conn.body = None
        conn.head_future = None
        self._idle.append(conn)

    def forget(self, conn: _Connection) -> None:
        if conn in self._live:
            self._live.discard(conn)
            if self._sem is not None:
                self._sem.release()
        with contextlib.suppress(ValueError):
            self._idle.remove(conn)

    async def acquire(self, connect_timeout: float | None, fresh: bool = False) -> _Connection:
        while self._idle and not fresh:
            conn = self._idle.pop()
            if not conn.closed and conn.transport is not None and not conn.transport.is_closing():
                return conn
        if self._sem is not None:
            await self._sem.acquire()
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: _Connection(self), self.host, self.port, ssl=self.ssl,
                    server_hostname=self.host if self.ssl is not None else None,
                )
        except TimeoutError:
            if self._sem is not None:
                self._sem.release()
            raise aiohttp.ServerTimeoutError(f"connect to {self.host}:{self.port} timed out") from None
        except OSError as exc:
            if self._sem is not None:
                self._sem.release()
            raise aiohttp.ClientConnectionError(f"cannot connect to {self.host}:{self.port}: {exc.strerror or exc}") from None
        self._live.add(conn)
        return conn

    def close(self) -> None:
        for conn in list(self._live):
            conn.abort()
        self._idle.clear()


class LeanSession:
    """A pool of pools; the one object the proxy keeps for all upstream calls."""

    def __init__(self, limit_per_host: int = 256, ssl_context: ssl_mod.SSLContext | None = None) -> None:
        self._pools: dict[tuple[str, str, int], _Pool] = {}
        self._limit = limit_per_host
        self._ssl = ssl_context
        self.closed = False

    def _pool(self, url: URL) -> _Pool:
        key = (url.scheme, url.raw_host or "", url.port or 0)
        pool = self._pools.get(key)
        if pool is None:
            ssl = None
            if url.scheme == "https":
                ssl = self._ssl or ssl_mod.create_default_context()
            pool = self._pools[key] = _Pool(key[1], key[2], ssl, self._limit)
        return pool

    async def request(self, method: str, url: URL, *, data: bytes = b"", headers: Mapping[str, str] | None = None,
                      timeout: aiohttp.ClientTimeout | None = None, **_: Any) -> LeanResponse:
        pool = self._pool(url)
        head = _head(method, url, headers or {}, len(data))
        connect_timeout = timeout.sock_connect if timeout is not None else None
        total = timeout.total if timeout is not None else None
        loop = asyncio.get_running_loop()
        for fresh in (False, True):
            conn = await pool.acquire(connect_timeout, fresh=fresh)
            timer = loop.call_later(total, _expire, conn) if total else None
            conn.send(head, data)
            try:
                assert conn.head_future is not None
                await conn.head_future
            except aiohttp.ServerDisconnectedError:
                if timer is not None:
                    timer.cancel()
                pool.forget(conn)
                if conn.reused and not fresh:
                    continue  # the server closed an idle connection as we wrote: it never saw this request
                raise
            except BaseException:
                if timer is not None:
                    timer.cancel()
                conn.abort()
                pool.forget(conn)
                raise
            return LeanResponse(conn, timer)
        raise aiohttp.ServerDisconnectedError()  # pragma: no cover - the loop returns or raises

    async def close(self) -> None:
        self.closed = True
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()


def _expire(conn: _Connection) -> None:
    conn._fail(TimeoutError())


def _head(method: str, url: URL, headers: Mapping[str, str], length: int) -> bytes:
    target = url.raw_path_qs or "/"
    host = url.raw_host or ""
    if url.port and not url.is_default_port():
        host = f"{host}:{url.port}"
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}"]
    for name, value in headers.items():
        if "\r" in value or "\n" in value or "\r" in name or "\n" in name:
            raise ValueError(f"header {name!r} contains a line break")
        n = name.lower()
        if n in ("host", "content-length", "transfer-encoding", "connection"):
            continue
        lines.append(f"{name}: {value}")
    lines.append(f"Content-Length: {length}")
    lines.append("")
    lines.append("")
    return "\r\n".join(lines).encode("latin-1")
