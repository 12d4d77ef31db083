"""The console in a real headless Chromium against a real ``llm-gateway serve`` on Postgres.

One operator's session, end to end: log in, create a user and a key (shown
once, copied to the clipboard), call the model with that key through the
Anthropic SDK, see the request in the usage chart and table, revoke the key
and see the next request refused over HTTP, log out.  Then the same console as
a non-admin user: no admin page, and the API refuses too.  The pages run
under the strict CSP without a single violation.  Screenshots of every page
go to ``test-results/console/``.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

import anthropic
import httpx2 as httpx
import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import Select, WebDriverWait

from tests.conftest import gateway_toml
from tests.fixtures.browser import browser, screenshot  # noqa: F401
from tests.fixtures.control_plane import ADMIN, ADMIN_TOKEN, JWT_SECRET, PASSWORD
from tests.fixtures.ledger_seed import record, seed

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.timeout(240)]

WAIT_S = 30


def wait(driver, cond, timeout: float = WAIT_S):
    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(cond)


def visible(driver, css: str):
    return wait(driver, EC.visibility_of_element_located((By.CSS_SELECTOR, css)))


def text_in(driver, css: str, text: str) -> None:
    wait(driver, EC.text_to_be_present_in_element((By.CSS_SELECTOR, css), text))


def fill(driver, css: str, value: str) -> None:
    el = visible(driver, css)
    el.clear()
    el.send_keys(value)


def go(driver, base: str, view: str) -> None:
    driver.get(f"{base}/ui/#/{view}")


def login(driver, base: str, email: str) -> None:
    driver.get(f"{base}/ui/")
    fill(driver, "#login-form input[name=email]", email)
    fill(driver, "#login-form input[name=password]", PASSWORD)
    driver.find_element(By.ID, "login-submit").click()
    visible(driver, "#nav a")


def logout(driver) -> None:
    driver.find_element(By.ID, "logout").click()
    visible(driver, "#login-form")


def csp_violations(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if "Content Security Policy" in e["message"]]


def call(base: str, key: str) -> int:
    """One request through the real Anthropic SDK; the HTTP status it got."""
    client = anthropic.Anthropic(base_url=base, api_key=key, max_retries=0)
    try:
        client.messages.create(model="demo-claude", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    except anthropic.APIStatusError as exc:
        return exc.status_code
    return 200


def operator_session(driver, base: str, admin_email: str) -> None:
    login(driver, base, admin_email)
    screenshot(driver, "01-users")
    assert "Users" in [a.text for a in driver.find_elements(By.CSS_SELECTOR, "#nav a")]

    # A user, through the form.
    fill(driver, "#create-user input[name=email]", "alice@example.com")
    fill(driver, "#create-user input[name=name]", "Alice")
    fill(driver, "#create-user input[name=password]", PASSWORD)
    driver.find_element(By.CSS_SELECTOR, "#create-user button[type=submit]").click()
    text_in(driver, "#users-table", "alice@example.com")
    alice_id = httpx.get(f"{base}/admin/users", params={"email": "alice@"}, headers=ADMIN).json()["data"][0]["id"]

    # A key for her: shown once, copied.
    go(driver, base, f"keys?user_id={alice_id}")
    fill(driver, "#create-key input[name=key-name]", "ci-key")
    driver.find_element(By.CSS_SELECTOR, "#create-key button[type=submit]").click()
    key = visible(driver, "#new-key-value").get_attribute("value")
    assert key.startswith("gwk_")
    driver.execute_cdp_cmd("Browser.grantPermissions", {
        "origin": base, "permissions": ["clipboardReadWrite", "clipboardSanitizedWrite"]})
    driver.find_element(By.ID, "copy-key").click()
    text_in(driver, "#copy-status", "Copied.")
    pasted = driver.execute_async_script("const done = arguments[0]; navigator.clipboard.readText().then(done, e => done('ERR ' + e));")
    assert key == pasted
    text_in(driver, "#keys-table", "ci-key")
    screenshot(driver, "02-keys-new-key")
    prefix = key[:12]
    # Shown once: after "Done" the page, and the API, only know the prefix.
    driver.find_element(By.ID, "dismiss-key").click()
    wait(driver, EC.invisibility_of_element_located((By.ID, "new-key-value")))
    assert key not in driver.page_source

    # The key works through the SDK; the request shows in the usage chart and table.
    assert 200 == call(base, key)
    go(driver, base, "usage")
    Select(visible(driver, "#usage-form select[name=group_by]")).select_by_value("key")
    key_id = httpx.get(f"{base}/admin/keys", params={"user_id": alice_id}, headers=ADMIN).json()["data"][0]["id"]
    deadline = time.monotonic() + WAIT_S
    while key_id not in driver.find_element(By.ID, "usage-table").text:
        # The ledger writer commits in batches: show again until the request is there.
        assert time.monotonic() < deadline, "the request never showed in the usage table"
        driver.find_element(By.CSS_SELECTOR, "#usage-form button[type=submit]").click()
        wait(driver, EC.presence_of_element_located((By.CSS_SELECTOR, "#usage-table table")))
    # CSV export of what the table shows (grouped by key): a real download through the page.
    driver.find_element(By.ID, "export-csv").click()
    csv_file = driver.downloads / "usage.csv"
    wait(driver, lambda d: csv_file.exists() and key_id in csv_file.read_text())
    assert csv_file.read_text().startswith("key_id,requests,")
    wait(driver, lambda d: int(d.find_element(By.ID, "chart").get_attribute("data-points") or 0) >= 3)
    assert driver.find_elements(By.CSS_SELECTOR, "#chart .uplot canvas")
    screenshot(driver, "03-usage")

    # Edit its limits in the console; the API has them.
    go(driver, base, f"keys?user_id={alice_id}")
    visible(driver, "#keys-table button").click()  # "Edit" of the only key
    fill(driver, "#edit-key input[name=rpm]", "60")
    driver.find_element(By.CSS_SELECTOR, "#edit-key button[type=submit]").click()
    text_in(driver, "#keys-table", "rpm 60")
    assert 60 == httpx.get(f"{base}/admin/keys/{key_id}", headers=ADMIN).json()["limits"]["rpm"]

    # Revoke it in the console; the next request through the SDK is refused.
    visible(driver, f"#keys-table button.revoke[data-prefix='{prefix}']").click()
    wait(driver, EC.alert_is_present()).accept()
    text_in(driver, "#keys-table", "revoked")
    deadline = time.monotonic() + WAIT_S
    while call(base, key) != 401:
        assert time.monotonic() < deadline, "revoked key still accepted"
        time.sleep(0.05)

    for view in ("budgets", "audit", "health"):
        go(driver, base, view)
        visible(driver, {"budgets": "#budgets-table", "audit": "#audit-table table", "health": "#health table"}[view])
        screenshot(driver, f"04-{view}")
    text_in(driver, "#health", "postgres")
    go(driver, base, "budgets")
    text_in(driver, "#budgets-table", "history")
    text_in(driver, "#budgets-table", "75.0%")  # $1.50 of the seeded history against a $2 total budget
    go(driver, base, "audit")
    text_in(driver, "#audit-table", "key.revoke")

    logout(driver)
    screenshot(driver, "05-logged-out")
    # The refresh cookie is gone: a reload stays logged out.
    driver.get(f"{base}/ui/#/users")
    visible(driver, "#login-form")


def user_session(driver, base: str) -> None:
    login(driver, base, "alice@example.com")
    nav = [a.text for a in driver.find_elements(By.CSS_SELECTOR, "#nav a")]
    assert ["My keys", "My usage"] == nav
    for view in ("users", "keys", "usage", "budgets", "audit", "health"):
        go(driver, base, view)
        wait(driver, lambda d: d.current_url.endswith("#/my-keys"))
        visible(driver, "#keys-table")
    screenshot(driver, "06-user-my-keys")
    # Her own revoked key is listed; nobody else's.
    text_in(driver, "#keys-table", "ci-key")
    go(driver, base, "my-usage")
    visible(driver, "#usage-table table")
    screenshot(driver, "07-user-my-usage")
    # The API refuses her the admin endpoints whatever the page shows.
    tokens = httpx.post(f"{base}/auth/login", json={"email": "alice@example.com", "password": PASSWORD}).json()
    for path in ("/admin/users", "/admin/keys", "/admin/usage", "/admin/budgets", "/admin/audit", "/admin/health"):
        r = httpx.get(base + path, headers={"authorization": f"Bearer {tokens['access_token']}"})
        assert 403 == r.status_code, path
    logout(driver)


async def test_console_end_to_end_in_headless_chromium(serve, pg_env, mock_upstream, browser):  # noqa: F811
    env = {"GATEWAY_DATABASE_URL": pg_env, "GATEWAY_JWT_SECRET": JWT_SECRET, "GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN}
    # Access tokens of 5 s: the page refreshes (cookie rotation) before nearly every API call, also
    # for the usage page's two concurrent calls, which must share one refresh (a spent refresh
    # token presented twice would end the session).
    extra = "\n[accounting]\nflush_ms = 50\n[auth]\naccess_token_seconds = 5\n"
    proc = serve(gateway_toml(mock_upstream.base_url, extra=extra), workers=1, env=env)
    # localhost is a secure context for Chromium: the default Secure cookie works over http here.
    base = f"http://localhost:{proc.port}"
    async with httpx.AsyncClient(base_url=base, headers=ADMIN) as http:
        r = await http.post("/admin/users", json={"email": "ops@example.com", "password": PASSWORD, "role": "admin"})
        assert 201 == r.status_code, r.text
        admin_id = r.json()["id"]
        r = await http.post("/admin/keys", json={"user_id": admin_id, "name": "history",
                                                 "limits": {"budget_usd": 2, "budget_period": "total"}})
        history = r.json()
    # Three earlier days of usage, written by the ledger writer's own statement.
    now = datetime.now(UTC)
    await seed(pg_env, [record(history["id"], admin_id, "demo-claude", now - timedelta(days=d), cost_pico=d * 250_000 * 10**6)
                        for d in (1, 2, 3)])

    def scenario() -> None:
        operator_session(browser, base, "ops@example.com")
        user_session(browser, base)
        assert [] == csp_violations(browser)

    await asyncio.to_thread(scenario)
