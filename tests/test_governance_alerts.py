"""Spend alerts: thresholds fire a signed webhook exactly once per period, retried on failure,
recorded in Postgres with their delivery status, visible through the admin API."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway import keys
from gateway.alerts.evaluate import crossed, period_start
from tests.fixtures.control_plane import ADMIN, create_key, create_user, pg_toml

SECRET = "whsec-test-" + "x" * 24
MSG = {"model": "demo-claude", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
COST = 99  # micro-dollars of one MSG at demo-* prices: 8 input x 3 + 5 output x 15


def alerts_toml(journal: Path) -> str:
    return f"""
    [accounting]
    journal_dir = "{journal}"
    flush_ms = 50

    [alerts]
    evaluate_seconds = 0.2
    deliver_seconds = 0.1
    retry_base_seconds = 0.2
    retry_max_seconds = 1.0
    max_attempts = 4
    timeout_seconds = 2.0
    """


class Receiver:
    """A webhook receiver that checks signatures as the README tells receivers to, fails the first
    ``fail_first`` posts of each event with a 500, and counts what it saw."""

    def __init__(self, fail_first: int = 0) -> None:
        self.fail_first = fail_first
        self.posts: Counter[int] = Counter()  # event id -> posts seen
        self.accepted: list[dict] = []
        self.bad_signatures = 0
        app = web.Application()
        app.router.add_post("/hook", self.hook)
        self.server = TestServer(app, host="127.0.0.1")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}/hook"

    async def hook(self, request: web.Request) -> web.Response:
        raw = await request.read()
        parts = dict(p.split("=", 1) for p in request.headers.get("x-gateway-signature", "").split(","))
        ts = int(parts.get("t", "0"))
        mac = hmac.new(SECRET.encode(), f"{ts}.".encode() + raw, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(mac, parts.get("v1", "")) or abs(time.time() - ts) > 300:
            self.bad_signatures += 1
            return web.Response(status=401)
        doc = orjson.loads(raw)
        assert str(doc["id"]) == request.headers["x-gateway-event-id"]
        self.posts[doc["id"]] += 1
        if self.posts[doc["id"]] <= self.fail_first:
            return web.Response(status=500)
        self.accepted.append(doc)
        return web.Response(status=204)


@pytest.fixture
async def receiver():
    rcv = Receiver(fail_first=2)
    await rcv.server.start_server()
    yield rcv
    await rcv.server.close()


async def _until(cond, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"{what} never held"
        await asyncio.sleep(0.05)


async def test_two_gateways_fire_each_threshold_once_signed_and_retried_after_500s(
        make_gateway, mock_upstream, pg_env, receiver, tmp_path, monkeypatch):
    """Two gateways evaluate and deliver concurrently; the receiver fails every event's first two
    posts: each of 50/80/100 % is accepted exactly once with a valid signature after three posts,
    and the admin API lists the events as delivered with 3 attempts."""
    monkeypatch.setenv("GATEWAY_ALERT_SECRET", SECRET)
    gw1 = await make_gateway(pg_toml(mock_upstream.base_url, alerts_toml(tmp_path / "a")))
    gw2 = await make_gateway(pg_toml(mock_upstream.base_url, alerts_toml(tmp_path / "b")))
    user = await create_user(gw1, "spend@example.com")
    key = await create_key(gw1, user["id"])
    r = await gw1.post("/admin/alerts", headers=ADMIN, json={
        "scope": "key", "target_id": key["id"], "name": "team budget", "budget_usd": 350 / 1_000_000,
        "period": "day", "thresholds": [50, 80, 100], "webhook_url": receiver.url})
    assert 201 == r.status, await r.text()
    rule = await r.json()
    hdr = {"x-api-key": key["key"], "anthropic-version": "2023-06-01"}

    async def spend(n: int) -> None:
        for i in range(n):
            gw = gw1 if i % 2 else gw2
            assert 200 == (await gw.post("/v1/messages", json=MSG, headers=hdr)).status

    await spend(2)  # 57 %: 50 fires
    await _until(lambda: [50] == sorted(d["threshold"] for d in receiver.accepted), what="50 % delivered")
    await spend(1)  # 85 %: 80 fires
    await _until(lambda: [50, 80] == sorted(d["threshold"] for d in receiver.accepted), what="80 % delivered")
    await spend(1)  # 113 %: 100 fires
    await _until(lambda: 3 == len(receiver.accepted), what="100 % delivered")

    # Several more evaluation rounds on both gateways: nothing fires again this period.
    services = [gw.server.app[keys.ALERTS] for gw in (gw1, gw2)]
    marks = [s.evaluations for s in services]
    await _until(lambda: sum(s.evaluations for s in services) >= sum(marks) + 10, what="more evaluations")
    assert [50, 80, 100] == sorted(d["threshold"] for d in receiver.accepted)
    assert 0 == receiver.bad_signatures
    assert {3} == set(receiver.posts.values())  # two 500s, then accepted; never posted again
    doc = receiver.accepted[-1]
    assert {"budget.threshold_reached", "key", key["id"], rule["id"], "day"} <= {
        doc["type"], doc["scope"], doc["target_id"], doc["rule_id"], doc["period"]}
    assert 4 * COST / 1_000_000 == doc["spend_usd"]

    r = await gw2.get(f"/admin/alerts/{rule['id']}/events", headers=ADMIN)
    assert 200 == r.status
    events = (await r.json())["data"]
    assert [(100, "delivered", 3), (80, "delivered", 3), (50, "delivered", 3)] == [
        (e["threshold"], e["status"], e["attempts"]) for e in events]
    assert all(e["last_status"] == 204 for e in events)


async def test_a_receiver_that_never_accepts_ends_failed_after_max_attempts(
        make_gateway, mock_upstream, pg_env, tmp_path, monkeypatch):
    """A user-scope rule without its own budget uses the user's configured budget; a receiver that
    always answers 500 gets max_attempts posts, then the event is 'failed' with the last status."""
    monkeypatch.setenv("GATEWAY_ALERT_SECRET", SECRET)
    rcv = Receiver(fail_first=1000)
    await rcv.server.start_server()
    try:
        gw = await make_gateway(pg_toml(mock_upstream.base_url, alerts_toml(tmp_path)))
        user = await create_user(gw, "failing@example.com", limits={"budget_usd": 0.005, "budget_period": "month"})
        key = await create_key(gw, user["id"])
        r = await gw.post("/admin/alerts", headers=ADMIN, json={
            "scope": "user", "target_id": user["id"], "thresholds": [1], "webhook_url": rcv.url})
        assert 201 == r.status, await r.text()
        assert 200 == (await gw.post("/v1/messages", json=MSG, headers={
            "x-api-key": key["key"], "anthropic-version": "2023-06-01"})).status
        await _until(lambda: sum(rcv.posts.values()) >= 4, what="four attempts")

        async def failed() -> list[dict]:
            r = await gw.get("/admin/alert-events", headers=ADMIN, params={"status": "failed"})
            return (await r.json())["data"]  # type: ignore[no-any-return]

        deadline = time.monotonic() + 20
        while not (got := await failed()):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        assert 4 == got[0]["attempts"] and 500 == got[0]["last_status"] and "month" == got[0]["payload"]["period"]
        await asyncio.sleep(0)
        assert 4 == sum(rcv.posts.values())
    finally:
        await rcv.server.close()


async def test_alert_rules_are_validated_and_admin_only(cp):
    user = await create_user(cp, "rules@example.com")
    base = {"scope": "user", "target_id": user["id"], "webhook_url": "https://hooks.example.com/x"}
    for bad in ({**base, "scope": "org"}, {**base, "target_id": "nope"}, {**base, "webhook_url": "ftp://x"},
                {**base, "thresholds": [0]}, {**base, "thresholds": []}, {**base, "budget_usd": -1},
                {**base, "period": "week"}, {**base, "target_id": "00000000-0000-0000-0000-000000000000"},
                {**base, "extra": 1}, {k: v for k, v in base.items() if k != "webhook_url"}):
        r = await cp.post("/admin/alerts", headers=ADMIN, json=bad)
        assert 400 == r.status, bad
    r = await cp.post("/admin/alerts", headers=ADMIN, json=base)
    assert 201 == r.status
    rule = await r.json()
    assert [50, 80, 100] == rule["thresholds"] and rule["budget_usd"] is None
    r = await cp.patch(f"/admin/alerts/{rule['id']}", headers=ADMIN, json={"enabled": False, "thresholds": [90]})
    assert 200 == r.status and [90] == (await r.json())["thresholds"]
    assert 401 == (await cp.get("/admin/alerts")).status
    assert 204 == (await cp.delete(f"/admin/alerts/{rule['id']}", headers=ADMIN)).status
    assert 404 == (await cp.get(f"/admin/alerts/{rule['id']}", headers=ADMIN)).status


@pytest.mark.parametrize(("spend", "budget", "expected"), [
    (0, 100, []), (49, 100, []), (50, 100, [50]), (79, 100, [50]), (80, 100, [50, 80]),
    (99, 100, [50, 80]), (100, 100, [50, 80, 100]), (10**12, 100, [50, 80, 100]), (1, 3, []), (2, 3, [50]),
])
def test_crossed_thresholds_are_exact_integers(spend, budget, expected):
    assert expected == crossed(spend, budget, [100, 50, 80])


def test_periods_start_at_utc_midnight_month_start_or_epoch():
    now = datetime(2026, 12, 17, 15, 4, 5, tzinfo=UTC)
    assert datetime(2026, 12, 17, tzinfo=UTC) == period_start("day", now)
    assert datetime(2026, 12, 1, tzinfo=UTC) == period_start("month", now)
    assert datetime(1970, 1, 1, tzinfo=UTC) == period_start("total", now)


@pytest.mark.slow
async def test_a_two_worker_serve_and_a_second_gateway_deliver_each_threshold_once(
        serve, make_gateway, mock_upstream, pg_env, receiver, tmp_path, monkeypatch):
    """Three alert loops (two serve workers, one in-process gateway) race over the same rules:
    each threshold reaches the receiver exactly once (after its two 500s)."""
    from tests.conftest import gateway_toml
    from tests.fixtures.control_plane import ADMIN_TOKEN, JWT_SECRET

    monkeypatch.setenv("GATEWAY_ALERT_SECRET", SECRET)
    env = {"GATEWAY_DATABASE_URL": pg_env, "GATEWAY_JWT_SECRET": JWT_SECRET, "GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN,
           "GATEWAY_ALERT_SECRET": SECRET}
    proc = serve(gateway_toml(mock_upstream.base_url, extra=alerts_toml(tmp_path / "serve")), workers=2, env=env)
    gw = await make_gateway(pg_toml(mock_upstream.base_url, alerts_toml(tmp_path / "inproc")))
    user = await create_user(gw, "race@example.com")
    key = await create_key(gw, user["id"])
    r = await gw.post("/admin/alerts", headers=ADMIN, json={
        "scope": "key", "target_id": key["id"], "budget_usd": 100 / 1_000_000, "thresholds": [50, 80, 100],
        "webhook_url": receiver.url})
    assert 201 == r.status
    import aiohttp

    async with aiohttp.ClientSession() as s:
        async with s.post(proc.base_url + "/v1/messages", json=MSG,
                          headers={"x-api-key": key["key"], "anthropic-version": "2023-06-01"}) as resp:
            assert 200 == resp.status  # 99 %: 50 and 80
        async with s.post(proc.base_url + "/v1/messages", json=MSG,
                          headers={"x-api-key": key["key"], "anthropic-version": "2023-06-01"}) as resp:
            assert 200 == resp.status  # 198 %: 100
    await _until(lambda: 3 == len(receiver.accepted), what="three thresholds delivered")
    service = gw.server.app[keys.ALERTS]
    mark = service.evaluations
    await _until(lambda: service.evaluations >= mark + 10, what="more evaluations")
    deadline = time.monotonic() + 3  # deliveries in flight elsewhere would land within their lease
    while time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert [50, 80, 100] == sorted(d["threshold"] for d in receiver.accepted)
    assert {3} == set(receiver.posts.values())
    assert 0 == receiver.bad_signatures


async def test_a_team_rule_uses_the_teams_own_budget_and_all_members_spend(
        make_gateway, mock_upstream, pg_env, receiver, tmp_path, monkeypatch):
    """scope=team without a budget of its own: the team's monthly budget_usd, spent by two members,
    fires 50 % once both have spent (neither alone reaches it)."""
    monkeypatch.setenv("GATEWAY_ALERT_SECRET", SECRET)
    gw = await make_gateway(pg_toml(mock_upstream.base_url, alerts_toml(tmp_path)))
    r = await gw.post("/admin/teams", headers=ADMIN, json={
        "name": "alerting", "limits": {"budget_usd": 300 / 1_000_000, "budget_period": "month"}})
    team = await r.json()
    member_keys = []
    for i in range(2):
        user = await create_user(gw, f"tm{i}@example.com")
        assert 201 == (await gw.post(f"/admin/teams/{team['id']}/users", headers=ADMIN,
                                     json={"user_id": user["id"]})).status
        r = await gw.post(f"/admin/teams/{team['id']}/keys", headers=ADMIN, json={"user_id": user["id"]})
        member_keys.append((await r.json())["key"])
    r = await gw.post("/admin/alerts", headers=ADMIN, json={
        "scope": "team", "target_id": team["id"], "thresholds": [50], "webhook_url": receiver.url})
    assert 201 == r.status, await r.text()
    assert 200 == (await gw.post("/v1/messages", json=MSG, headers={
        "x-api-key": member_keys[0], "anthropic-version": "2023-06-01"})).status  # 33 %
    service = gw.server.app[keys.ALERTS]
    mark = service.evaluations
    await _until(lambda: service.evaluations >= mark + 3, what="evaluations")
    assert [] == receiver.accepted
    assert 200 == (await gw.post("/v1/messages", json=MSG, headers={
        "x-api-key": member_keys[1], "anthropic-version": "2023-06-01"})).status  # 66 %
    await _until(lambda: 1 == len(receiver.accepted), what="team 50 % delivered")
    doc = receiver.accepted[0]
    assert ("team", team["id"], 50, "month", 2 * COST / 1_000_000) == (
        doc["scope"], doc["target_id"], doc["threshold"], doc["period"], doc["spend_usd"])
