"""Concurrent login guessing: the attempt is reserved in Postgres before any password is hashed.

120 parallel wrong passwords for one email over HTTP: at most the limit (5)
are evaluated (401), every other one is refused unevaluated (429); a correct
password sent while the burst is under way is refused as well.
"""

from __future__ import annotations

import asyncio
import time

import asyncpg

from gateway.auth.throttle import subjects
from tests.fixtures.control_plane import PASSWORD, create_user

LIMIT = 5  # auth.login_max_failures default
BURST = 120


async def _login(cp, email: str, password: str) -> int:
    r = await cp.post("/auth/login", json={"email": email, "password": password})
    await r.read()
    return r.status


async def _wait_locked(db_url: str, email: str, timeout: float = 30.0) -> None:
    conn = await asyncpg.connect(db_url)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if await conn.fetchval("SELECT locked_until > now() FROM login_throttle WHERE subject = $1",
                                   subjects(email, "")[0]):
                return
            await asyncio.sleep(0.01)
        raise TimeoutError("the email was never locked")
    finally:
        await conn.close()


async def test_parallel_wrong_passwords_evaluate_at_most_the_limit(cp, db_url):
    """120 concurrent wrong passwords for one email: <= 5 evaluated (401), the rest 429, nothing else."""
    await create_user(cp, "target@example.com")
    statuses = await asyncio.gather(*(_login(cp, "target@example.com", f"wrong password {i}") for i in range(BURST)))
    assert set(statuses) <= {401, 429}, sorted(set(statuses))
    assert LIMIT == statuses.count(401)
    assert BURST - LIMIT == statuses.count(429)
    conn = await asyncpg.connect(db_url)
    try:
        row = await conn.fetchrow("SELECT failures, locked_until > now() AS locked FROM login_throttle "
                                  "WHERE subject = $1", subjects("target@example.com", "")[0])
    finally:
        await conn.close()
    assert LIMIT == row["failures"]  # refused attempts are not counted (the lock does not grow with them)
    assert row["locked"]


async def test_correct_password_inside_a_burst_over_the_limit_is_refused(cp, db_url):
    """Once the burst has used the limit, the right password in the same burst gets 429, not tokens."""
    await create_user(cp, "victim@example.com")

    async def correct_once_locked() -> int:
        await _wait_locked(db_url, "victim@example.com")
        return await _login(cp, "victim@example.com", PASSWORD)

    burst = [_login(cp, "victim@example.com", f"guess {i}") for i in range(BURST)]
    *wrong, correct = await asyncio.gather(*burst, correct_once_locked())
    assert 429 == correct
    assert LIMIT >= wrong.count(401)
    assert 200 not in wrong


async def test_unknown_email_burst_is_throttled_alike(cp):
    """An email with no account gets the same reservation: at most 5 evaluated."""
    statuses = await asyncio.gather(*(_login(cp, "ghost@example.com", "nope nope nope") for _ in range(40)))
    assert LIMIT == statuses.count(401)
    assert 40 - LIMIT == statuses.count(429)


async def test_success_frees_the_ip_slot_and_resets_the_email(cp):
    """Successful logins do not use up the per-IP allowance, and reset the email's count."""
    await create_user(cp, "regular@example.com")
    for _ in range(3):
        for _ in range(LIMIT - 1):
            assert 401 == await _login(cp, "regular@example.com", "typo typo typo")
        assert 200 == await _login(cp, "regular@example.com", PASSWORD)


async def test_parallel_correct_logins_of_one_account_are_not_locked_out(cp):
    """Ten parallel logins with the right password: none locked out for long; a retry after them succeeds."""
    await create_user(cp, "shared@example.com")
    statuses = await asyncio.gather(*(_login(cp, "shared@example.com", PASSWORD) for _ in range(10)))
    assert set(statuses) <= {200, 429}
    assert statuses.count(200) >= LIMIT - 1
    assert 200 == await _login(cp, "shared@example.com", PASSWORD)  # the successes cleared the count and lock
