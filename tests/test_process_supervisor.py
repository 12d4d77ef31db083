"""``llm-gateway serve`` as real processes: a supervisor, uvloop workers, real signals.

Each test starts a real ``llm-gateway serve`` (the ``serve`` fixture) in front
of the in-process mock upstream, sends real HTTP and real signals, and reads
what the processes did from /proc and from their JSON log lines.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from gateway import keys
from tests.conftest import TEST_KEY, MockUpstream, ServeProcess, gateway_toml

pytestmark = pytest.mark.slow

ANTHROPIC = {"x-api-key": TEST_KEY, "anthropic-version": "2023-06-01"}
EXTRA_ROUTE = """
[[routes]]
match = "extra-*"
deployments = [{ upstream = "mock-anthropic" }]
"""


def body(model: str = "demo-claude", stream: bool = False) -> dict[str, Any]:
    return {"model": model, "max_tokens": 10, "stream": stream, "messages": [{"role": "user", "content": "hi"}]}


def log_events(p: ServeProcess, name: str) -> list[dict[str, Any]]:
    """The JSON log lines of the supervisor and its workers whose event is ``name``."""
    found = []
    for line in p.log_path.read_bytes().splitlines():
        try:
            rec = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if isinstance(rec, dict) and rec.get("event") == name:
            found.append(rec)
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def workers_of(p: ServeProcess) -> set[int]:
    """The live child processes of the supervisor (the workers: these configs run no mock child)."""
    pid = p.proc.pid
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except FileNotFoundError:
        return set()
    return {int(k) for k in kids if alive(int(k))}


async def eventually(check: Callable[[], Any], what: str, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def one_request(base_url: str, model: str = "demo-claude") -> int:
    """A non-streamed message on a fresh connection (so it goes through the accept queue)."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s, s.post(
        base_url + "/v1/messages", headers=ANTHROPIC, json=body(model)
    ) as r:
        await r.read()
        return r.status


async def read_stream(resp: aiohttp.ClientResponse) -> list[str]:
    """The SSE event names of a streamed Anthropic answer, in order."""
    names = []
    async for line in resp.content:
        if line.startswith(b"event: "):
            names.append(line[7:].strip().decode())
    return names


# ---------------------------------------------------------------- serving


async def test_serve_runs_the_requested_workers_and_answers_both_dialects(serve, mock_upstream: MockUpstream):
    """``serve --workers 2`` runs two worker processes that answer Anthropic and OpenAI calls, streamed or not."""
    p = serve(gateway_toml(mock_upstream.base_url), workers=2)
    assert 2 == len(workers_of(p))
    assert 2 == len(log_events(p, "worker ready"))
    async with aiohttp.ClientSession() as s:
        async with s.post(p.base_url + "/v1/messages", headers=ANTHROPIC, json=body()) as r:
            assert 200 == r.status
            assert "message" == (await r.json())["type"]
        async with s.post(p.base_url + "/v1/messages", headers=ANTHROPIC, json=body(stream=True)) as r:
            assert 200 == r.status
            assert "message_stop" == (await read_stream(r))[-1]
        async with s.post(
            p.base_url + "/v1/chat/completions",
            headers={"authorization": f"Bearer {TEST_KEY}"},
            json={"model": "demo-gpt", "messages": [{"role": "user", "content": "hi"}]},
        ) as r:
            assert 200 == r.status
            assert "chat.completion" == (await r.json())["object"]


def test_default_worker_count_is_one_per_usable_core(tmp_path: Path):
    """Without ``--workers`` or ``server.workers`` the supervisor plans one worker per core it may run on."""
    from gateway.config import parse
    from gateway.observability import multiproc
    from gateway.supervisor import Supervisor, default_workers

    toml = gateway_toml("http://127.0.0.1:9").replace("workers = 1", "workers = 0")
    path = tmp_path / "g.toml"
    path.write_text(toml)
    env = {**os.environ, multiproc.ENV: str(tmp_path / "metrics")}
    sup = Supervisor(parse(toml, source=str(path)), str(path), environ=env)
    try:
        assert len(os.sched_getaffinity(0)) == default_workers() == sup.current.size
    finally:
        sup.sock.close()
    pinned = Supervisor(parse(toml, source=str(path)), str(path), workers=3, environ=env)
    pinned.sock.close()
    assert 3 == pinned.current.size


async def test_draining_app_tells_clients_to_close_their_connections(gateway):
    """While draining, plain and streamed responses carry ``Connection: close`` (no client reuses a closing connection)."""
    r = await gateway.get("/healthz")
    assert "close" != r.headers.get("connection", "").lower()
    gateway.server.app[keys.DRAINING][0] = True
    r = await gateway.get("/healthz")
    assert "close" == r.headers["connection"].lower()
    r = await gateway.post("/v1/messages", headers=ANTHROPIC, json=body(stream=True))
    assert "close" == r.headers["connection"].lower()
    assert "message_stop" == (await read_stream(r))[-1]


