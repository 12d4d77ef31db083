#!/usr/bin/env python3
"""What one upstream call costs the worker: aiohttp's client against a lean protocol client.

Both call the bench's nginx mock (core 1) from one uvloop process (core 0) with
16 concurrent callers and report CPU microseconds per request
(``time.process_time``).  The lean client is a probe, not production code: it
keeps connections alive and reads content-length bodies only.  It shows the
floor a purpose-built upstream client could reach (see BENCH.md).

Usage: taskset -c 0 .venv/bin/python loadtests/client_floor.py
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import uvloop
from multidict import CIMultiDict
from yarl import URL

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench


class _Conn(asyncio.Protocol):
    def __init__(self) -> None:
        self.buf = bytearray()
        self.waiter: asyncio.Future[tuple[int, CIMultiDict[str], bytes]] | None = None
        self.need = -1
        self.head: tuple[int, CIMultiDict[str]] | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not an asyncio.Transport subclass

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.head is None:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = bytes(self.buf[:end]).split(b"\r\n")
            headers: CIMultiDict[str] = CIMultiDict()
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                headers.add(name.decode("latin-1"), value.strip().decode("latin-1"))
            self.head = (int(lines[0][9:12]), headers)
            del self.buf[: end + 4]
            self.need = int(headers.get("content-length", "0"))
        if len(self.buf) >= self.need and self.waiter is not None:
            body = bytes(self.buf[: self.need])
            del self.buf[: self.need]
            waiter, self.waiter = self.waiter, None
            status, headers = self.head
            self.head = None
            waiter.set_result((status, headers, body))

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("upstream closed"))


class LeanClient:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.idle: list[_Conn] = []

    async def request(self, method: str, path: str, headers: CIMultiDict[str], body: bytes) -> tuple[int, bytes]:
        loop = asyncio.get_running_loop()
        if self.idle:
            conn = self.idle.pop()
        else:
            _, conn = await loop.create_connection(_Conn, self.host, self.port)
        parts = [f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Length: {len(body)}\r\n"]
        parts += [f"{k}: {v}\r\n" for k, v in headers.items()]
        parts.append("\r\n")
        conn.waiter = loop.create_future()
        assert conn.transport is not None
        conn.transport.writelines(["".join(parts).encode("latin-1"), body])
        status, _, data = await conn.waiter
        self.idle.append(conn)
        return status, data


async def measure(name: str, call: Callable[[], Awaitable[None]], n: int = 4000, conc: int = 16) -> None:
    async def caller(k: int) -> None:
        for _ in range(k):
            await call()

    await asyncio.gather(*(caller(50) for _ in range(conc)))  # warm the pool
    best = float("inf")
    for _ in range(3):
        c0 = time.process_time()
        await asyncio.gather(*(caller(n // conc) for _ in range(conc)))
        best = min(best, (time.process_time() - c0) / n * 1e6)
    print(f"{name:48s} {best:6.1f} CPU-us/request", flush=True)


async def run(port: int) -> None:
    body = bench.KINDS["anthropic-json"].body()
    headers: CIMultiDict[str] = CIMultiDict(
        {"content-type": "application/json", "anthropic-version": "2023-06-01", "x-api-key": "sk-probe",
         "accept-encoding": "identity"}
    )
    url = URL(f"http://{bench.HOST}:{port}/json/v1/messages", encoded=True)
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, limit_per_host=256, keepalive_timeout=60),
        auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar(), skip_auto_headers=("User-Agent",),
        timeout=aiohttp.ClientTimeout(total=None),
    )
    per_request = aiohttp.ClientTimeout(total=900, sock_connect=5, connect=5)
    lean = LeanClient(bench.HOST, port)

    async def via_aiohttp() -> None:
        async with asyncio.timeout(120):  # as forward.py does (first byte)
            resp = await session.request("POST", url, data=body, headers=headers, timeout=per_request,
                                         allow_redirects=False)
        await resp.read()
        resp.release()

    async def via_lean() -> None:
        async with asyncio.timeout(120):
            status, _ = await lean.request("POST", "/json/v1/messages", headers, body)
        assert status == 200

    try:
        await measure("aiohttp ClientSession.request (as forward.py)", via_aiohttp)
        await measure("lean protocol client (probe)", via_lean)
    finally:
        await session.close()


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="llmgw-floor-"))
    tmp.chmod(0o755)
    stack = bench.Stack(tmp)
    stack.mock_port = bench.free_port()
    stack.mock = stack._start_nginx("mock", bench.LOADGEN_CPU, stack.mock_port)
    try:
        uvloop.run(run(stack.mock_port))
    finally:
        stack.stop()


if __name__ == "__main__":
    main()
