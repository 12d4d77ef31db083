#!/usr/bin/env python3
"""The reference: a minimal aiohttp + uvloop pass-through with no policy at all.

What a gateway costs at the very least on this stack: accept a request, forward
its bytes to the upstream with aiohttp's client (keep-alive pool), stream the
answer back as it arrives.  No key check, no routing, no limits, no logging.
``bench_counts.py`` (and ``bench.py --targets passthrough``) measure the gateway
against it in the same run, so the ratio does not depend on the machine.

Usage: python loadtests/passthrough.py PORT UPSTREAM_BASE_URL
"""

from __future__ import annotations

import sys

import aiohttp
import uvloop
from aiohttp import web

HOP = frozenset({"host", "connection", "keep-alive", "transfer-encoding", "content-length", "te", "upgrade"})


async def forward(request: web.Request) -> web.StreamResponse:
    session: aiohttp.ClientSession = request.app["session"]
    body = await request.read()
    headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
    async with session.request(request.method, request.app["base"] + request.raw_path, data=body,
                               headers=headers) as up:
        resp = web.StreamResponse(status=up.status)
        for k, v in up.headers.items():
            if k.lower() not in HOP:
                resp.headers[k] = v
        if up.content_length is not None and "text/event-stream" not in up.headers.get("content-type", ""):
            resp.content_length = up.content_length
        await resp.prepare(request)
        async for chunk in up.content.iter_any():
            await resp.write(chunk)
        await resp.write_eof()
        return resp


async def session_ctx(app: web.Application) -> object:
    app["session"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), auto_decompress=False)
    yield
    await app["session"].close()


def main() -> None:
    port, base = int(sys.argv[1]), sys.argv[2].rstrip("/")
    app = web.Application()
    app["base"] = base
    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{tail:.*}", forward)
    uvloop.run(web._run_app(app, host="127.0.0.1", port=port, access_log=None, print=None))


if __name__ == "__main__":
    main()
