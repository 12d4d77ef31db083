"""Usage reports grouped by key name each key (name and display prefix beside its id)."""

from __future__ import annotations

from gateway import keys
from tests.conftest import TEST_KEY
from tests.fixtures.control_plane import ADMIN, call_model, create_key, create_user


async def test_usage_grouped_by_key_shows_each_keys_name_and_prefix(cp):
    user = await create_user(cp, "named@example.com")
    ci = await create_key(cp, user["id"], name="ci")
    laptop = await create_key(cp, user["id"], name="laptop")
    for key, n in ((ci, 2), (laptop, 1)):
        for _ in range(n):
            assert 200 == await call_model(cp, key["key"])
    assert 200 == await call_model(cp, TEST_KEY)  # a config-file key: its id is its name
    await cp.server.app[keys.USAGE].flush()

    for group_by in ("key", "day,key", "key,model"):
        r = await cp.get("/admin/usage", headers=ADMIN, params={"group_by": group_by})
        doc = await r.json()
        assert 200 == r.status, doc
        got = {d["key_id"]: (d["key_name"], d["key_prefix"], d["requests"]) for d in doc["data"]}
        assert (ci["name"], ci["prefix"], 2) == got[ci["id"]]
        assert (laptop["name"], laptop["prefix"], 1) == got[laptop["id"]]
        assert (None, None, 1) == got["test"]
        assert ci["key"] not in await r.text()
    r = await cp.get("/admin/usage", headers=ADMIN, params={"group_by": "model"})
    assert all("key_name" not in d for d in (await r.json())["data"])