# ---------------------------------------------------------------- SIGTERM


async def test_sigterm_finishes_an_open_stream_refuses_new_connections_and_exits_zero(serve, mock_upstream):
    """SIGTERM: the port stops accepting at once, an open SSE stream still ends with message_stop, all exit 0."""
    p = serve(gateway_toml(mock_upstream.base_url), workers=2)
    slow = {**ANTHROPIC, "x-mock-chunks": "20", "x-mock-chunk-gap-ms": "150"}  # about 3 s
    async with aiohttp.ClientSession() as s, s.post(
        p.base_url + "/v1/messages", headers=slow, json=body(stream=True)
    ) as r:
        assert 200 == r.status
        first = await r.content.readline()
        assert b"event: message_start" == first.strip()
        p.signal(signal.SIGTERM)

        async def refused() -> bool:
            try:
                _, w = await asyncio.open_connection("127.0.0.1", p.port)
            except ConnectionRefusedError:
                return True
            w.close()
            return False

        deadline = time.monotonic() + 20
        while not await refused():
            assert time.monotonic() < deadline, "the port kept accepting after SIGTERM"
            await asyncio.sleep(0.05)
        assert not r.content.at_eof(), "the stream should still be open while the port refuses"
        names = ["message_start", *await read_stream(r)]
    assert "message_stop" == names[-1]
    assert 20 == names.count("content_block_delta")
    await eventually(lambda: p.proc.poll() is not None, "the supervisor to exit")
    assert 0 == p.proc.returncode
    exits = log_events(p, "worker exited")
    assert [0, 0] == [e["code"] for e in exits]
    assert 1 == len(log_events(p, "stopped"))


# ---------------------------------------------------------------- SIGHUP


async def test_sighup_applies_a_new_route_under_traffic_with_no_failed_request(serve, mock_upstream):
    """SIGHUP with a changed file: a new worker generation takes over on the same socket, the old one
    drains, every request under continuous traffic (keep-alive and new connections, streamed or not)
    succeeds, and the new route answers afterwards."""
    p = serve(gateway_toml(mock_upstream.base_url), workers=2)
    config = p.log_path.with_suffix(".toml")
    old_workers = workers_of(p)
    assert 404 == await one_request(p.base_url, "extra-model")

    failures: list[str] = []
    done = 0
    stop = asyncio.Event()

    async def client(s: aiohttp.ClientSession, n: int) -> None:
        nonlocal done
        while not stop.is_set():
            stream = n % 2 == 1
            headers = {**ANTHROPIC, "x-mock-latency-ms": "20", "x-mock-chunks": "4", "x-mock-chunk-gap-ms": "10"}
            try:
                async with s.post(p.base_url + "/v1/messages", headers=headers, json=body(stream=stream)) as r:
                    if stream:
                        names = await read_stream(r)
                        ok = 200 == r.status and names[-1:] == ["message_stop"]
                    else:
                        ok = 200 == r.status and "message" == (await r.json())["type"]
            except (TimeoutError, aiohttp.ClientError) as exc:
                failures.append(repr(exc))
                continue
            if not ok:
                failures.append(f"status {r.status}")
            done += 1

    # Keep-alive clients (as SDKs are) and clients opening a connection per request (through the accept
    # queue that the old workers leave and the new ones join).
    async with aiohttp.ClientSession() as s, aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(force_close=True)
    ) as fresh:
        clients = [asyncio.create_task(client(s if n < 4 else fresh, n)) for n in range(8)]
        await eventually(lambda: done >= 8, "traffic before the reload")
        before = done
        config.write_text(gateway_toml(mock_upstream.base_url, port=p.port, workers=2, extra=EXTRA_ROUTE))
        p.signal(signal.SIGHUP)
        await eventually(lambda: log_events(p, "reloaded"), "the reload")
        await eventually(lambda: 2 == len(log_events(p, "worker exited")), "the old workers to drain")
        after = done
        await eventually(lambda: done >= after + 8, "traffic after the reload")
        stop.set()
        await asyncio.gather(*clients)
    assert [] == failures
    assert done > before > 0
    assert 200 == await one_request(p.base_url, "extra-model")
    new_workers = workers_of(p)
    assert 2 == len(new_workers)
    assert set() == new_workers & old_workers
    assert [0, 0] == [e["code"] for e in log_events(p, "worker exited")]


