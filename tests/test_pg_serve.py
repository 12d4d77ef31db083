"""Real `llm-gateway serve` with 2 workers on Postgres: revocation everywhere in 1 s, no secret in logs."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import orjson
import pytest

from tests.conftest import gateway_toml
from tests.fixtures.control_plane import ADMIN, ADMIN_TOKEN, JWT_SECRET, PASSWORD, call_model, pg_toml

pytestmark = pytest.mark.slow


async def _fresh(base: str, method: str, path: str, **kw) -> tuple[int, dict]:
    """One request on a new connection (so that the kernel may hand it to any worker)."""
    async with aiohttp.ClientSession() as s, s.request(method, base + path, **kw) as r:
        body = await r.read()
        return r.status, (orjson.loads(body) if body and r.content_type == "application/json" else {})


def _workers_with(log_text: str, prefix: str, status: int) -> set[int]:
    seen = set()
    for line in log_text.splitlines():
        if not line.startswith("{"):
            continue
        doc = orjson.loads(line)
        if doc.get("event") == "request" and doc.get("key") == prefix and doc.get("status") == status:
            seen.add(doc.get("worker"))
    return seen


async def _spread(proc, key: str, prefix: str, status: int, deadline_s: float = 20.0) -> None:
    """Send requests on fresh connections until both workers have answered ``status`` for this key."""
    deadline = time.monotonic() + deadline_s
    msg = {"model": "demo-claude", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    while _workers_with(proc.log_text(), prefix, status) != {0, 1}:
        assert time.monotonic() < deadline, f"both workers never answered {status}"
        got, _ = await _fresh(proc.base_url, "POST", f"/ak/{key}/v1/messages", json=msg,
                              headers={"anthropic-version": "2023-06-01"})
        assert status == got
        await asyncio.sleep(0.01)


async def test_revoked_key_is_401_on_both_workers_and_a_second_instance_within_one_second_and_logs_hold_no_secret(
        serve, pg_env, make_gateway, mock_upstream):
    """Create a key and log in over HTTP on a 2-worker serve; revoke; 1 s later every worker and a
    second gateway answer 401; the serve log never contains the key, password or any token."""
    env = {"GATEWAY_DATABASE_URL": pg_env, "GATEWAY_JWT_SECRET": JWT_SECRET, "GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN}
    proc = serve(gateway_toml(mock_upstream.base_url), workers=2, env=env)
    other = await make_gateway(pg_toml(mock_upstream.base_url))
    base = proc.base_url

    status, user = await _fresh(base, "POST", "/admin/users", headers=ADMIN,
                                json={"email": "srv@example.com", "password": PASSWORD})
    assert 201 == status
    status, key = await _fresh(base, "POST", "/admin/keys", headers=ADMIN, json={"user_id": user["id"]})
    assert 201 == status
    status, tokens = await _fresh(base, "POST", "/auth/login", json={"email": "srv@example.com", "password": PASSWORD})
    assert 200 == status
    status, tokens2 = await _fresh(base, "POST", "/auth/refresh", json={"refresh_token": tokens["refresh_token"]})
    assert 200 == status
    status, _ = await _fresh(base, "GET", "/me", headers={"authorization": f"Bearer {tokens2['access_token']}"})
    assert 200 == status

    await _spread(proc, key["key"], key["prefix"], 200)  # cached in both workers
    assert 200 == await call_model(other, key["key"])  # and in the second instance

    status, _ = await _fresh(base, "DELETE", f"/admin/keys/{key['id']}", headers=ADMIN)
    assert 204 == status
    deadline = time.monotonic() + 20  # NOTIFY is asynchronous; the key cache's TTL (60 s) is far beyond
    while (got := await call_model(other, key["key"])) != 401:
        assert time.monotonic() < deadline, f"the second instance still answers {got} for a revoked key"
        await asyncio.sleep(0.05)
    # Every request from now on, whichever worker takes it, is refused; both workers must show it.
    deadline = time.monotonic() + 20
    msg = {"model": "demo-claude", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    while True:
        got, _ = await _fresh(base, "POST", "/v1/messages", json=msg,
                              headers={"x-api-key": key["key"], "anthropic-version": "2023-06-01"})
        assert 401 == got
        lines = proc.log_text()
        refused = set()
        for line in lines.splitlines():
            if line.startswith("{"):
                doc = orjson.loads(line)
                if doc.get("event") == "request" and doc.get("status") == 401 and doc.get("path") == "/v1/messages":
                    refused.add(doc.get("worker"))
        if refused == {0, 1}:
            break
        assert time.monotonic() < deadline

    proc.stop()
    text = proc.log_text()
    for secret in (key["key"], PASSWORD, tokens["access_token"], tokens["refresh_token"],
                   tokens2["access_token"], tokens2["refresh_token"], ADMIN_TOKEN, JWT_SECRET):
        assert secret not in text
    assert key["key"][len(key["prefix"]):] not in text
