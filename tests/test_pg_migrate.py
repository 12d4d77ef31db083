"""Migrations: from empty, re-run, concurrent runs, and the refusal to start on an old schema."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest
from aiohttp.test_utils import TestServer

from gateway.app import create_app
from gateway.config import parse
from gateway.stores.migrate import MIGRATIONS_DIR, SchemaOutdated, discover, migrate
from tests.conftest import ROOT, gateway_toml


async def _versions(dsn: str) -> list[str]:
    conn = await asyncpg.connect(dsn)
    try:
        return [r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations ORDER BY version")]
    finally:
        await conn.close()


async def test_migrate_from_empty_applies_every_file_in_order_then_rerun_changes_nothing(pg_dsn):
    """`llm-gateway migrate` on an empty database applies all files; a second run applies none."""
    env = {"GATEWAY_DATABASE_URL": pg_dsn, "PATH": "/usr/bin:/bin"}
    first = subprocess.run([sys.executable, "-m", "gateway", "migrate"], env=env, cwd=ROOT,
                           capture_output=True, text=True, check=True)
    expected = [m.version for m in discover()]
    assert expected == await _versions(pg_dsn)
    assert "0001_users.sql" in first.stdout
    second = subprocess.run([sys.executable, "-m", "gateway", "migrate"], env=env, cwd=ROOT,
                            capture_output=True, text=True, check=True)
    assert "(0 applied)" in second.stdout
    assert expected == await _versions(pg_dsn)


async def test_two_concurrent_migrate_runs_apply_each_migration_once(pg_dsn):
    """Two gateways migrating at once: the advisory lock serialises them, nothing fails or doubles."""
    conns = [await asyncpg.connect(pg_dsn) for _ in range(2)]
    try:
        results = await asyncio.gather(*(migrate(c) for c in conns))
    finally:
        for c in conns:
            await c.close()
    applied = sorted(results[0] + results[1])
    assert sorted(m.name for m in discover()) == applied
    assert [m.version for m in discover()] == await _versions(pg_dsn)


async def test_gateway_refuses_to_start_on_an_older_schema(pg_dsn, tmp_path: Path, make_gateway, mock_upstream,
                                                           monkeypatch):
    """A database missing a migration stops the gateway with 'run llm-gateway migrate'."""
    partial = tmp_path / "migrations"
    partial.mkdir()
    for f in sorted(MIGRATIONS_DIR.glob("*.sql"))[:2]:
        shutil.copy(f, partial / f.name)
    conn = await asyncpg.connect(pg_dsn)
    try:
        await migrate(conn, partial)
    finally:
        await conn.close()
    monkeypatch.setenv("GATEWAY_DATABASE_URL", pg_dsn)
    server = TestServer(create_app(parse(gateway_toml(mock_upstream.base_url), source=str(ROOT / "config" / "t.toml"))))
    try:
        with pytest.raises(SchemaOutdated, match="llm-gateway migrate"):
            await server.start_server()
    finally:
        await server.close()


async def test_gateway_starts_on_a_current_schema(pg_env, make_gateway, mock_upstream):
    """After migrate, the gateway starts in database mode and serves its health check."""
    client = await make_gateway(gateway_toml(mock_upstream.base_url))
    r = await client.get("/healthz")
    assert 200 == r.status
