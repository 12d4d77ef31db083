"""A lean HTTP/1.1 client built for one job: POST a body to a provider, relay the answer.

What aiohttp's client does per call that a gateway does not need (cookie jars,
redirects, per-request connector bookkeeping, a task switch per chunk, a
timer re-armed per read) costs about three times the Python work of the call
itself.  This client keeps what the job needs:

* keep-alive pools per (scheme, host, port), bounded per upstream; an idle
  connection is dropped after ``KEEPALIVE_S`` (aiohttp's keepalive_timeout);
* llhttp (``httptools``, the C parser uvicorn uses) on an asyncio Protocol:
  the body is handed to the reader as it arrives, without a task per chunk,
  or (push mode) to a synchronous sink, without any task switch per chunk;
* TLS through the loop (``ssl`` + ``server_hostname``);
* connect and total timeouts, as ``aiohttp.ClientTimeout`` names them, and a
  first-byte deadline (``head_timeout``) on the same timer: one ``call_at``
  per request, cancelled on release;
* content-length, chunked and read-until-close bodies;
* the error classes aiohttp raises (``aiohttp.ClientConnectionError``,
  ``aiohttp.ClientPayloadError``, ``asyncio.TimeoutError``), so the one failure
  classifier sees no difference;
* the subset of ``aiohttp.ClientResponse`` the proxy uses: ``status``,
  ``headers``, ``content.readany()``, ``content.read_nowait()``,
  ``content.is_eof()``, ``read()``, ``release()``, ``close()``;
* aiohttp's request trace signals (start, end, exception) when trace configs
  are given (tracing on); nothing at all otherwise.

A request that fails on a reused connection before any byte of an answer came
back is sent once more on a new connection: the server closed an idle
connection as we wrote, so it never saw the request (Go's net/http does the same).
"""

from __future__ import annotations

import asyncio
import itertools
import operator
import re
import ssl as ssl_mod
from collections.abc import Callable, Iterable, Mapping
from itertools import compress
from typing import Any, cast

import aiohttp
import httptools
from aiohttp.tracing import Trace
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

# Flow control: stop reading from the socket while this many chunks are unread
# (a chunk is one socket read, at most uvloop's 256 KiB).
HIGH_WATER_CHUNKS = 16
MAX_HEADER_BYTES = 64 * 1024
KEEPALIVE_S = 60.0  # an idle pooled connection older than this is closed, not reused


