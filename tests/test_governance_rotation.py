"""Key rotation: POST /admin/keys/{id}/rotate -- new secret, same key, old secret on a grace period."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime

import aiohttp
import asyncpg
import orjson
import pytest

from tests.conftest import gateway_toml
from tests.fixtures.control_plane import (
    ADMIN,
    ADMIN_TOKEN,
    JWT_SECRET,
    bearer,
    call_model,
    create_key,
    create_user,
    login,
)


async def _until(cond, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not await cond():
        assert time.monotonic() < deadline, "condition never held"
        await asyncio.sleep(0.05)


async def test_rotation_keeps_the_key_id_limits_and_counters_and_the_old_secret_works_until_grace_ends(cp, db_url):
    """The rotated key keeps id and limits; old and new secret share the rpm counter; after
    the grace period the old secret is refused with 401 and the new one keeps working."""
    user = await create_user(cp, "rot@example.com")
    key = await create_key(cp, user["id"], limits={"rpm": 3})
    assert 200 == await call_model(cp, key["key"])

    r = await cp.post(f"/admin/keys/{key['id']}/rotate", headers=ADMIN, json={"grace_seconds": 2})
    assert 201 == r.status, await r.text()
    rotated = await r.json()
    assert key["id"] == rotated["id"]
    assert {"rpm": 3} == {k: v for k, v in rotated["limits"].items() if v is not None}
    assert rotated["key"] != key["key"] and rotated["key"].startswith("gwk_")
    assert key["prefix"] == rotated["previous_prefix"]
    until = datetime.fromisoformat(rotated["previous_valid_until"]).timestamp()

    assert 200 == await call_model(cp, key["key"])  # old secret, within grace
    assert 200 == await call_model(cp, rotated["key"])  # new secret: third request this minute
    assert 429 == await call_model(cp, key["key"])  # one rpm counter for both secrets

    await _until(lambda: _past(until))
    assert 401 == await call_model(cp, key["key"])
    conn = await asyncpg.connect(db_url)
    try:
        actions = [r["action"] for r in await conn.fetch("SELECT action FROM audit_log WHERE target_id = $1",
                                                             key["id"])]
        text = orjson.dumps([dict(r) for r in await conn.fetch("SELECT details FROM audit_log")]).decode()
    finally:
        await conn.close()
    assert "key.rotate" in actions
    assert rotated["key"] not in text and key["key"] not in text


async def _past(t: float) -> bool:
    return time.time() > t


async def test_rotation_input_is_validated_and_scoped(cp):
    """grace_seconds must be 0..30 days; unknown fields 400; a user rotates only their own keys
    (another user's key is 404 on /me and 403 on /admin); a revoked key cannot be rotated."""
    alice = await create_user(cp, "alice-rot@example.com")
    bob = await create_user(cp, "bob-rot@example.com")
    akey = await create_key(cp, alice["id"])
    bkey = await create_key(cp, bob["id"])
    for body in ({"grace_seconds": -1}, {"grace_seconds": "1"}, {"grace_seconds": 31 * 86400}, {"x": 1}):
        r = await cp.post(f"/admin/keys/{akey['id']}/rotate", headers=ADMIN, json=body)
        assert 400 == r.status, body
    tokens = await login(cp, "alice-rot@example.com")
    r = await cp.post(f"/me/keys/{bkey['id']}/rotate", headers=bearer(tokens["access_token"]))
    assert 404 == r.status
    r = await cp.post(f"/admin/keys/{bkey['id']}/rotate", headers=bearer(tokens["access_token"]))
    assert 403 == r.status
    r = await cp.post(f"/me/keys/{akey['id']}/rotate", headers=bearer(tokens["access_token"]),
                      json={"grace_seconds": 0})
    assert 201 == r.status
    new = (await r.json())["key"]
    assert 401 == await call_model(cp, akey["key"])  # grace 0: the old secret is dead at once
    assert 200 == await call_model(cp, new)
    assert 204 == (await cp.delete(f"/admin/keys/{akey['id']}", headers=ADMIN)).status
    assert 401 == await call_model(cp, new)
    assert 404 == (await cp.post(f"/admin/keys/{akey['id']}/rotate", headers=ADMIN)).status


async def test_a_second_rotation_ends_the_first_grace_no_later_than_its_own(cp):
    """Rotating twice with a shorter grace shortens the first old secret's grace too."""
    user = await create_user(cp, "twice@example.com")
    key = await create_key(cp, user["id"])
    r1 = await (await cp.post(f"/admin/keys/{key['id']}/rotate", headers=ADMIN)).json()  # default 24 h
    assert 200 == await call_model(cp, key["key"])
    r2 = await cp.post(f"/admin/keys/{key['id']}/rotate", headers=ADMIN, json={"grace_seconds": 0})
    assert 201 == r2.status
    new = (await r2.json())["key"]
    assert 401 == await call_model(cp, key["key"])
    assert 401 == await call_model(cp, r1["key"])
    assert 200 == await call_model(cp, new)


async def _fresh_call(base: str, key: str) -> int:
    msg = {"model": "demo-claude", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    async with aiohttp.ClientSession() as s, s.post(
            base + "/v1/messages", json=msg, headers={"x-api-key": key, "anthropic-version": "2023-06-01"}) as r:
        await r.read()
        return r.status


def _workers(log_text: str, prefix: str, status: int) -> set[int]:
    seen = set()
    for line in log_text.splitlines():
        if line.startswith("{"):
            doc = orjson.loads(line)
            if doc.get("event") == "request" and doc.get("key") == prefix and doc.get("status") == status:
                seen.add(doc.get("worker"))
    return seen


@pytest.mark.slow
async def test_rotation_grace_ends_on_every_worker_within_a_second(serve, pg_env, mock_upstream):
    """Real 2-worker serve: both workers cache the old secret, the key is rotated with a 4 s grace;
    both keep accepting it until then, and from one second after the grace every request with it,
    whichever worker takes it, is 401 while the new secret answers 200."""
    env = {"GATEWAY_DATABASE_URL": pg_env, "GATEWAY_JWT_SECRET": JWT_SECRET, "GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN}
    proc = serve(gateway_toml(mock_upstream.base_url), workers=2, env=env)
    base = proc.base_url
    async with aiohttp.ClientSession() as s:
        async with s.post(base + "/admin/users", headers=ADMIN, json={"email": "w@example.com"}) as r:
            user = await r.json()
        async with s.post(base + "/admin/keys", headers=ADMIN, json={"user_id": user["id"]}) as r:
            key = await r.json()
    deadline = time.monotonic() + 20
    while _workers(proc.log_text(), key["prefix"], 200) != {0, 1}:
        assert time.monotonic() < deadline
        assert 200 == await _fresh_call(base, key["key"])
    async with aiohttp.ClientSession() as s, s.post(
            f"{base}/admin/keys/{key['id']}/rotate", headers=ADMIN, json={"grace_seconds": 4}) as r:
        assert 201 == r.status
        rotated = await r.json()
    until = datetime.fromisoformat(rotated["previous_valid_until"]).timestamp()
    # Within grace, fresh connections (either worker) still accept the old secret.
    while time.time() < until - 1.5:
        assert 200 == await _fresh_call(base, key["key"])
        await asyncio.sleep(0.05)
    while time.time() < until + 1.0:
        await asyncio.sleep(0.05)
    deadline = time.monotonic() + 20
    while _workers(proc.log_text(), key["prefix"], 401) != {0, 1}:
        assert time.monotonic() < deadline, "both workers never refused the old secret"
        assert 401 == await _fresh_call(base, key["key"])
    assert 200 == await _fresh_call(base, rotated["key"])
    proc.stop()
    assert rotated["key"] not in proc.log_text() and key["key"] not in proc.log_text()
