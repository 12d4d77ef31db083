"""The console over HTTP: pages and assets with strict security headers, the cookie session
(HttpOnly, SameSite=Strict, scoped to /auth, CSRF-checked), and the admin endpoints it adds
(budgets, health, usage CSV) with the API's role checks."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from gateway.observability.budget_watch import count_budgets
from tests.fixtures.control_plane import ADMIN, PASSWORD, bearer, create_key, create_user, login

CSRF = {"x-gateway-csrf": "1"}
SECURITY = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


def assert_secured(headers: Any) -> None:
    csp = headers["Content-Security-Policy"]
    assert "frame-ancestors 'none'" in csp
    assert "script-src 'self';" in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    for name, value in SECURITY.items():
        assert value == headers[name], name


@pytest.mark.parametrize("path", ["/ui/", "/ui/static/app.js", "/ui/static/vendor/uPlot.esm.js",
                                  "/ui/static/console.css", "/ui/nope", "/ui/static/../app.py"])
async def test_every_ui_response_carries_the_security_headers(cp, path):
    """Pages, scripts, styles and 404s under /ui all carry CSP, nosniff, frame-ancestors and referrer policy."""
    r = await cp.get(path, allow_redirects=False)
    assert r.status in (200, 404)
    assert_secured(r.headers)


async def test_index_has_no_inline_script_and_assets_have_exact_types(cp):
    """The page loads its code from files only; each asset is served with its own content type."""
    r = await cp.get("/ui/")
    html = await r.text()
    assert "text/html; charset=utf-8" == r.headers["content-type"]
    assert '<script type="module" src="/ui/static/app.js"></script>' in html
    assert html.count("<script") == 1 and "style=" not in html and "<style" not in html
    js = await cp.get("/ui/static/app.js")
    assert js.headers["content-type"].startswith("text/javascript")
    etag = js.headers["ETag"]
    again = await cp.get("/ui/static/app.js", headers={"if-none-match": etag})
    assert 304 == again.status
    lic = await cp.get("/ui/static/vendor/uPlot.LICENSE")
    assert "MIT License" in await lic.text()
    assert 308 == (await cp.get("/ui", allow_redirects=False)).status


async def test_cookie_session_login_refresh_logout(cp):
    """Login sets an HttpOnly SameSite=Strict Secure cookie on /auth and keeps the refresh token out of
    the body; refresh rotates it; a reused cookie is refused; logout revokes and clears it."""
    await create_user(cp, "ui@example.com", role="admin")
    r = await cp.post("/auth/session", json={"email": "ui@example.com", "password": PASSWORD}, headers=CSRF)
    assert 200 == r.status, await r.text()
    doc = await r.json()
    assert "refresh_token" not in doc and doc["access_token"] and "admin" == doc["user"]["role"]
    cookie = r.headers["Set-Cookie"]
    for part in ("gw_refresh=", "HttpOnly", "Path=/auth", "SameSite=Strict", "Secure"):
        assert part in cookie, cookie
    assert_secured(r.headers)
    assert "no-store" == r.headers["Cache-Control"]
    first = r.cookies["gw_refresh"].value
    cp.session.cookie_jar.clear()  # a Secure cookie: the test client keeps it off plain http, we send it
    # The access token works on the API as any other.
    assert 200 == (await cp.get("/admin/users", headers=bearer(doc["access_token"]))).status

    r2 = await cp.post("/auth/session/refresh", headers={**CSRF, "cookie": f"gw_refresh={first}"})
    assert 200 == r2.status, await r2.text()
    second = r2.cookies["gw_refresh"].value
    assert second != first
    # Replaying the spent token (a stolen cookie) is refused and kills the session family.
    cp.session.cookie_jar.clear()
    r3 = await cp.post("/auth/session/refresh", headers={**CSRF, "cookie": f"gw_refresh={first}"})
    assert 401 == r3.status
    assert "Max-Age=0" in r3.headers["Set-Cookie"]  # the dead cookie is cleared
    r4 = await cp.post("/auth/session/refresh", headers={**CSRF, "cookie": f"gw_refresh={second}"})
    assert 401 == r4.status

    r5 = await cp.post("/auth/session", json={"email": "ui@example.com", "password": PASSWORD}, headers=CSRF)
    token = (await r5.json())["access_token"]
    cookie = r5.cookies["gw_refresh"].value
    cp.session.cookie_jar.clear()
    out = await cp.post("/auth/session/logout", headers={**CSRF, **bearer(token), "cookie": f"gw_refresh={cookie}"})
    assert 204 == out.status
    assert "gw_refresh=" in out.headers["Set-Cookie"] and "Max-Age=0" in out.headers["Set-Cookie"]
    assert 401 == (await cp.get("/admin/users", headers=bearer(token))).status  # session ended


async def test_console_logout_works_with_a_stale_access_token(cp):
    """Logging out of the console needs only its cookie: a stale bearer does not keep the session alive."""
    await create_user(cp, "stale@example.com")
    r = await cp.post("/auth/session", json={"email": "stale@example.com", "password": PASSWORD}, headers=CSRF)
    cookie = r.cookies["gw_refresh"].value
    cp.session.cookie_jar.clear()
    out = await cp.post("/auth/session/logout",
                        headers={**CSRF, "authorization": "Bearer not-a-token", "cookie": f"gw_refresh={cookie}"})
    assert 204 == out.status
    again = await cp.post("/auth/session/refresh", headers={**CSRF, "cookie": f"gw_refresh={cookie}"})
    assert 401 == again.status


async def test_cookie_endpoints_refuse_cross_site_requests(cp):
    """Without the custom header, or from another origin, the cookie endpoints answer 403."""
    await create_user(cp, "csrf@example.com")
    body = {"email": "csrf@example.com", "password": PASSWORD}
    assert 403 == (await cp.post("/auth/session", json=body)).status
    evil = {**CSRF, "origin": "https://evil.example"}
    assert 403 == (await cp.post("/auth/session", json=body, headers=evil)).status
    assert 403 == (await cp.post("/auth/session/refresh", headers={"origin": "https://evil.example"})).status
    host = f"http://{cp.server.host}:{cp.server.port}"
    assert 200 == (await cp.post("/auth/session", json=body, headers={**CSRF, "origin": host})).status


async def test_secure_flag_is_configurable_for_plain_http(make_gateway, mock_upstream, pg_env):
    from tests.fixtures.control_plane import pg_toml

    client = await make_gateway(pg_toml(mock_upstream.base_url, "[console]\nsecure_cookie = false\n"))
    await create_user(client, "plain@example.com")
    r = await client.post("/auth/session", json={"email": "plain@example.com", "password": PASSWORD}, headers=CSRF)
    assert 200 == r.status
    assert "Secure" not in r.headers["Set-Cookie"] and "HttpOnly" in r.headers["Set-Cookie"]


async def test_console_can_be_disabled(make_gateway, mock_upstream, pg_env):
    from tests.fixtures.control_plane import pg_toml

    client = await make_gateway(pg_toml(mock_upstream.base_url, "[console]\nenabled = false\n"))
    assert 404 == (await client.get("/ui/")).status
    assert 404 == (await client.post("/auth/session", json={})).status


async def _seed_usage(db_url: str, rows: list[tuple[str, str, str, int, datetime]]) -> None:
    """Ledger-equivalent rollup rows (key, user, model, cost micros, day) as the ledger writer keeps them."""
    conn = await asyncpg.connect(db_url)
    try:
        for key_id, user_id, model, cost, at in rows:
            await conn.execute(
                "INSERT INTO usage_daily (day, user_id, key_id, model, shard, requests, partial_requests, "
                "unpriced_requests, input_tokens, output_tokens, cache_write_tokens, cache_read_tokens, cost_micros) "
                "VALUES ($1, $2, $3, $4, 0, 1, 0, 0, 100, 50, 0, 0, $5)",
                at.date(), user_id, key_id, model, cost,
            )
    finally:
        await conn.close()


async def test_budgets_show_spend_against_limit_in_the_current_period(cp, db_url):
    """A monthly key budget counts this month's spend only; a daily user budget today's; keys without
    a budget are not listed; paging follows the cursor."""
    u = await create_user(cp, "budget@example.com", limits={"budget_usd": 3.5, "budget_period": "day"})
    k1 = await create_key(cp, u["id"], name="monthly", limits={"budget_usd": 4, "budget_period": "month"})
    k2 = await create_key(cp, u["id"], name="total", limits={"budget_usd": 1, "budget_period": "total"})
    await create_key(cp, u["id"], name="unlimited")
    k3 = await create_key(cp, u["id"], name="over", limits={"budget_usd": 2, "budget_period": "total"})
    now = datetime.now(UTC)
    last_month = now.replace(day=1) - timedelta(days=1)
    await _seed_usage(db_url, [
        (k1["id"], u["id"], "demo-claude", 3_000_000, now),
        (k1["id"], u["id"], "demo-claude", 7_000_000, last_month),  # another period: not counted
        (k2["id"], u["id"], "demo-claude", 500_000, last_month),
        (k3["id"], u["id"], "demo-claude", 2_500_000, last_month),
    ])
    r = await cp.get("/admin/budgets", headers=ADMIN)
    assert 200 == r.status, await r.text()
    data = {d["name"]: d for d in (await r.json())["data"]}
    assert {"monthly", "total", "over"} == set(data)
    assert 3.0 == data["monthly"]["spent_usd"] and 0.75 == data["monthly"]["used_ratio"]
    assert now.replace(day=1).date().isoformat() == data["monthly"]["period_start"]
    assert 0.5 == data["total"]["spent_usd"] and data["total"]["period_start"] is None
    users = (await (await cp.get("/admin/budgets?scope=user", headers=ADMIN)).json())["data"]
    assert [("budget@example.com", 3.0)] == [(d["email"], d["spent_usd"]) for d in users]
    page1 = await (await cp.get("/admin/budgets?limit=1", headers=ADMIN)).json()
    assert 1 == len(page1["data"]) and page1["next_cursor"]
    page2 = await (await cp.get(f"/admin/budgets?limit=1&cursor={page1['next_cursor']}", headers=ADMIN)).json()
    assert page1["data"][0]["id"] != page2["data"][0]["id"]
    assert 400 == (await cp.get("/admin/budgets?scope=team", headers=ADMIN)).status
    # The alerting gauge's count: the user at 3.0 of 3.5 today is near; the "over" key is exhausted.
    conn = await asyncpg.connect(db_url)
    try:
        counts = await count_budgets(conn)
    finally:
        await conn.close()
    assert {("key", "near"): 0, ("key", "exhausted"): 1, ("user", "near"): 1, ("user", "exhausted"): 0} == counts


async def test_usage_csv_export(cp, db_url):
    """format=csv answers the same rows as JSON, as a CSV download; names cannot become formulas."""
    u = await create_user(cp, "csv@example.com")
    k = await create_key(cp, u["id"])
    now = datetime.now(UTC)
    await _seed_usage(db_url, [(k["id"], u["id"], "=cmd", 1_500_000, now), (k["id"], u["id"], "demo-claude", 2, now)])
    r = await cp.get("/admin/usage?group_by=model&format=csv", headers=ADMIN)
    assert 200 == r.status
    assert r.headers["content-type"].startswith("text/csv")
    lines = (await r.text()).splitlines()
    assert lines[0].startswith("model,requests,")
    assert lines[1].startswith("'=cmd,1,") and lines[1].endswith(",1.5")
    assert 3 == len(lines)
    assert 400 == (await cp.get("/admin/usage?format=xml", headers=ADMIN)).status


async def test_health_reports_dependencies_workers_and_recent_errors(cp):
    """The health page's data: readiness checks, worker and circuit figures, the last hour's error rate."""
    r = await cp.get("/admin/health", headers=ADMIN)
    assert 200 == r.status, await r.text()
    doc = await r.json()
    assert "ok" == doc["checks"]["postgres"]["status"]
    assert {"mock-anthropic", "mock-openai"} == set(doc["checks"]["circuits"]["upstreams"])
    assert 1 == doc["metrics"]["workers"]
    assert isinstance(doc["recent"], list)


@pytest.mark.parametrize("path", ["/admin/budgets", "/admin/health", "/admin/usage?format=csv"])
async def test_new_admin_endpoints_refuse_non_admins(cp, path):
    await create_user(cp, "plainuser@example.com")
    tokens = await login(cp, "plainuser@example.com")
    assert 403 == (await cp.get(path, headers=bearer(tokens["access_token"]))).status
    assert 401 == (await cp.get(path)).status
