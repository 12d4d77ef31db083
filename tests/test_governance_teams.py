"""Teams: team limits in the same single Redis round trip as key and user limits, exact across
gateways; team budgets never overshoot; team admins manage their own team only."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
import redis.asyncio as aioredis

from gateway import keys
from gateway.config import Limits
from gateway.policy.plans import Planner, scope_of
from gateway.policy.principals import Principal
from gateway.stores.redis_scripts import VERSION
from tests.fixtures.control_plane import ADMIN, ADMIN_TOKEN, JWT_SECRET, bearer, create_user, login
from tests.fixtures.limits import CHAT, HOLD, SLOW, chat_body, fire, statuses, worst_case
from tests.test_limits_ledger import ledger_toml, settle


@pytest.fixture
def with_redis(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("GATEWAY_REDIS_URL", redis_url)
    return redis_url


async def make_team(client: Any, name: str, **limits: Any) -> dict[str, Any]:
    r = await client.post("/admin/teams", headers=ADMIN, json={"name": name, "limits": limits})
    assert 201 == r.status, await r.text()
    return await r.json()  # type: ignore[no-any-return]


async def member_with_key(client: Any, team_id: str, role: str = "user", **key_fields: Any) -> tuple[dict, str]:
    user = await create_user(client, f"m-{os.urandom(3).hex()}@example.com")
    r = await client.post(f"/admin/teams/{team_id}/users", headers=ADMIN, json={"user_id": user["id"], "role": role})
    assert 201 == r.status, await r.text()
    r = await client.post(f"/admin/teams/{team_id}/keys", headers=ADMIN, json={"user_id": user["id"], **key_fields})
    assert 201 == r.status, await r.text()
    return user, (await r.json())["key"]


async def test_team_rpm_is_shared_by_all_members_across_two_gateways(
        make_gateway, mock_upstream, pg_env, with_redis, tmp_path: Path):
    """Two members, each with a key and no key or user limit; the team's rpm of 5 holds for all of
    them together, across two gateways, with 20 concurrent requests: exactly 5 pass, and the 429
    names the team."""
    gws = [await make_gateway(ledger_toml(mock_upstream.base_url, tmp_path / str(i), flush_ms=100)) for i in range(2)]
    team = await make_team(gws[0], "search", rpm=5)
    _, k1 = await member_with_key(gws[0], team["id"])
    _, k2 = await member_with_key(gws[0], team["id"])
    body = chat_body(5)
    a1, a2 = await asyncio.gather(fire([(g, CHAT) for g in gws], 10, k1, body, SLOW),
                                  fire([(g, CHAT) for g in gws], 10, k2, body, SLOW))
    answers = a1 + a2
    assert {200: 5, 429: 15} == statuses(answers)
    refused = [a for a in answers if a.status == 429]
    assert all("for this team" in a.json()["error"]["message"] for a in refused)
    for g in gws:
        assert 0 == g.server.app[keys.LIMITER].stats.degraded


async def test_team_budget_never_overshoots_with_100_concurrent_requests_from_members(
        make_gateway, mock_upstream, pg_env, with_redis, tmp_path: Path):
    """A team budget fitting 10 worst cases: of 100 concurrent requests from two members over two
    gateways, 10 pass; the ledger's team spend stays within the budget, and after commit exactly the
    remainder fits."""
    body = chat_body(100)
    wc = worst_case(body, 100)
    budget = 10 * wc + 1
    gws = [await make_gateway(ledger_toml(mock_upstream.base_url, tmp_path / str(i), flush_ms=100)) for i in range(2)]
    team = await make_team(gws[0], "budgeted", budget_usd=budget / 1e12, budget_period="month")
    u1, k1 = await member_with_key(gws[0], team["id"])
    u2, k2 = await member_with_key(gws[0], team["id"])
    targets = [(g, CHAT) for g in gws]
    first, second = await asyncio.gather(fire(targets, 50, k1, body, HOLD), fire(targets, 50, k2, body, HOLD))
    answers = first + second
    assert {200: 10, 429: 90} == statuses(answers)
    assert all(a.json()["error"]["code"] == "budget_exceeded" for a in answers if a.status == 429)
    for g in gws:
        await settle(g)
    conn = await asyncpg.connect(pg_env)
    try:
        spent = int(await conn.fetchval(
            "SELECT coalesce(sum(cost_pico), 0) FROM usage_ledger WHERE user_id = ANY($1::text[])",
            [u1["id"], u2["id"]]))
    finally:
        await conn.close()
    assert 0 < spent <= budget
    fits = (budget - spent) // wc
    again = await fire(targets, 20, k2, body, HOLD)
    assert {200: fits, 429: 20 - fits} == statuses(again)


async def test_flushed_redis_rebuilds_a_team_budget_from_the_ledger(
        make_gateway, mock_upstream, pg_env, with_redis, tmp_path: Path):
    """The team counter is rebuilt from the ledger (all members' spend) after Redis loses it."""
    body = chat_body(5)
    gw = await make_gateway(ledger_toml(mock_upstream.base_url, tmp_path, flush_ms=50))
    team = await make_team(gw, "rebuilt", budget_usd=1.0)
    u1, k1 = await member_with_key(gw, team["id"])
    _, k2 = await member_with_key(gw, team["id"])
    assert {200: 3} == statuses(await fire([(gw, CHAT)], 3, k1, body))
    assert {200: 2} == statuses(await fire([(gw, CHAT)], 2, k2, body))
    await settle(gw)
    r = aioredis.Redis.from_url(with_redis, decode_responses=True)
    try:
        name = f"gw:{VERSION}:{{t:{team['id']}}}:b:t:all"
        before = int(await r.hget(name, "v"))
        await r.delete(name)
    finally:
        await r.aclose()
    assert {200: 1} == statuses(await fire([(gw, CHAT)], 1, k1, body))
    await settle(gw)
    r = aioredis.Redis.from_url(with_redis, decode_responses=True)
    try:
        after = int(await r.hget(name, "v"))
    finally:
        await r.aclose()
    assert before < after < 2 * before  # rebuilt from 5 committed requests, plus the new one
    assert after == before * 6 // 5


async def test_team_models_and_limits_apply_and_membership_changes_reach_the_key_cache(cp):
    """A team's allowed models bound its members' keys (403, /v1/models lists only those); leaving
    the team lifts it at once; a user is in at most one team (409)."""
    team = await make_team(cp, "narrow", models=["demo-allowed-*"])
    other = await make_team(cp, "other")
    user, key = await member_with_key(cp, team["id"])
    hdr = {"x-api-key": key, "anthropic-version": "2023-06-01"}
    msg = {"model": "demo-claude", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    r = await cp.post("/v1/messages", json=msg, headers=hdr)
    assert 403 == r.status
    r = await cp.get("/v1/models", headers={"authorization": f"Bearer {key}"})
    assert all(m["id"].startswith("demo-allowed-") for m in (await r.json())["data"])
    r = await cp.post(f"/admin/teams/{other['id']}/users", headers=ADMIN, json={"user_id": user["id"]})
    assert 409 == r.status
    assert 204 == (await cp.delete(f"/admin/teams/{team['id']}/users/{user['id']}", headers=ADMIN)).status
    assert 200 == (await cp.post("/v1/messages", json=msg, headers=hdr)).status


async def test_a_team_admin_manages_its_own_team_only(cp):
    """A team admin lists, creates, changes and removes its own members and their keys, and sees its
    team's usage; every call on another team, on /admin/users or on team limits is 403."""
    mine = await make_team(cp, "mine")
    theirs = await make_team(cp, "theirs")
    boss = await create_user(cp, "boss@example.com")
    assert 201 == (await cp.post(f"/admin/teams/{mine['id']}/users", headers=ADMIN,
                                 json={"user_id": boss["id"], "role": "team_admin"})).status
    outsider, okey = await member_with_key(cp, theirs["id"])
    h = bearer((await login(cp, "boss@example.com"))["access_token"])

    r = await cp.post(f"/admin/teams/{mine['id']}/users", headers=h, json={"email": "new@example.com",
                                                                            "password": "correct horse battery"})
    assert 201 == r.status, await r.text()
    newbie = await r.json()
    assert mine["id"] == newbie["team_id"] and "user" == newbie["role"]
    r = await cp.post(f"/admin/teams/{mine['id']}/keys", headers=h, json={"user_id": newbie["id"], "name": "ci"})
    assert 201 == r.status
    key = await r.json()
    assert 200 == (await cp.get(f"/admin/teams/{mine['id']}", headers=h)).status
    assert {boss["id"], newbie["id"]} == {u["id"] for u in (await (await cp.get(
        f"/admin/teams/{mine['id']}/users", headers=h)).json())["data"]}
    assert [key["id"]] == [k["id"] for k in (await (await cp.get(f"/admin/teams/{mine['id']}/keys",
                                                                   headers=h)).json())["data"]]
    r = await cp.post(f"/admin/teams/{mine['id']}/keys/{key['id']}/rotate", headers=h, json={"grace_seconds": 0})
    assert 201 == r.status
    r = await cp.patch(f"/admin/teams/{mine['id']}/users/{newbie['id']}", headers=h, json={"disabled": True})
    assert 200 == r.status and (await r.json())["disabled"] is True
    assert 200 == (await cp.get(f"/admin/teams/{mine['id']}/usage", headers=h,
                                params={"group_by": "user"})).status

    forbidden = [
        ("GET", f"/admin/teams/{theirs['id']}", None),
        ("GET", f"/admin/teams/{theirs['id']}/users", None),
        ("POST", f"/admin/teams/{theirs['id']}/users", {"email": "x@example.com"}),
        ("PATCH", f"/admin/teams/{theirs['id']}/users/{outsider['id']}", {"disabled": True}),
        ("DELETE", f"/admin/teams/{theirs['id']}/users/{outsider['id']}", None),
        ("GET", f"/admin/teams/{theirs['id']}/keys", None),
        ("POST", f"/admin/teams/{theirs['id']}/keys", {"user_id": outsider["id"]}),
        ("GET", f"/admin/teams/{theirs['id']}/usage", None),
        ("PATCH", f"/admin/teams/{mine['id']}", {"limits": {"rpm": 1000000}}),
        ("DELETE", f"/admin/teams/{mine['id']}", None),
        ("POST", "/admin/teams", {"name": "mine-too"}),
        ("GET", "/admin/teams", None),
        ("GET", "/admin/users", None),
        ("GET", "/admin/keys", None),
        ("DELETE", f"/admin/keys/{key['id']}", None),
        ("POST", f"/admin/keys/{key['id']}/rotate", None),
        ("GET", "/admin/alerts", None),
        ("GET", "/admin/usage/tags", None),
        ("POST", f"/admin/teams/{mine['id']}/users", {"user_id": outsider["id"]}),
        ("PATCH", f"/admin/teams/{mine['id']}/users/{newbie['id']}", {"role": "team_admin"}),
    ]
    for method, path, body in forbidden:
        r = await cp.request(method, path, headers=h, json=body)
        assert 403 == r.status, (method, path, await r.text())
    # Their key, addressed through my team: not found (no existence leak beyond 404).
    keys_of_theirs = (await (await cp.get(f"/admin/teams/{theirs['id']}/keys", headers=ADMIN)).json())["data"]
    r = await cp.delete(f"/admin/teams/{mine['id']}/keys/{keys_of_theirs[0]['id']}", headers=h)
    assert 404 == r.status
    assert 200 == (await cp.post("/v1/chat/completions", headers={"authorization": f"Bearer {okey}"},
                                 json={"model": "demo-gpt", "messages": [{"role": "user", "content": "x"}]})).status
    # Demoted by an admin: the next call is refused (roles re-read every call).
    assert 204 == (await cp.delete(f"/admin/teams/{mine['id']}/users/{boss['id']}", headers=ADMIN)).status
    assert 403 == (await cp.get(f"/admin/teams/{mine['id']}", headers=h)).status


async def test_usage_reports_group_by_team(cp, pg_env):
    a = await make_team(cp, "team-a")
    b = await make_team(cp, "team-b")
    _, ka = await member_with_key(cp, a["id"])
    _, kb = await member_with_key(cp, b["id"])
    body = {"model": "demo-gpt", "messages": [{"role": "user", "content": "x"}]}
    for key, n in ((ka, 3), (kb, 1)):
        for _ in range(n):
            assert 200 == (await cp.post(CHAT, json=body, headers={"authorization": f"Bearer {key}"})).status
    await cp.server.app[keys.TASKS].drain(timeout=5)
    await cp.server.app[keys.USAGE].flush()
    r = await cp.get("/admin/usage/tags", headers=ADMIN, params={"group_by": "team"})
    assert 200 == r.status, await r.text()
    got = {d["team_id"]: d["requests"] for d in (await r.json())["data"]}
    assert 3 == got[a["id"]] and 1 == got[b["id"]]
    r = await cp.get(f"/admin/teams/{a['id']}/usage", headers=ADMIN, params={"group_by": "team"})
    assert [(a["id"], 3)] == [(d["team_id"], d["requests"]) for d in (await r.json())["data"]]


def test_a_team_members_counters_share_the_team_hash_tag():
    """Every counter of a team member's request (key, user, team) carries {t:<team>}; outside a team {u:<user>}."""
    planner = Planner("gw")
    lim = Limits(rpm=1, tpm=10, max_concurrency=1, budget_usd=1.0)
    p = Principal("k1", "gwk_x", "", "u1", key_limits=lim, user_limits=lim, team_id="t1", team_limits=lim)
    plan = planner.plan(p)
    assert plan is not None and 12 == len(plan.keys)
    assert {"{t:t1}"} == {k[k.index("{"): k.index("}") + 1] for k in plan.keys}
    scopes = {scope_of(k, "u1", "k1")[0] for k in plan.budget_keys}
    assert {("u1", "k1", None), ("u1", None, None), ("u1", None, "t1")} == {
        (s.user_id, s.key_id, s.team_id) for s in scopes}
    solo = planner.plan(Principal("k2", "gwk_y", "", "u2", key_limits=lim))
    assert solo is not None and {"{u:u2}"} == {k[k.index("{"): k.index("}") + 1] for k in solo.keys}


@pytest.mark.slow
async def test_team_rpm_is_exact_across_two_instances_of_two_workers(serve, mock_upstream, pg_env, redis_url,
                                                                     tmp_path: Path):
    """Two `serve` instances with two workers each, one Redis: 30 concurrent requests from two team
    members on fresh connections over both instances; exactly the team rpm (7) pass."""
    env = {"GATEWAY_DATABASE_URL": pg_env, "GATEWAY_JWT_SECRET": JWT_SECRET, "GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN,
           "GATEWAY_REDIS_URL": redis_url}
    procs = [serve(ledger_toml(mock_upstream.base_url, tmp_path / str(i), flush_ms=100, workers=2), workers=2,
                   env=env) for i in range(2)]
    base = procs[0].base_url
    async with aiohttp.ClientSession() as s:
        async with s.post(base + "/admin/teams", headers=ADMIN, json={"name": "exact", "limits": {"rpm": 7}}) as r:
            team = await r.json()
        member_keys = []
        for i in range(2):
            async with s.post(base + "/admin/users", headers=ADMIN, json={"email": f"x{i}@example.com"}) as r:
                user = await r.json()
            async with s.post(f"{base}/admin/teams/{team['id']}/users", headers=ADMIN,
                              json={"user_id": user["id"]}) as r:
                assert 201 == r.status
            async with s.post(f"{base}/admin/teams/{team['id']}/keys", headers=ADMIN,
                              json={"user_id": user["id"]}) as r:
                member_keys.append((await r.json())["key"])

    async def one(i: int) -> int:
        async with aiohttp.ClientSession() as s, s.post(
                procs[i % 2].base_url + CHAT, data=chat_body(5), headers={
                    "authorization": f"Bearer {member_keys[(i // 2) % 2]}", "content-type": "application/json",
                    **SLOW}) as r:
            await r.read()
            return r.status

    got = await asyncio.gather(*(one(i) for i in range(30)))
    assert {200: 7, 429: 23} == {s: got.count(s) for s in set(got)}


async def test_team_limits_hold_on_a_redis_cluster(make_gateway, mock_upstream, pg_env, redis_cluster_url,
                                                   monkeypatch, tmp_path: Path):
    """3-node Cluster: two members whose own user tags would hash to different slots share the team's
    slot, so one script call covers key, user and team counters (no CROSSSLOT) and the team rpm holds."""
    monkeypatch.setenv("GATEWAY_REDIS_URL", redis_cluster_url)
    gw = await make_gateway(ledger_toml(mock_upstream.base_url, tmp_path, flush_ms=50,
                                        redis='topology = "cluster"'))
    team = await make_team(gw, "clustered", rpm=4, budget_usd=5.0)
    _, k1 = await member_with_key(gw, team["id"], limits={"rpm": 100})
    _, k2 = await member_with_key(gw, team["id"], limits={"rpm": 100})
    a1, a2 = await asyncio.gather(fire([(gw, CHAT)], 5, k1, chat_body(5), SLOW),
                                  fire([(gw, CHAT)], 5, k2, chat_body(5), SLOW))
    assert {200: 4, 429: 6} == statuses(a1 + a2)
    assert 0 == gw.server.app[keys.LIMITER].stats.degraded


async def test_a_team_per_model_budget_caps_only_matching_models_and_is_rebuilt_from_the_ledger(
        make_gateway, mock_upstream, pg_env, with_redis, tmp_path: Path):
    """model_budgets {"demo-gpt*": 3 worst cases}: of 10 concurrent demo-gpt requests 3 pass (the 429
    names the models), demo-claude is not capped; after Redis loses the counter it is rebuilt from
    the ledger's demo-gpt* spend only."""
    body = chat_body(5)
    wc = worst_case(body, 5)
    gw = await make_gateway(ledger_toml(mock_upstream.base_url, tmp_path, flush_ms=50))
    r = await gw.post("/admin/teams", headers=ADMIN, json={
        "name": "per-model", "model_budgets": {"demo-gpt*": {"budget_usd": (3 * wc + 1) / 1e12}}})
    assert 201 == r.status, await r.text()
    team = await r.json()
    _, key = await member_with_key(gw, team["id"])
    answers = await fire([(gw, CHAT)], 10, key, body, HOLD)
    assert {200: 3, 429: 7} == statuses(answers)
    assert all("for models matching 'demo-gpt*'" in a.json()["error"]["message"] for a in answers if a.status == 429)
    claude = chat_body(5, model="demo-claude")
    assert {200: 4} == statuses(await fire([(gw, CHAT)], 4, key, claude))
    await settle(gw)
    r2 = aioredis.Redis.from_url(with_redis, decode_responses=True)
    try:
        name = f"gw:{VERSION}:{{t:{team['id']}}}:b:tm:{b'demo-gpt*'.hex()}:all"
        before = int(await r2.hget(name, "v"))
        await r2.delete(name)
    finally:
        await r2.aclose()
    again = statuses(await fire([(gw, CHAT)], 1, key, body))  # the counter is rebuilt first
    await settle(gw)
    r2 = aioredis.Redis.from_url(with_redis, decode_responses=True)
    try:
        # The ledger's demo-gpt* spend (3 equal requests, plus this one if it fitted); the 4
        # demo-claude requests are not counted.
        assert (before * 4 // 3 if again == {200: 1} else before) == int(await r2.hget(name, "v"))
    finally:
        await r2.aclose()
    for bad in ({"x[0]": {"budget_usd": 1}}, {"m": {"budget_usd": -1}}, {"m": {"budget_period": "week"}}, {"m": 5}):
        r = await gw.patch(f"/admin/teams/{team['id']}", headers=ADMIN, json={"model_budgets": bad})
        assert 400 == r.status, bad
