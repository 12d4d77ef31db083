#!/usr/bin/env python3
"""Memory and scale: RSS per idle keep-alive connection and per open stream, and 2 workers vs 1.

What it starts (all on 127.0.0.1, all stopped at the end):
  * ``llm-gateway serve`` (standalone, config key) whose bundled mock upstream
    streams slowly (one delta every --gap-ms), for the memory rows;
  * the nginx mock of bench.py, for the throughput rows (wrk at saturation).

What it reports:
  * RSS per idle keep-alive connection: one worker; N clients each make one
    request and keep the connection open; (RSS after - RSS before) / N;
  * RSS per open stream: --workers (default 2) workers; S streams held open at
    once (each has received its first event); (sum of the workers' RSS after -
    before) / S, and the mock's own share apart;
  * throughput of 2 workers over 1 (wrk, same kind, same run).

Usage: .venv/bin/python loadtests/bench_scale.py [--idle 2000] [--streams 10000] [--seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import resource
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench
from bench import HOST, KINDS, VENV_BIN, children, cpu_ticks, run_wrk, wrk_script

from tests.fixtures.servers import free_port, wait_port


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def gateway_config(tmp: Path, port: int, mock_port: int, key: str, workers: int, gap_ms: int, chunks: int,
                   upstream_base: str = "") -> Path:
    digest = hashlib.sha256(key.encode()).hexdigest()
    base = upstream_base or f"http://{HOST}:{mock_port}"
    text = f"""
[server]
host = "{HOST}"
port = {port}
workers = {workers}

[log]
level = "warning"

[pricing]
file = "{bench.ROOT / "config" / "prices.toml"}"

[mock_upstream]
enabled = {"false" if upstream_base else "true"}
port = {mock_port}
ttft_ms = 0
chunk_gap_ms = {gap_ms}
chunks = {chunks}

[upstreams.mock]
provider = "openai"
base_url = "{base}"
max_connections = 20000

[[routes]]
match = "*"
deployments = [{{ upstream = "mock" }}]

