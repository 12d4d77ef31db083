"""GET /admin/usage and /me/usage: daily + hourly rollups + ledger edges agree with a brute-force sum."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from gateway import keys
from gateway.accounting.record import UsageRecord
from tests.fixtures.control_plane import ADMIN, bearer, call_model, create_key, create_user, login

DAY0 = datetime(2026, 10, 28, tzinfo=UTC)  # spans a month boundary: two partitions


def synthetic(n: int, seed: int = 7) -> list[UsageRecord]:
    rnd = random.Random(seed)
    recs = []
    for i in range(n):
        ts = DAY0 + timedelta(seconds=rnd.randrange(0, 6 * 86400))
        recs.append(UsageRecord(
            request_id=f"syn-{i}", ts=ts.timestamp(), key_id=rnd.choice(["k1", "k2", "k3"]),
            user_id=rnd.choice(["u1", "u2"]), model=rnd.choice(["m-a", "m-b"]), route="m-*", upstream="x",
            status=200, streamed=rnd.random() < 0.5, partial=rnd.random() < 0.1, input_tokens=rnd.randrange(1000),
            output_tokens=rnd.randrange(500), cache_write_tokens=rnd.randrange(50), cache_read_tokens=rnd.randrange(50),
            cost_pico=rnd.randrange(10**10), priced=rnd.random() < 0.9, upstream_ms=1.0, ttft_ms=None,
            gateway_ms=0.1,
        ))
    return recs


def brute(recs: list[UsageRecord], lo: datetime | None, hi: datetime | None, group: str,
          **filters: str) -> dict[Any, tuple[int, int, int]]:
    out: dict[Any, tuple[int, int, int]] = {}
    for r in recs:
        ts = datetime.fromtimestamp(r.ts, UTC)
        if (lo and ts < lo) or (hi and ts >= hi) or any(getattr(r, k) != v for k, v in filters.items()):
            continue
        g = {"day": ts.date().isoformat(), "model": r.model, "key": r.key_id, "user": r.user_id}[group]
        n, c, o = out.get(g, (0, 0, 0))
        out[g] = (n + 1, c + r.cost_pico, o + r.output_tokens)
    return out


@pytest.fixture
async def loaded(cp):
    writer = cp.server.app[keys.USAGE]
    recs = synthetic(600)
    for r in recs:
        writer.record(r)
    await writer.flush()
    return cp, recs


def key_of(group: str) -> str:
    return {"day": "day", "model": "model", "key": "key_id", "user": "user_id"}[group]


RANGES = [
    (None, None),
    (DAY0 + timedelta(hours=13, minutes=7), DAY0 + timedelta(days=4, hours=2)),  # partial days at both edges
    (DAY0 + timedelta(days=1), DAY0 + timedelta(days=3)),  # whole days only
    (DAY0 + timedelta(days=2, hours=1), DAY0 + timedelta(days=2, hours=20)),  # inside one day
    (DAY0 + timedelta(days=3, hours=22), DAY0 + timedelta(days=4, hours=3)),  # across one midnight
    (DAY0 + timedelta(days=2, seconds=1), None),
    (None, DAY0 + timedelta(days=5, hours=6)),
    (DAY0 + timedelta(days=2, hours=1, minutes=10), DAY0 + timedelta(days=2, hours=1, minutes=50)),  # one hour
    (DAY0 + timedelta(days=2, hours=1, minutes=10), DAY0 + timedelta(days=3, hours=5, minutes=20)),
    (DAY0 + timedelta(days=1, minutes=30), DAY0 + timedelta(days=1, hours=3)),
    (None, DAY0 + timedelta(days=4, hours=5, minutes=1)),
]


async def test_admin_usage_equals_a_brute_force_sum_for_any_range_and_grouping(loaded):
    """Whole days from the rollup plus partial edge days from the ledger == summing every record."""
    cp, recs = loaded
    for lo, hi in RANGES:
        for group in ("day", "model", "key", "user"):
            params = {"group_by": group}
            if lo:
                params["from"] = lo.isoformat()
            if hi:
                params["to"] = hi.isoformat().replace("+00:00", "Z")
            r = await cp.get("/admin/usage", params=params, headers=ADMIN)
            assert 200 == r.status, await r.text()
            doc = await r.json()
            got = {d[key_of(group)]: (d["requests"], int(d["cost_pico"]), d["output_tokens"]) for d in doc["data"]}
            assert brute(recs, lo, hi, group) == got, (lo, hi, group)


async def test_admin_usage_filters_by_user_key_and_model(loaded):
    cp, recs = loaded
    r = await cp.get("/admin/usage", headers=ADMIN,
                     params={"user_id": "u1", "key_id": "k2", "model": "m-b", "group_by": "day",
                             "from": "2026-10-29T06:00:00Z"})
    doc = await r.json()
    got = {d["day"]: (d["requests"], int(d["cost_pico"]), d["output_tokens"]) for d in doc["data"]}
    expected = brute(recs, DAY0 + timedelta(days=1, hours=6), None, "day", user_id="u1", key_id="k2", model="m-b")
    assert expected == got
    assert sum(v[0] for v in expected.values()) == doc["totals"]["requests"]


@pytest.mark.parametrize(("params", "field"), [
    ({"group_by": "week"}, "group_by"),
    ({"from": "yesterday"}, "from"),
    ({"from": "2026-11-02", "to": "2026-11-01"}, "to"),
    ({"user": "u1"}, "user"),
    ({"model": "m" * 300}, "model"),
])
async def test_usage_query_validation_names_the_bad_field(cp, params, field):
    r = await cp.get("/admin/usage", headers=ADMIN, params=params)
    assert 400 == r.status
    assert field == (await r.json())["error"]["field"]


async def test_me_usage_reports_only_the_callers_own_requests_and_admin_usage_needs_admin(cp):
    """A user sees their own usage on /me/usage (never another's); /admin/usage is 403 for them."""
    alice = await create_user(cp, "alice@example.com")
    bob = await create_user(cp, "bob@example.com")
    ka = await create_key(cp, alice["id"])
    kb = await create_key(cp, bob["id"])
    for _ in range(3):
        assert 200 == await call_model(cp, ka["key"])
    assert 200 == await call_model(cp, kb["key"])
    await cp.server.app[keys.USAGE].flush()
    token = (await login(cp, "alice@example.com"))["access_token"]

    r = await cp.get("/me/usage", headers=bearer(token), params={"group_by": "key"})
    doc = await r.json()
    assert 200 == r.status, doc
    assert [(ka["id"], 3)] == [(d["key_id"], d["requests"]) for d in doc["data"]]
    r = await cp.get("/me/usage", headers=bearer(token), params={"user_id": bob["id"]})
    assert 400 == r.status
    r = await cp.get("/admin/usage", headers=bearer(token))
    assert 403 == r.status
    r = await cp.get("/admin/usage", headers=ADMIN, params={"group_by": "user"})
    users = {d["user_id"]: d["requests"] for d in (await r.json())["data"]}
    assert {alice["id"]: 3, bob["id"]: 1} == users
    r = await cp.get("/me/usage")
    assert 401 == r.status