class LeanBody:
    """The answer's body as the reader sees it: chunks in arrival order, then EOF or an error.

    Pull mode: fed by ``_Connection.data_received`` directly (no method call per
    chunk); a reader waits on one future, woken by the first chunk, EOF or error.

    Push mode (``push``): each chunk goes to a synchronous sink as it arrives,
    without waking anyone; the owner waits (``wait``) on one future for the
    whole body, woken by EOF, an error (a stall included), or ``wake`` (the sink
    asking for attention: its client is slow, or gone).  With ``lines`` the
    connection holds back a read without a line end (b"\n") and hands it on
    with the next read that has one: a line-oriented sink (SSE) is called only
    when it has a whole line to pass on; ``held`` gives what is left at the end.
    """

    __slots__ = ("_chunks", "_conn", "_eof", "_exc", "_waiter")

    def __init__(self, conn: _Connection) -> None:
        self._chunks: list[bytes] = []
        self._eof = False
        self._exc: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._conn = conn

    # -- fed by the protocol
    def feed_eof(self) -> None:
        self._eof = True
        self._wake()

    def set_exception(self, exc: BaseException) -> None:
        if not self._eof:
            self._exc = exc
        self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None:
            self._waiter = None
            try:  # (not contextlib.suppress: three Python calls per wake)
                w.set_result(None)
            except asyncio.InvalidStateError:  # the waiter was cancelled
                return

    # -- read by the proxy
    def is_eof(self) -> bool:
        return self._eof and not self._chunks

    def read_nowait(self) -> bytes:
        """What has arrived so far (b"" if nothing); raises the connection's error if nothing is left."""
        chunks = self._chunks
        if not chunks:
            if self._exc is not None and not self._eof:
                raise self._exc
            return b""
        self._chunks = []
        conn = self._conn
        if conn.paused:
            conn.resume()
        return b"".join(chunks)  # one chunk: that very object, no copy

    async def readany(self) -> bytes:
        chunks = self._chunks
        while not chunks:
            if self._eof:
                return b""
            if self._exc is not None:
                raise self._exc
            self._waiter = waiter = self._conn.loop.create_future()
            try:
                await waiter
            finally:
                self._waiter = None
            chunks = self._chunks
        self._chunks = []
        conn = self._conn
        if conn.paused:
            conn.resume()
        return b"".join(chunks)  # one chunk: that very object, no copy

    # -- push mode
    def push(self, sink: Callable[[bytes], object] | None, *, lines: bool = False) -> None:
        """From now on each chunk goes to ``sink`` as it arrives (what had arrived goes first, now);
        None: back to pull mode (bytes held back by ``lines`` stay readable, first).

        ``lines``: only chunks holding a line end go to the sink, with the reads held back before them.
        """
        conn = self._conn
        if conn.body is not self:
            return  # the connection went back to its pool (or serves another answer)
        conn.sink = sink
        conn.lines = lines and sink is not None
        if sink is None:
            held = conn.held
            if held:
                conn.held = b""
                self._chunks.insert(0, held)
            return
        chunks = self._chunks
        if chunks:
            self._chunks = []
            data = b"".join(chunks)
            if lines and 10 not in data:
                conn.held = data
            else:
                sink(data)
        if conn.paused:
            conn.resume()

    def held(self) -> bytes:
        """Push mode with ``lines``: the bytes held back after the last line end (they go to no one else)."""
        conn = self._conn
        if conn.body is not self:
            return b""
        held = conn.held
        conn.held = b""
        return held

    async def wait(self) -> None:
        """Push mode: until the body ended (``is_eof``), failed (``failure``), or ``wake`` was called."""
        if self._eof or self._exc is not None:
            return
        self._waiter = waiter = self._conn.loop.create_future()
        try:
            await waiter
        finally:
            self._waiter = None

    def wake(self) -> None:
        """Push mode: end the owner's ``wait`` now."""
        self._wake()

    @property
    def failure(self) -> BaseException | None:
        """Why the body failed (a TimeoutError for a stall); None while it has not."""
        return None if self._eof else self._exc

    def pause(self) -> None:
        """Stop reading from the upstream (the idle watch does not count it as a stall)."""
        self._conn.pause()

    def resume(self) -> None:
        self._conn.resume()

    async def read(self) -> bytes:
        if self._eof:
            chunks = self._chunks
            self._chunks = []
            return b"".join(chunks)
        parts: list[bytes] = []
        while True:
            chunk = await self.readany()
            if not chunk:
                return b"".join(parts)
            parts.append(chunk)


