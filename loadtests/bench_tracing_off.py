#!/usr/bin/env python3
"""What tracing costs when it is off: Python calls and CPU time per request, this tree vs another.

The gateway runs in this process (one uvloop worker's worth: create_app on a
port); the mock upstream and a keep-alive client run in their own processes,
so everything counted here is the gateway's.  Two phases over the same
sequential requests, after a warm-up:

  * calls/request: cProfile's total call count / requests (deterministic,
    apart from the 1 s metrics refresh loop: a few calls spread over all
    requests);
  * CPU-us/request: process CPU time / requests with the profiler off
    (noisy on a shared machine: compare calls first).

Compare with the tree before tracing existed by pointing --gateway-src at an
export of it (the config written here has no [tracing] section, so both
trees read it):

    git archive <commit> gateway | tar -x -C /tmp/gw-before
    .venv/bin/python loadtests/bench_tracing_off.py --gateway-src /tmp/gw-before
    .venv/bin/python loadtests/bench_tracing_off.py
    .venv/bin/python loadtests/bench_tracing_off.py --tracing on   # for scale: spans built and exported

Usage: bench_tracing_off.py [--requests 2000] [--warmup 300] [--stream] [--gateway-src DIR] [--tracing off|on]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.fixtures.servers import free_port, wait_port  # noqa: E402  - the test suite's, one definition

KEY = "gwk_bench_" + "k" * 32

CLIENT = r"""
import http.client, json, sys
port, model, stream, warmup = int(sys.argv[1]), sys.argv[2], sys.argv[3] == "1", int(sys.argv[4])
body = json.dumps({"model": model, "max_tokens": 16, "stream": stream,
                   "messages": [{"role": "user", "content": "hello"}]}).encode()
headers = {"x-api-key": sys.argv[5], "anthropic-version": "2023-06-01", "content-type": "application/json",
           "x-mock-ttft-ms": "0", "x-mock-chunk-gap-ms": "0", "x-mock-latency-ms": "0"}
conn = http.client.HTTPConnection("127.0.0.1", port)
def run(n):
    for _ in range(n):
        conn.request("POST", "/v1/messages", body, headers)
        r = conn.getresponse(); r.read()
        assert r.status == 200, r.status
run(warmup)
for line in sys.stdin:          # one line per phase: the number of requests to send
    run(int(line)); print("done", flush=True)
"""


def config_text(mock_port: int, gw_port: int, tracing: str) -> str:
    text = f"""
[server]
host = "127.0.0.1"
port = {gw_port}
workers = 1

[log]
access_log = false

[accounting]
sink = "none"

[pricing]
file = "{ROOT / 'config' / 'prices.toml'}"

[upstreams.mock]
provider = "anthropic"
base_url = "http://127.0.0.1:{mock_port}"
api_key_env = "BENCH_UPSTREAM_KEY"

[[routes]]
match = "bench-*"
deployments = [{{ upstream = "mock" }}]

[[keys]]
name = "bench"
key_sha256 = "{hashlib.sha256(KEY.encode()).hexdigest()}"
"""
    if tracing == "on":
        # A receiver that is not there: spans are still built, batched and dropped by the exporter.
        text += f'\n[tracing]\nenabled = true\nendpoint = "http://127.0.0.1:{free_port()}/v1/traces"\n'
    return text


def call_counts(prof: cProfile.Profile) -> dict[str, int]:
    """Calls per function, summed from the profiler's own entries (one per code object).

    Not pstats: it keys functions by (file, line, name) and keeps one of any
    that share it (every dataclass __init__ is "<string>:2"), which loses calls.
    Labels are package-relative, so two trees' runs compare function by function.
    """
    out: dict[str, int] = {}
    for entry in prof.getstats():  # type: ignore[attr-defined]
        code = entry.code
        if isinstance(code, str):
            label = re.sub(r" at 0x[0-9a-f]+", "", code)
        else:
            label = f"{code.co_filename.rsplit('/gateway/', 1)[-1]}:{code.co_name}"
        out[label] = out.get(label, 0) + entry.callcount
    return out


async def main(args: argparse.Namespace) -> dict[str, object]:
    if args.gateway_src:
        sys.path.insert(0, str(Path(args.gateway_src).resolve()))
    from aiohttp import web

    import gateway
    from gateway.app import create_app
    from gateway.config import parse

    os.environ["BENCH_UPSTREAM_KEY"] = "sk-bench"
    mock_port, gw_port = free_port(), free_port()
    tmp = Path(tempfile.mkdtemp(prefix="bench-tracing-"))
    mock = subprocess.Popen([sys.executable, "-m", "gateway", "mock-upstream", "--host", "127.0.0.1",
                             "--port", str(mock_port)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(mock_port)
        cfg = parse(config_text(mock_port, gw_port, args.tracing), source=str(tmp / "bench.toml"))
        runner = web.AppRunner(create_app(cfg), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", gw_port).start()
        client = await asyncio.create_subprocess_exec(
            sys.executable, "-c", CLIENT, str(gw_port), "bench-claude", "1" if args.stream else "0",
            str(args.warmup), KEY, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert client.stdin is not None
        assert client.stdout is not None

        async def phase(n: int) -> None:
            client.stdin.write(f"{n}\n".encode())  # type: ignore[union-attr]
            await client.stdin.drain()  # type: ignore[union-attr]
            assert b"done" in await client.stdout.readline()  # type: ignore[union-attr]

        await phase(1)  # the warm-up has run once this answers
        prof = cProfile.Profile()
        prof.enable()
        await phase(args.requests)
        prof.disable()
        counts = call_counts(prof)
        calls = sum(counts.values())
        if args.dump:
            Path(args.dump).write_text(json.dumps(counts))  # compare two runs function by function (--diff)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        await phase(args.requests)
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        client.stdin.close()
        await client.wait()
        await runner.cleanup()
    finally:
        mock.terminate()
        mock.wait()
    return {
        "gateway_src": str(Path(gateway.__file__).parent), "tracing": args.tracing, "stream": args.stream,
        "requests": args.requests, "calls_per_request": round(calls / args.requests, 2),
        "cpu_us_per_request": round(cpu / args.requests * 1e6, 1), "wall_s": round(wall, 2),
    }


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--stream", action="store_true")
    p.add_argument("--gateway-src", default="", help="a directory holding another tree's gateway/ package")
    p.add_argument("--tracing", choices=("off", "on"), default="off")
    p.add_argument("--dump", default="", help="write the profile of the calls phase here")
    p.add_argument("--diff", nargs=2, metavar=("A", "B"), help="print functions whose call counts differ in two dumps")
    ns = p.parse_args()
    if ns.diff:
        a, b = (json.loads(Path(f).read_text()) for f in ns.diff)
        rows = [(b.get(k, 0) - a.get(k, 0), k) for k in set(a) | set(b)]
        for delta, label in sorted(rows, key=lambda r: -abs(r[0]))[:25]:
            if delta:
                print(f"{delta:+8d}  {label}")
        sys.exit(0)
    try:
        import uvloop

        result = uvloop.run(main(ns))
    except ImportError:
        result = asyncio.run(main(ns))
    print(json.dumps(result))