[[keys]]
name = "scale"
key_sha256 = "{digest}"
"""
    path = tmp / f"gateway-{port}.toml"
    path.write_text(text)
    return path


class Gateway:
    def __init__(self, tmp: Path, workers: int, gap_ms: int = 500, chunks: int = 60, upstream_base: str = "") -> None:
        self.key = "gwk_scale_" + secrets.token_urlsafe(24)
        self.port, self.mock_port = free_port(), free_port()
        cfg = gateway_config(tmp, self.port, self.mock_port, self.key, workers, gap_ms, chunks, upstream_base)
        env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        self.proc = subprocess.Popen([str(VENV_BIN / "llm-gateway"), "serve", "--config", str(cfg)],
                                     stdout=subprocess.DEVNULL, stderr=open(tmp / "gateway.err", "ab"),  # noqa: SIM115
                                     env=env, cwd=tmp, start_new_session=True)
        wait_port(self.port, timeout=60)
        deadline = time.monotonic() + 60
        while len(self.workers()) < workers and time.monotonic() < deadline:
            time.sleep(0.05)

    def workers(self) -> list[int]:
        out = []
        for pid in children(self.proc.pid):
            with contextlib.suppress(OSError):
                if b"worker" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    out.append(pid)
        return out

    def mock_pid(self) -> int | None:
        for pid in children(self.proc.pid):
            with contextlib.suppress(OSError):
                if b"mock-upstream" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    return pid
        return None

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def _request(gw: Gateway, stream: bool) -> bytes:
    body = json.dumps({"model": "demo-gpt", "max_tokens": 64, "stream": stream,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    return (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: Bearer {gw.key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, int | None]:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = None
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return status, length


async def open_idle(gw: Gateway, n: int) -> list[asyncio.StreamWriter]:
    """n connections, each after one complete non-streamed request, left open (keep-alive)."""
    sem = asyncio.Semaphore(200)
    writers: list[asyncio.StreamWriter] = []
    req = _request(gw, stream=False)

    async def one() -> None:
        async with sem:
            reader, writer = await asyncio.open_connection(HOST, gw.port)
            writer.write(req)
            status, length = await _read_head(reader)
            if status != 200 or length is None:
                raise SystemExit(f"bench_scale: idle setup answered {status}")
            await reader.readexactly(length)
            writers.append(writer)

    await asyncio.gather(*(one() for _ in range(n)))
    return writers


async def open_streams(gw: Gateway, n: int) -> list[asyncio.StreamWriter]:
    """n streams, each open and past its first event."""
    sem = asyncio.Semaphore(200)
    writers: list[asyncio.StreamWriter] = []
    req = _request(gw, stream=True)

    async def one() -> None:
        async with sem:
            reader, writer = await asyncio.open_connection(HOST, gw.port)
            writer.write(req)
            status, _ = await _read_head(reader)
            if status != 200:
                raise SystemExit(f"bench_scale: stream answered {status}")
            await reader.readuntil(b"data:")
            writers.append(writer)

    await asyncio.gather(*(one() for _ in range(n)))
    return writers


def settle_rss(pids: list[int]) -> int:
    """RSS once it stops moving (freed buffers, lazily touched pages)."""
    last = -1
    total = sum(rss_kib(p) for p in pids)
    for _ in range(20):
        if total == last:
            break
        last = total
        time.sleep(0.2)
        total = sum(rss_kib(p) for p in pids)
    return total


def idle_row(tmp: Path, n: int) -> dict[str, Any]:
    gw = Gateway(tmp, workers=1)
    try:
        pids = gw.workers()
        loop = asyncio.new_event_loop()
        loop.run_until_complete(open_idle(gw, 20))  # warm-up: pools and first-use allocations
        before = settle_rss(pids)
        writers = loop.run_until_complete(open_idle(gw, n))
        after = settle_rss(pids)
        for w in writers:
            w.close()
        loop.close()
        return {"connections": n, "rss_before_kib": before, "rss_after_kib": after,
                "kib_per_connection": (after - before) / n}
    finally:
        gw.stop()


def streams_row(tmp: Path, n: int, workers: int, gap_ms: int) -> dict[str, Any]:
    chunks = max(20, int(120_000 / max(gap_ms, 1)))  # streams last ~2 min: longer than the measurement
    gw = Gateway(tmp, workers=workers, gap_ms=gap_ms, chunks=chunks)
    try:
        pids = gw.workers()
        mock = gw.mock_pid()
        loop = asyncio.new_event_loop()
        warm = loop.run_until_complete(open_streams(gw, 20))
        for w in warm:
            w.close()
        before = settle_rss(pids)
        mock_before = rss_kib(mock) if mock else 0
        t0 = time.monotonic()
        writers = loop.run_until_complete(open_streams(gw, n))
        opened_s = time.monotonic() - t0
        after = settle_rss(pids)
        mock_after = rss_kib(mock) if mock else 0
        for w in writers:
            w.close()
        loop.close()
        return {"streams": n, "workers": workers, "opened_in_s": round(opened_s, 1),
                "rss_before_kib": before, "rss_after_kib": after, "kib_per_stream": (after - before) / n,
                "mock_kib_per_stream": (mock_after - mock_before) / n}
    finally:
        gw.stop()


def throughput_row(tmp: Path, seconds: float) -> dict[str, Any]:
    stack = bench.Stack(tmp=tmp)
    stack.mock_port = free_port()
    stack.mock = stack._start_nginx("mock", bench.LOADGEN_CPU, stack.mock_port)
    kind = KINDS["openai-json"]
    out: dict[str, Any] = {}
    try:
        for workers in (1, 2):
            gw = Gateway(tmp, workers=workers, upstream_base=f"http://{HOST}:{stack.mock_port}/json")
            try:
                url = f"http://{HOST}:{gw.port}{kind.path}"
                (tmp / f"wrk-{kind.name}.lua").unlink(missing_ok=True)  # the key differs per gateway
                script = wrk_script(tmp, kind, gw.key)
                run_wrk(url, script, 2, 50)  # warm-up
                pids = gw.workers()
                ticks0 = [cpu_ticks([p]) for p in pids]
                res = run_wrk(url, script, seconds, 100)
                ticks = [cpu_ticks([p]) - t0 for p, t0 in zip(pids, ticks0, strict=True)]
                out[f"rps_{workers}"] = res["requests"] / (res["duration_us"] / 1e6)
                # The work per request, and how evenly the kernel spread it over the workers:
                # with one core per worker the busiest one bounds throughput.
                out[f"cpu_us_per_request_{workers}"] = sum(ticks) * 1e6 / bench.CLK_TCK / max(res["requests"], 1)
                out[f"worker_cpu_shares_{workers}"] = [t / max(sum(ticks), 1) for t in ticks]
                out[f"errors_{workers}"] = res["connect"] + res["read"] + res["write"] + res["status"] + res["timeout"]
            finally:
                gw.stop()
        out["ratio_2_vs_1"] = out["rps_2"] / out["rps_1"]
        # What 2 workers give with a core each (not measurable here: the load generator and the
        # mock share the two cores): the per-request work ratio over the busiest worker's share.
        out["capacity_ratio_one_core_per_worker"] = (
            out["cpu_us_per_request_1"] / out["cpu_us_per_request_2"] / max(out["worker_cpu_shares_2"])
        )
    finally:
        stack.stop()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--idle", type=int, default=2000, help="idle keep-alive connections (one worker)")
    ap.add_argument("--streams", type=int, default=10000, help="concurrent open streams")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--gap-ms", type=int, default=1000, help="mock's gap between stream events")
    ap.add_argument("--seconds", type=float, default=10.0, help="wrk seconds per throughput row (0: skip)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    bench.ensure_tools()
    need = 3 * max(args.idle, args.streams) + 1000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(need, soft), hard), hard))
    report: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                              "command": " ".join(["loadtests/bench_scale.py", *(argv or sys.argv[1:])]),
                              "loadavg_start": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="gw-scale-") as tmp_s:
        tmp = Path(tmp_s)
        tmp.chmod(0o755)  # nginx workers read the bodies here
        if args.idle:
            report["idle"] = idle_row(tmp, args.idle)
            print(f"idle keep-alive: {report['idle']}", file=sys.stderr)
        if args.streams:
            report["streams"] = streams_row(tmp, args.streams, args.workers, args.gap_ms)
            print(f"open streams: {report['streams']}", file=sys.stderr)
        if args.seconds:
            report["throughput"] = throughput_row(tmp, args.seconds)
            print(f"throughput: {report['throughput']}", file=sys.stderr)
    report["loadavg_end"] = os.getloadavg()
    print(json.dumps(report, indent=2))
    out = Path(args.out) if args.out else bench.RESULTS / f"scale-{time.strftime('%Y-%m-%dT%H%M%SZ', time.gmtime())}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
