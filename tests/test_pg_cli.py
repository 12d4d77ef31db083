"""CLI set-up without HTTP: the first admin user and a key, then both work over HTTP."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

from tests.conftest import ROOT
from tests.fixtures.control_plane import bearer, call_model, login


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


async def test_cli_creates_the_first_admin_and_a_key_that_work_over_http(cp, pg_env):
    """`users create` + `keys create` (printed once) + `keys revoke`, all without the HTTP API."""
    env = {"GATEWAY_DATABASE_URL": pg_env, "ADMIN_PW": "first admin password", "PATH": "/usr/bin:/bin"}
    r = _cli("users", "create", "--email", "Root@Example.com", "--role", "admin", "--password-env", "ADMIN_PW",
             env=env)
    assert 0 == r.returncode, r.stderr
    user = json.loads(r.stdout)
    assert "admin" == user["role"] and "root@example.com" == user["email"]
    assert "first admin password" not in r.stdout + r.stderr
    again = _cli("users", "create", "--email", "root@example.com", "--password-env", "ADMIN_PW", env=env)
    assert 1 == again.returncode

    r = _cli("keys", "create", "--user", "root@example.com", "--name", "ci", "--models", "demo-*", "--rpm", "60",
             env=env)
    assert 0 == r.returncode, r.stderr
    key = json.loads(r.stdout)
    assert {"models": ["demo-*"], "rpm": 60} == key["limits"]
    assert 200 == await call_model(cp, key["key"])

    tokens = await login(cp, "root@example.com", "first admin password")
    listed = await (await cp.get("/admin/keys", headers=bearer(tokens["access_token"]))).json()
    assert [key["id"]] == [k["id"] for k in listed["data"]]

    r = _cli("keys", "revoke", key["id"], env=env)
    assert 0 == r.returncode, r.stderr
    # The revocation reaches the gateway by NOTIFY, asynchronously: wait for it (a generous deadline,
    # well under the key cache's 60 s TTL, so only the NOTIFY path can pass this).
    deadline = time.monotonic() + 20
    while (got := await call_model(cp, key["key"])) != 401:
        assert time.monotonic() < deadline, f"a key revoked by the CLI still gets {got}"
        await asyncio.sleep(0.05)
