#!/usr/bin/env python3
"""Create the load-test user and access key through the admin API.

    python3 loadtests/setup_test_user.py --base-url http://127.0.0.1:8000 --admin-token "$GATEWAY_ADMIN_TOKEN"

prints ``API_KEY=gwk_...``, ``KEY_SOURCE=admin-api`` and the user's
``LOADTEST_EMAIL``/``LOADTEST_PASSWORD`` (for the /auth/login scenario) for the k6 scripts:

    eval "$(python3 loadtests/setup_test_user.py ...)"; k6 run -e API_KEY=$API_KEY ...

The user is ``loadtest@example.invalid`` (reused when it exists); each run
makes a new key limited to the load-test models, so revoke old ones with
``DELETE /admin/keys/{id}``.  A gateway without the admin API or without a
database behind it (standalone mode) answers 404 or 503: then
``--fallback-key`` (a key from the config file) is printed instead, with
``KEY_SOURCE=config``.

Standard library only, so that it runs on an operator's machine as it is.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import urllib.error
import urllib.request
from typing import Any

EMAIL = "loadtest@example.invalid"
MODELS = ["demo-claude*", "demo-gpt*", "demo-embed*"]  # DENIED_MODEL (demo-policy-probe) stays outside


class AdminApiMissing(Exception):
    pass


CALL_TIMEOUT = 15.0  # seconds per admin call (bench_counts --callgrind raises it: argon2 under valgrind)


def _call(base: str, token: str, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(base + path, data=data, method=method, headers={
        "authorization": f"Bearer {token}", "content-type": "application/json", "accept": "application/json",
    })
    try:
        with urllib.request.urlopen(req, timeout=CALL_TIMEOUT) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as err:
        raw = err.read()
        try:
            doc = json.loads(raw)
        except ValueError:
            doc = raw.decode(errors="replace")
        return err.code, doc


def _find_user(base: str, token: str, email: str) -> str | None:
    cursor = ""
    for _ in range(1000):
        status, doc = _call(base, token, "GET", "/admin/users?limit=100" + (f"&cursor={cursor}" if cursor else ""))
        if status != 200:
            return None
        for user in doc.get("data", []):
            if user.get("email") == email:
                return str(user["id"])
        cursor = doc.get("next_cursor") or ""
        if not cursor:
            return None
    return None


def create_key(
    base: str, token: str, *, email: str = EMAIL, password: str | None = None, models: list[str] | None = None
) -> str:
    """The plaintext of a new key of the load-test user (whose password is set when given).

    Raises AdminApiMissing when the gateway has no admin API.
    """
    user: dict[str, Any] = {"email": email, "name": "k6 load test"}
    if password:
        user["password"] = password
    status, doc = _call(base, token, "POST", "/admin/users", user)
    if status in (404, 405, 503):  # no admin API, or no database behind it (standalone)
        raise AdminApiMissing(f"POST /admin/users answered {status}")
    if status == 201:
        user_id = str(doc["id"])
    elif status == 409:
        found = _find_user(base, token, email)
        if found is None:
            raise RuntimeError(f"user {email} exists but was not found in GET /admin/users")
        user_id = found
        if password:
            status, doc = _call(base, token, "PATCH", f"/admin/users/{user_id}", {"password": password})
            if status != 200:
                raise RuntimeError(f"PATCH /admin/users/{user_id} (password) answered {status}: {doc}")
    else:
        raise RuntimeError(f"POST /admin/users answered {status}: {doc}")
    status, doc = _call(base, token, "POST", "/admin/keys", {
        "user_id": user_id, "name": "k6 load test", "limits": {"models": models or MODELS},
    })
    if status != 201 or not isinstance(doc, dict) or "key" not in doc:
        raise RuntimeError(f"POST /admin/keys answered {status}: {doc}")
    return str(doc["key"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default=os.environ.get("BASE_URL", "http://127.0.0.1:8000"))
    p.add_argument("--admin-token", default=os.environ.get("GATEWAY_ADMIN_TOKEN", ""),
                   help="bootstrap admin token or an admin's access token (default: $GATEWAY_ADMIN_TOKEN)")
    p.add_argument("--email", default=EMAIL)
    p.add_argument("--password", default="",
                   help="set this password on the user (default: a random one) for the /auth/login scenario")
    p.add_argument("--fallback-key", default=os.environ.get("LOADTEST_FALLBACK_KEY", ""),
                   help="a key from the config file, used when the gateway has no admin API")
    args = p.parse_args(argv)
    base = args.base_url.rstrip("/")
    try:
        if not args.admin_token:
            raise AdminApiMissing("no admin token given")
        password = args.password or secrets.token_urlsafe(18)
        key = create_key(base, args.admin_token, email=args.email, password=password)
        source = "admin-api"
    except AdminApiMissing as exc:
        if not args.fallback_key:
            print(f"error: {exc}, and no --fallback-key", file=sys.stderr)
            return 1
        print(f"note: {exc}; using the fallback key from the config file", file=sys.stderr)
        key, source = args.fallback_key, "config"
    except (RuntimeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"API_KEY={key}")
    print(f"KEY_SOURCE={source}")
    if source == "admin-api":
        print(f"LOADTEST_EMAIL={args.email}")
        print(f"LOADTEST_PASSWORD={password}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
