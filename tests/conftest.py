"""Shared fixtures: throwaway Postgres/Redis, the mock upstream, gateways.

Every server a test talks to is real: a private Postgres cluster and Redis
started from the installed binaries, the mock upstream as a real aiohttp
server, the gateway in-process (aiohttp test server) or as a real
``llm-gateway serve`` subprocess.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import uvloop
from aiohttp.test_utils import TestClient, TestServer

from gateway.app import create_app
from gateway.config import MockUpstreamConfig, parse
from gateway.mock.upstream import create_mock_app
from tests.fixtures.http import GatewayTestServer
from tests.fixtures.servers import PostgresServer, RedisClusterServers, RedisServer, free_port, wait_port

ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = ROOT / "config"


def pytest_asyncio_loop_factories(config: Any, item: Any) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Run the suite under uvloop, as production does."""
    return {"uvloop": uvloop.new_event_loop}


# ---------------------------------------------------------------- databases


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    server = PostgresServer()
    server.start()
    yield server
    server.destroy()


@pytest.fixture
def pg_dsn(pg_server: PostgresServer) -> str:
    """A fresh, empty database on the session's cluster (started if a test stopped it)."""
    try:
        wait_port(pg_server.port, timeout=2.0)
    except TimeoutError:
        pg_server.start()
    return pg_server.create_database("t_" + secrets.token_hex(6))


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    yield server
    server.destroy()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The session's Redis, emptied (and restarted if a test stopped it)."""
    if redis_server.proc is None or redis_server.proc.poll() is not None:
        redis_server.start()
    subprocess.run(["redis-cli", "-p", str(redis_server.port), "flushall"], check=True, capture_output=True)
    return redis_server.url


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterServers]:
    """A 3-node Redis Cluster (started once per session, on demand)."""
    cluster = RedisClusterServers()
    cluster.start()
    yield cluster
    cluster.destroy()


@pytest.fixture
def redis_cluster_url(redis_cluster: RedisClusterServers) -> str:
    """The session's Redis Cluster, emptied; connect with redis.topology = "cluster"."""
    redis_cluster.flushall()
    return redis_cluster.url


# ---------------------------------------------------------------- mock upstream


class MockUpstream:
    def __init__(self, server: TestServer) -> None:
        self.server = server
        self.base_url = f"http://127.0.0.1:{server.port}"

    async def requests(self) -> list[dict[str, Any]]:
        async with aiohttp.ClientSession() as s, s.get(self.base_url + "/_mock/requests") as r:
            return await r.json()  # type: ignore[no-any-return]

    async def stats(self) -> dict[str, int]:
        async with aiohttp.ClientSession() as s, s.get(self.base_url + "/_mock/stats") as r:
            return await r.json()  # type: ignore[no-any-return]


@pytest.fixture
async def cancelling_mock() -> AsyncIterator[MockUpstream]:
    """The mock as ``llm-gateway mock-upstream`` runs it: a dropped connection cancels its handler."""
    server = TestServer(create_mock_app(MockUpstreamConfig(chunks=5)), host="127.0.0.1", handler_cancellation=True)
    await server.start_server()
    yield MockUpstream(server)
    await server.close()


@pytest.fixture
async def mock_upstream() -> AsyncIterator[MockUpstream]:
    server = TestServer(create_mock_app(MockUpstreamConfig(chunks=5)), host="127.0.0.1")
    await server.start_server()
    yield MockUpstream(server)
    await server.close()


# ---------------------------------------------------------------- config + gateways