class _Connection(asyncio.Protocol):
    """One upstream connection: writes a request, parses its answer with llhttp."""

    __slots__ = ("_head", "_informational", "_pieces", "_until_close", "active_at", "body", "body_at", "closed",
                 "complete", "content_type", "head_at", "head_future", "held", "idle", "idle_at", "keep_alive",
                 "lines", "loop", "nchunks", "on_body", "parser", "parts", "paused", "pool", "reused", "seen",
                 "shape", "sink", "status", "timer", "total_at", "transport")

    def __init__(self, pool: _Pool) -> None:
        self.pool = pool
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        # llhttp hands the body's pieces to a C method (no Python call per piece); data_received
        # passes what one read brought on as one chunk, to the reader or to the sink.
        self._pieces: list[bytes] = []
        self.on_body = self._pieces.append
        self.sink: Callable[[bytes], object] | None = None  # push mode: gets each chunk as it arrives
        self.lines = False  # push mode: the sink gets only chunks holding a line end...
        self.held = b""  # ...and these bytes (reads without one) wait for the next read that has one
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.complete = True  # no request in flight
        self.reused = False
        self.paused = False
        self.head_future: asyncio.Future[None] | None = None
        self.body: LeanBody | None = None
        self.status = 0
        # The answer's header fields as parsed: (name, ":", raw value) in order; None until its head came.
        self.parts: list[tuple[str, str, str]] | None = None
        self.shape = _NO_FIELDS  # what their names tell
        self.content_type = ""  # the first content-type field's value
        # The answer's bytes until its head is complete (None after): its header lines are
        # parsed from them in one go, not by a Python callback per header.
        self._head: bytes | None = None
        self._informational = False  # a 1xx answer is being parsed: the real one follows
        self._until_close = False
        self.keep_alive = False
        self.idle_at = 0.0  # loop time it went back to the pool
        # Deadlines (loop time) of the exchange in flight, all on one timer (``_arm``):
        self.timer: asyncio.TimerHandle | None = None
        self.head_at: float | None = None  # the head must have come by then
        self.total_at: float | None = None  # the whole exchange must be over by then
        self.body_at: float | None = None  # the reader's own deadline (a stream's first token)
        self.idle = 0.0  # > 0: a stall of this long between body bytes fails the read (sock_read)
        self.nchunks = 0  # body chunks received (the idle watch compares it between ticks)
        self.seen = 0
        self.active_at = 0.0

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses

    def data_received(self, data: bytes) -> None:
        if self._head is not None:
            head = self._head = self._head + data if self._head else data
            if len(head) > MAX_HEADER_BYTES and head.find(b"\r\n\r\n", 0, MAX_HEADER_BYTES) < 0:
                self._fail(aiohttp.ClientPayloadError("upstream response headers too large"))
                return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._body_received()
            self._fail(aiohttp.ClientPayloadError("upstream switched protocols"))
            return
        except httptools.HttpParserError as exc:
            self._body_received()
            self._fail(aiohttp.ClientPayloadError(f"malformed upstream response: {exc}"))
            return
        pieces = self._pieces
        if pieces:
            # Inlined _body_received: the hot path of a stream (one read, one piece, one chunk).
            # (Not "pieces[0] is pieces[-1]" alone: llhttp's 1-byte pieces are the same interned object.)
            chunk = b"".join(pieces) if pieces[1:] else pieces[0]
            del pieces[:]
            self.nchunks += 1
            sink = self.sink
            if sink is not None:
                if self.lines:
                    # An SSE sink has nothing to pass on before a line end: hold the read, no call.
                    held = self.held
                    if 10 not in chunk:
                        self.held = held + chunk if held else chunk
                        return
                    if held:
                        chunk = held + chunk
                        self.held = b""
                sink(chunk)
                return
            body = self.body
            if body is None:
                return
            chunks = body._chunks
            chunks.append(chunk)
            w = body._waiter
            if w is not None:
                body._waiter = None
                try:
                    w.set_result(None)
                except asyncio.InvalidStateError:  # the reader was cancelled
                    return
            elif len(chunks) > HIGH_WATER_CHUNKS:
                self.pause()

    def _body_received(self) -> None:
        """Pass on the body's pieces of this read (before an error is raised: they came first)."""
        pieces = self._pieces
        if not pieces:
            return
        chunk = b"".join(pieces)
        del pieces[:]
        self.nchunks += 1
        if self.sink is not None:
            if self.lines:
                chunk = self.held + chunk
                self.held = b""
                if 10 not in chunk:
                    self.held = chunk  # an error follows: no line end will come, the owner reads it with held()
                    return
            self.sink(chunk)
        elif self.body is not None:
            self.body._chunks.append(chunk)
            self.body._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        if not self.complete and self._until_close and self.body is not None:
            # A body without content-length or chunking ends when the connection does.
            self.complete = True
            self.body.feed_eof()
        elif not self.complete:
            if self.head_future is not None and not self.head_future.done():
                self.head_future.set_exception(aiohttp.ServerDisconnectedError())
            elif self.body is not None:
                self.body.set_exception(aiohttp.ClientPayloadError("upstream connection closed mid-answer"))

    # -- httptools callbacks (no on_header: llhttp validates the header lines, _headers reads them)
    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        head = self._head or b""
        parts, names, end = _headers(head)
        if status < 200:
            # 1xx (103 Early Hints, an unasked 100): not the answer; its head is skipped.
            self._informational = True
            self._head = head[end:]
            return
        self.status = status
        self._head = None
        self.parts = parts
        # No multidict here (LeanResponse makes one if asked): what the client needs of the
        # fields is known by their names alone, once per set of names.
        shape = _SHAPES.get(names)
        if shape is None:
            shape = _shape(names)
        self.shape = shape
        ctype = shape.ctype
        self.content_type = parts[ctype][2].strip(" \t") if ctype >= 0 else ""
        self._until_close = not shape.framed and status != 204 and status != 304
        fut = self.head_future
        if fut is not None and not fut.done():
            fut.set_result(None)

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            return
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

    def expire(self) -> None:
        """The timer fired: fail what is overdue, else re-arm for the next deadline."""
        self.timer = None
        if self.complete:
            return
        now = self.loop.time()
        head_pending = self.parts is None  # (the answer's head has not come)
        overdue = (
            (head_pending and self.head_at is not None and now >= self.head_at)
            or (self.total_at is not None and now >= self.total_at)
            or (self.body_at is not None and now >= self.body_at)
        )
        if not overdue and self.idle and not head_pending:
            if self.nchunks != self.seen or self.paused:  # bytes came (or we stopped reading): not a stall
                self.seen = self.nchunks
                self.active_at = now
            elif now - self.active_at >= self.idle:
                overdue = True
        if overdue:
            self._fail(TimeoutError())
        else:
            self._arm(now)

    def _arm(self, now: float) -> None:
        """(Re)schedule the one timer for the earliest deadline that applies now."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        at = self.total_at
        if self.parts is None:  # the answer's head has not come
            if self.head_at is not None and (at is None or self.head_at < at):
                at = self.head_at
        else:
            if self.body_at is not None and (at is None or self.body_at < at):
                at = self.body_at
            if self.idle:
                tick = now + min(1.0, self.idle / 10)  # a stall is seen between idle and idle + tick
                if at is None or tick < at:
                    at = tick
        if at is not None:
            self.timer = self.loop.call_at(at, self.expire)

    def pause(self) -> None:
        if not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.paused and self.transport is not None and not self.closed:
            self.paused = False
            self.transport.resume_reading()

    def abort(self) -> None:
        self.closed = True
        self.sink = None
        self.lines = False
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.transport is not None:
            self.transport.abort()

    def send(self, head: bytes, body: bytes) -> None:
        assert self.transport is not None
        self.complete = False
        self._head = b""
        self.keep_alive = False
        self.body_at = None
        self.idle = 0.0
        self.sink = None
        self.lines = False
        self.held = b""
        self.body = LeanBody(self)
        self.head_future = self.loop.create_future()
        if len(body) < 16384:
            self.transport.write(head + body)
        else:
            self.transport.writelines((head, body))


class LeanResponse:
    """The part of ``aiohttp.ClientResponse`` the proxy reads."""

    __slots__ = ("_conn", "_done", "_headers", "content", "content_type", "parts", "shape", "status")

    def __init__(self, conn: _Connection) -> None:
        self._conn = conn
        self._done = False
        self.status: int = conn.status
        assert conn.parts is not None
        assert conn.body is not None
        # The header fields as parsed, (name, ":", value with its blanks) in arrival order, and what
        # their names tell: the relay picks from them (gateway/proxy/streaming.py ``client_headers``)
        # without a multidict, stripping only the values it keeps.
        self.parts: list[tuple[str, str, str]] = conn.parts
        self.shape: HeadShape = conn.shape
        self.content_type: str = conn.content_type  # headers.get("content-type", "")
        self._headers: CIMultiDictProxy[str] | None = None
        self.content = conn.body

    @property
    def headers(self) -> CIMultiDictProxy[str]:
        """The header fields as aiohttp gives them; made on first use (a relayed answer needs none)."""
        headers = self._headers
        if headers is None:
            headers = self._headers = CIMultiDictProxy(CIMultiDict(fields(self.parts)))
        return headers

    async def read(self) -> bytes:
        try:
            return await self.content.read()
        finally:
            self.release()

    def read_timeout(self, seconds: float | None) -> None:
        """Reads fail with TimeoutError ``seconds`` from now (None: no such deadline)."""
        conn = self._conn
        if seconds is None:
            # No re-arm: a timer set for the old deadline finds nothing overdue and re-arms then.
            conn.body_at = None
            return
        if self._done or conn.complete:
            return
        now = conn.loop.time()
        conn.body_at = now + seconds
        conn._arm(now)

    def idle_timeout(self, idle: float) -> None:
        """Reads fail with TimeoutError once no body byte came for ``idle`` seconds (aiohttp's sock_read);
        checked on a tick of min(1 s, idle / 10), never per chunk.  0 turns it off."""
        conn = self._conn
        if self._done or conn.complete:
            return
        now = conn.loop.time()
        conn.idle = idle
        conn.seen = conn.nchunks
        conn.active_at = now
        conn._arm(now)

    def release(self) -> None:
        """Done with the answer: the connection goes back to its pool if it is reusable."""
        if self._done:
            return
        self._done = True
        conn = self._conn
        if conn.timer is not None:
            conn.timer.cancel()
            conn.timer = None
        if conn.complete and not conn.closed and conn.keep_alive and self.content.is_eof():
            conn.pool.put(conn)
        else:
            conn.abort()
            conn.pool.forget(conn)

    def close(self) -> None:
        """Abandon the answer: the connection is closed (the upstream stops generating)."""
        if self._done:
            return
        self._done = True
        self._conn.abort()
        self._conn.pool.forget(self._conn)


class _Pool:
    """Idle connections to one origin, and a bound on all of them."""

    __slots__ = ("_idle", "_live", "_sem", "host", "host_header", "loop", "port", "ssl")

    def __init__(self, host: str, port: int, ssl: ssl_mod.SSLContext | None, limit: int,
                 host_header: str = "") -> None:
        self.host, self.port, self.ssl = host, port, ssl
        self.host_header = host_header or host  # the Host header's value: the port only when not the default
        # Made on the loop that uses it (a request's): asyncio.get_running_loop() asks getpid() each time.
        self.loop = asyncio.get_running_loop()
        self._idle: list[_Connection] = []
        self._live: set[_Connection] = set()
        self._sem = asyncio.Semaphore(limit) if limit > 0 else None

    def put(self, conn: _Connection) -> None:
        conn.reused = True
        conn.body = None
        conn.sink = None
        conn.lines = False
        conn.held = b""
        conn.head_future = None
        conn.parts = None
        conn.idle_at = conn.loop.time()
        conn.body_at = None
        conn.idle = 0.0
        self._idle.append(conn)

    def forget(self, conn: _Connection) -> None:
        if conn in self._live:
            self._live.discard(conn)
            if self._sem is not None:
                self._sem.release()
        if conn in self._idle:
            self._idle.remove(conn)

    def take(self, now: float) -> _Connection | None:
        """An idle connection still worth using, or None."""
        idle = self._idle
        while idle:
            conn = idle.pop()
            if conn.closed:
                continue
            if now - conn.idle_at > KEEPALIVE_S or conn.transport is None or conn.transport.is_closing():
                conn.abort()
                self.forget(conn)
                continue
            return conn
        return None

    async def connect(self, connect_timeout: float | None, deadline: float | None) -> _Connection:
        """A new connection; waits for a free slot until ``deadline`` (loop time), connects within ``connect_timeout``."""
        sem = self._sem
        loop = asyncio.get_running_loop()
        async with asyncio.timeout_at(deadline):
            if sem is not None:
                await sem.acquire()
            try:
                async with asyncio.timeout(connect_timeout) as connecting:
                    _, conn = await loop.create_connection(
                        lambda: _Connection(self), self.host, self.port, ssl=self.ssl,
                        server_hostname=self.host if self.ssl is not None else None,
                    )
            except TimeoutError:
                if sem is not None:
                    sem.release()
                if connecting.expired():
                    raise aiohttp.ServerTimeoutError(f"connect to {self.host}:{self.port} timed out") from None
                raise
            except OSError as exc:
                if sem is not None:
                    sem.release()
                raise aiohttp.ClientConnectionError(
                    f"cannot connect to {self.host}:{self.port}: {exc.strerror or exc}") from None
            except BaseException:
                if sem is not None:
                    sem.release()
                raise
        self._live.add(conn)
        return conn

    def close(self) -> None:
        for conn in list(self._live):
            conn.abort()
        self._idle.clear()


class LeanSession:
    """A pool of pools; the one object the proxy keeps for all upstream calls."""

    def __init__(self, limit_per_host: int = 256, ssl_context: ssl_mod.SSLContext | None = None,
                 trace_configs: Iterable[aiohttp.TraceConfig] | None = None) -> None:
        self._pools: dict[tuple[str, str, int], _Pool] = {}
        self._limit = limit_per_host
        self._ssl = ssl_context
        self.closed = False
        self.trace_configs: list[aiohttp.TraceConfig] = list(trace_configs or ())
        for tc in self.trace_configs:
            tc.freeze()

    def _pool(self, url: URL) -> _Pool:
        key = (url.scheme, url.raw_host or "", url.port or 0)
        pool = self._pools.get(key)
        if pool is not None:
            return pool
        ssl = None
        if url.scheme == "https":
            ssl = self._ssl or ssl_mod.create_default_context()
        host = key[1]
        if ":" in host:
            host = f"[{host}]"  # an IPv6 literal: bracketed in the Host header (RFC 9110 7.2)
        if url.port and not url.is_default_port():
            host = f"{host}:{url.port}"
        pool = self._pools[key] = _Pool(key[1], key[2], ssl, self._limit, host)
        return pool

    async def request(self, method: str, url: URL, *, data: bytes = b"", headers: Mapping[str, str] | None = None,
                      timeout: aiohttp.ClientTimeout | None = None, head_timeout: float | None = None,
                      traced: bool = False, **_: Any) -> LeanResponse:
        """Send one request; return once the answer's head is in.

        ``head_timeout`` bounds the wait for the head (a free pooled slot, the
        connect and the upstream's first byte), ``timeout.total`` the whole
        exchange until release, ``timeout.sock_connect`` the connect alone;
        each raises a TimeoutError (the connect: aiohttp.ServerTimeoutError).
        """
        if self.trace_configs and not traced:
            return await self._traced(method, url, data, headers or {}, timeout, head_timeout)
        try:  # _pool(url), inlined for a known origin
            pool = self._pools[(url.scheme, url.raw_host or "", url.port or 0)]
        except KeyError:
            pool = self._pool(url)
        head = _head(method, url.raw_path_qs or "/", pool.host_header, headers or {}, len(data))
        loop = pool.loop
        now = loop.time()
        total = timeout.total if timeout is not None else None
        total_at = now + total if total else None
        head_at = now + head_timeout if head_timeout else None
        first_at = head_at if total_at is None or (head_at is not None and head_at < total_at) else total_at
        for fresh in (False, True):
            conn = None if fresh else pool.take(now)
            if conn is None:
                conn = await pool.connect(timeout.sock_connect if timeout is not None else None, first_at)
            conn.total_at = total_at
            conn.head_at = head_at
            if first_at is not None:
                conn.timer = loop.call_at(first_at, conn.expire)
            conn.send(head, data)
            try:
                assert conn.head_future is not None
                await conn.head_future
            except aiohttp.ServerDisconnectedError:
                conn.abort()
                pool.forget(conn)
                if conn.reused and not fresh:
                    continue  # the server closed an idle connection as we wrote: it never saw this request
                raise
            except BaseException:
                conn.abort()
                pool.forget(conn)
                raise
            return LeanResponse(conn)
        raise aiohttp.ServerDisconnectedError()  # pragma: no cover - the loop returns or raises

    async def _traced(self, method: str, url: URL, data: bytes, headers: Mapping[str, str],
                      timeout: aiohttp.ClientTimeout | None, head_timeout: float | None) -> LeanResponse:
        """aiohttp's request trace signals around the request (tracing on: the headers may gain traceparent)."""
        sent: CIMultiDict[str] = CIMultiDict(headers)
        traces = [Trace(self, tc, tc.trace_config_ctx()) for tc in self.trace_configs]  # type: ignore[arg-type]
        for trace in traces:
            await trace.send_request_start(method, url, sent)
        try:
            resp = await self.request(method, url, data=data, headers=sent, timeout=timeout,
                                      head_timeout=head_timeout, traced=True)
        except BaseException as exc:
            for trace in traces:
                await trace.send_request_exception(method, url, sent, exc)
            raise
        for trace in traces:
            await trace.send_request_end(method, url, sent, resp)  # type: ignore[arg-type]
        return resp

    async def close(self) -> None:
        self.closed = True
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()


# One header line (llhttp has checked the syntax): name, then the value without surrounding blanks.
_HEADER_LINE = re.compile(r"^([^:\r\n]+):[ \t]*(.*?)[ \t]*\r?$", re.MULTILINE)


def _headers(head: bytes) -> tuple[list[tuple[str, str, str]], str, int]:
    """The header fields of an answer's head (status line, fields, blank line; the body may follow),
    as (name, ":", value) in order (``fields`` strips the values), their names joined by line
    ends (a name has none), and where the head ends."""
    end = head.find(b"\r\n\r\n")
    if end >= 0:
        after = end + 4
    else:
        end = head.find(b"\n\n")  # bare LF line ends (llhttp accepts them)
        after = end + 2
    start = head.find(b"\n") + 1  # after the status line (its reason phrase may hold a colon)
    text = head[start:end].decode("latin-1")
    if not text:
        return [], "", after
    lines = text.split("\r\n")
    if len(lines) != text.count("\n") + 1 or "\r\n " in text or "\r\n\t" in text:
        # A bare LF line end or a folded line: the general case, by regular expression.
        pairs: list[tuple[str, str]] = _HEADER_LINE.findall(text)
        return [(name, ":", value) for name, value in pairs], "\n".join(map(_NAME, pairs)), after
    # The usual head (CRLF lines), split in C: the regular expression alone was ~12% of a
    # request's instructions (callgrind), this is less than half of it; no Python loop per field.
    parts = list(map(str.partition, lines, _COLONS))  # (name, ":", value)
    return parts, "\n".join(map(_NAME, parts)), after


def fields(parts: list[tuple[str, str, str]]) -> list[tuple[str, str]]:
    """(name, value) pairs from ``_headers``' parts, values without surrounding blanks, paired in C.
    A list, not zip/map iterators: multidict builds from a list of pairs in half the time."""
    return list(zip(map(_NAME, parts), map(str.strip, map(_VALUE, parts), _BLANKS), strict=True))


_COLONS = itertools.repeat(":")
_BLANKS = itertools.repeat(" \t")
_NAME = operator.itemgetter(0)
_VALUE = operator.itemgetter(2)


class HeadShape:
    """What an answer's header names (exact spelling, in order) tell, learnt once per set of names:
    a provider sends the same names on every answer, so none is lowered or compared per answer."""

    __slots__ = ("ctype", "framed", "lows", "names", "relay")

    def __init__(self, names: list[str]) -> None:
        self.names = tuple(names)
        lows = self.lows = tuple(name.lower() for name in names)
        # Else the body ends when the connection does.
        self.framed = "content-length" in lows or "transfer-encoding" in lows
        self.ctype = lows.index("content-type") if "content-type" in lows else -1  # the first; -1: none
        # The relay's own plan for these names (gateway/proxy/streaming.py), kept here so that an
        # answer's names are looked up once.
        self.relay: Any = None


# By the names joined with line ends (one string: hashed and compared in one go, cheaper than a
# tuple of fresh strings).  Unambiguous: no name holds a line end (``_headers`` splits the CRLF
# head only when every LF ends a line; its regular expression excludes them).  Bounded: upstreams
# choose the names.
_SHAPES: dict[str, HeadShape] = {}
SHAPES_MAX = 256
_NO_FIELDS = HeadShape([])


def _shape(names: str) -> HeadShape:
    if len(_SHAPES) >= SHAPES_MAX:
        _SHAPES.clear()  # an upstream inventing names: start over rather than stop learning
    shape = _SHAPES[names] = HeadShape(names.split("\n") if names else [])
    return shape


# Header names the client sets itself (or that make no sense on a request it frames).
_FRAMING = frozenset({"host", "content-length", "transfer-encoding", "connection"})


def _head(method: str, target: str, host: str, headers: Mapping[str, str], length: int) -> bytes:
    # Which fields go, by the names (in order) of this request's headers: the same on every request
    # of a client, so the whole verdict is one lookup.  None: all of them (the usual case).
    names = tuple(headers)
    try:
        keep = _HEAD_PLANS[names]
    except KeyError:
        keep = _head_plan(names)
    items = headers.items() if keep is None else compress(headers.items(), keep)
    fields = "\r\n".join(map(": ".join, items))  # type: ignore[arg-type]  # (name, value) pairs
    # A line break inside a name or a value would add a header line: each line has exactly one CR and one LF.
    n = len(names) if keep is None else sum(keep)
    if n:
        if fields.count("\n") != n - 1 or fields.count("\r") != n - 1:
            raise ValueError("a header name or value contains a line break")
        fields += "\r\n"
    return f"{method} {target} HTTP/1.1\r\nHost: {host}\r\n{fields}Content-Length: {length}\r\n\r\n".encode("latin-1")


# Request header names (exact spelling, in order) -> which to send; bounded: clients choose some names.
_HEAD_PLANS: dict[tuple[str, ...], tuple[bool, ...] | None] = {}
HEAD_PLANS_MAX = 256


def _head_plan(names: tuple[str, ...]) -> tuple[bool, ...] | None:
    keep = tuple(name.lower() not in _FRAMING for name in names)  # once per set of names: no cache per name
    plan = None if all(keep) else keep
    if len(_HEAD_PLANS) >= HEAD_PLANS_MAX:
        _HEAD_PLANS.clear()
    _HEAD_PLANS[names] = plan
    return plan
