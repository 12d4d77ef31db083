"""The Host header the lean client sends: the upstream's host, its port only when not the default,
an IPv6 literal in brackets (RFC 9110 section 7.2). A real socket on ::1 reads what arrives."""

from __future__ import annotations

import asyncio
import socket

import pytest
from yarl import URL

from gateway.upstream.client import LeanSession

ANSWER = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"


async def _host_seen(family: socket.AddressFamily, bind: str, url_host: str) -> str:
    heads: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heads.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(ANSWER)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, bind, 0, family=family)
    port = server.sockets[0].getsockname()[1]
    session = LeanSession()
    try:
        resp = await session.request("POST", URL(f"http://{url_host}:{port}/v1/messages", encoded=True),
                                     data=b"{}", headers={"content-type": "application/json"})
        assert resp.status == 200
        assert await resp.read() == b"{}"
        resp.release()
    finally:
        await session.close()
        server.close()
        await server.wait_closed()
    lines = heads[0].decode("latin-1").split("\r\n")
    return next(line.split(":", 1)[1].strip() for line in lines if line.lower().startswith("host:")) + f"|{port}"


async def test_host_header_names_the_port_and_brackets_an_ipv6_literal() -> None:
    host, port = (await _host_seen(socket.AF_INET, "127.0.0.1", "127.0.0.1")).split("|")
    assert host == f"127.0.0.1:{port}"
    try:
        probe = socket.socket(socket.AF_INET6)
        probe.bind(("::1", 0))
        probe.close()
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    host, port = (await _host_seen(socket.AF_INET6, "::1", "[::1]")).split("|")
    assert host == f"[::1]:{port}"