TEST_KEY = "gwk_test_" + "a" * 32
OTHER_KEY = "gwk_test_" + "b" * 32


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def gateway_toml(upstream_url: str, *, port: int = 0, extra: str = "", workers: int = 1) -> str:
    """A config routing demo-* and test-* to the mock upstream, with two test keys."""
    prices = CONFIG_DIR / "prices.toml"
    return textwrap.dedent(
        f"""
        [server]
        host = "127.0.0.1"
        port = {port}
        workers = {workers}
        drain_seconds = 10
        worker_ping_seconds = 2  # hung after 3 missed pings (6 s): a loaded machine is slow, not hung
        forward_headers = ["x-mock-*"]  # the mock upstream's per-request switches

        [pricing]
        file = "{prices}"

        [upstreams.mock-anthropic]
        provider = "anthropic"
        base_url = "{upstream_url}"
        api_key_env = "TEST_ANTHROPIC_KEY"
        first_byte_timeout = 5
        idle_timeout = 2

        [upstreams.mock-openai]
        provider = "openai"
        base_url = "{upstream_url}"
        api_key_env = "TEST_OPENAI_KEY"
        first_byte_timeout = 5
        idle_timeout = 2

        [[routes]]
        match = "demo-*"
        deployments = [{{ upstream = "mock-anthropic" }}, {{ upstream = "mock-openai" }}]

        [[keys]]
        name = "test"
        key_sha256 = "{sha(TEST_KEY)}"

        [[keys]]
        name = "other"
        user = "other-user"
        key_sha256 = "{sha(OTHER_KEY)}"
        limits = {{ models = ["demo-allowed-*"] }}
        """
    ) + textwrap.dedent(extra)


@pytest.fixture(autouse=True)
def _provider_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_ANTHROPIC_KEY", "sk-ant-upstream-secret")
    monkeypatch.setenv("TEST_OPENAI_KEY", "sk-openai-upstream-secret")


GatewayFactory = Callable[..., Any]


@pytest.fixture
async def make_gateway() -> AsyncIterator[GatewayFactory]:
    """Start an in-process gateway from TOML text; returns an aiohttp TestClient."""
    clients: list[TestClient[Any, Any]] = []

    async def factory(toml_text: str) -> TestClient[Any, Any]:
        cfg = parse(toml_text, source=str(CONFIG_DIR / "test.toml"))
        app = create_app(cfg)
        server = GatewayTestServer(app, host="127.0.0.1")
        client: TestClient[Any, Any] = TestClient(server)
        await client.start_server()
        clients.append(client)
        return client

    yield factory
    for c in clients:
        await c.close()


@pytest.fixture
async def gateway(make_gateway: GatewayFactory, mock_upstream: MockUpstream) -> TestClient[Any, Any]:
    return await make_gateway(gateway_toml(mock_upstream.base_url))  # type: ignore[no-any-return]


# ---------------------------------------------------------------- real processes


class ServeProcess:
    """``llm-gateway serve`` as a subprocess, with its stdout captured to a file."""

    def __init__(self, config_path: Path, port: int, workers: int, env: dict[str, str]) -> None:
        self.port = port
        self.log_path = config_path.with_suffix(".log")
        self._log = open(self.log_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--config", str(config_path), "--workers", str(workers)],
            stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
        )
        self.base_url = f"http://127.0.0.1:{port}"

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited {self.proc.returncode}:\n{self.log_text()}")
            if b'"gateway serving"' in self.log_path.read_bytes():
                return
            time.sleep(0.05)
        raise TimeoutError(f"serve not ready:\n{self.log_text()}")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., ServeProcess]]:
    """Start real ``llm-gateway serve`` processes from TOML (port filled in)."""
    procs: list[ServeProcess] = []

    def start(toml_text: str, workers: int = 2, env: dict[str, str] | None = None, port: int | None = None) -> ServeProcess:
        port = port or free_port()
        path = tmp_path / f"gateway-{len(procs)}.toml"
        path.write_text(toml_text.replace("port = 0", f"port = {port}", 1))
        full_env = {**os.environ, **(env or {})}
        p = ServeProcess(path, port, workers, full_env)
        procs.append(p)
        p.wait_ready()
        return p

    yield start
    for p in procs:
        p.stop()


def run_async(coro: Any) -> Any:
    return asyncio.get_event_loop().run_until_complete(coro)


# Cloud kinds' fakes and credential environments (bedrock, vertex, azure-openai): tests/fixtures/clouds.py
from tests.fixtures.clouds import aws_env, aws_keys, azure, bedrock, imds, sdk, vertex  # noqa: E402, F401

# Control-plane fixtures (migrated database, gateway in database mode): tests/fixtures/control_plane.py
from tests.fixtures.control_plane import cp, db_url, pg_env  # noqa: E402, F401