async def test_sighup_with_an_invalid_file_keeps_the_workers_and_logs_every_error(serve, mock_upstream):
    """SIGHUP with a broken file: every error is logged, the same workers keep serving the old routes."""
    p = serve(gateway_toml(mock_upstream.base_url), workers=2)
    config = p.log_path.with_suffix(".toml")
    before = workers_of(p)
    broken = gateway_toml(mock_upstream.base_url, port=p.port, extra=EXTRA_ROUTE).replace(
        "drain_seconds = 10", "drain_seconds = 10\nbogus_setting = 1"
    ).replace('[{ upstream = "mock-anthropic" }]\n', '[{ upstream = "nowhere" }]\n')
    config.write_text(broken)
    p.signal(signal.SIGHUP)
    refused = await eventually(
        lambda: log_events(p, "reload refused: invalid configuration; keeping the running workers"), "the refusal"
    )
    errors = refused[0]["errors"]
    assert 2 <= len(errors)
    assert any("bogus_setting" in e for e in errors)
    assert any("nowhere" in e for e in errors)
    assert 200 == await one_request(p.base_url)
    assert 404 == await one_request(p.base_url, "extra-model")
    assert before == workers_of(p)
    assert [] == log_events(p, "worker started")[2:]


# ---------------------------------------------------------------- dead and hung workers


async def test_a_killed_worker_is_replaced_and_requests_keep_succeeding(serve, mock_upstream):
    """SIGKILL to a worker: the others keep answering, and the supervisor starts a replacement."""
    p = serve(gateway_toml(mock_upstream.base_url), workers=2)
    victim, survivor = sorted(workers_of(p))
    os.kill(victim, signal.SIGKILL)
    await eventually(lambda: not alive(victim), "the worker to die")
    assert [200] * 10 == [await one_request(p.base_url) for _ in range(10)]
    replaced = await eventually(lambda: log_events(p, "worker died; replacing"), "the replacement")
    assert victim == replaced[0]["pid"]
    await eventually(lambda: 3 == len(log_events(p, "worker ready")), "the replacement to be ready")
    now = workers_of(p)
    assert 2 == len(now)
    assert victim not in now
    assert survivor in now
    assert [200] * 4 == [await one_request(p.base_url) for _ in range(4)]


async def test_a_hung_worker_is_detected_by_missed_heartbeats_and_replaced(serve, mock_upstream):
    """A stopped worker (SIGSTOP) misses heartbeats: the supervisor kills and replaces it; requests still succeed."""
    p = serve(gateway_toml(mock_upstream.base_url), workers=2)
    victim = min(workers_of(p))
    os.kill(victim, signal.SIGSTOP)
    assert [200] * 4 == [await one_request(p.base_url) for _ in range(4)]
    hung = await eventually(lambda: log_events(p, "worker hung; killing"), "hang detection")
    assert victim == hung[0]["pid"]
    await eventually(lambda: 3 == len(log_events(p, "worker ready")), "the replacement to be ready")
    assert victim not in workers_of(p)
    assert 2 == len(workers_of(p))
    assert 200 == await one_request(p.base_url)


async def test_a_killed_supervisor_leaves_no_orphan_workers(serve, mock_upstream, tmp_path: Path):
    """SIGKILL to the supervisor: its workers notice (parent-death signal, broken pipe) and exit."""
    metrics_dir = {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics")}  # nobody is left to remove it
    p = serve(gateway_toml(mock_upstream.base_url), workers=2, env=metrics_dir)
    kids = workers_of(p)
    assert 2 == len(kids)
    p.proc.kill()
    p.proc.wait()
    await eventually(lambda: not any(alive(k) for k in kids), "the workers to exit")


# ---------------------------------------------------------------- systemd


async def test_sd_notify_ready_reloading_watchdog_and_stopping(serve, mock_upstream, tmp_path: Path):
    """Under systemd (a real NOTIFY_SOCKET): READY=1 once serving, RELOADING=1 then READY=1 on HUP,
    WATCHDOG=1 pings when WATCHDOG_USEC asks for them, STOPPING=1 on TERM."""
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.setblocking(False)
    messages: list[dict[str, str]] = []

    def received() -> list[dict[str, str]]:
        try:
            while True:
                lines = sock.recv(4096).decode().splitlines()
                messages.append(dict(line.split("=", 1) for line in lines))
        except BlockingIOError:
            pass
        return messages

    try:
        p = serve(gateway_toml(mock_upstream.base_url), workers=1, env={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "400000"})
        await eventually(lambda: any("READY" in m for m in received()), "READY=1")
        assert "1" == next(m for m in messages if "READY" in m)["READY"]
        p.signal(signal.SIGHUP)
        await eventually(lambda: sum("READY" in m for m in received()) == 2, "READY=1 after the reload")
        states = [k for m in messages for k in m if k in ("READY", "RELOADING", "STOPPING")]
        assert ["READY", "RELOADING", "READY"] == states
        assert int(next(m for m in messages if "RELOADING" in m)["MONOTONIC_USEC"]) > 0
        await eventually(lambda: any("WATCHDOG" in m for m in received()), "WATCHDOG=1")
        assert 0 == p.stop()
        received()
        states = [k for m in messages for k in m if k in ("READY", "RELOADING", "STOPPING")]
        assert ["READY", "RELOADING", "READY", "STOPPING"] == states
    finally:
        sock.close()
