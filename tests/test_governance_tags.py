"""Tags for cost attribution: header, metadata and key defaults -> ledger rows -> reports; bad tags 400."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.accounting.tags import TagError, TagRules
from gateway.governance_config import TagsConfig
from tests.fixtures.control_plane import ADMIN, bearer, create_key, create_user, login, pg_toml

TAGS_TOML = """
    [accounting]
    journal_dir = "{journal}"
    flush_ms = 50

    [tags]
    allowed = ["project", "env", "team", "end_user"]
    [tags.metric_labels]
    env = ["prod", "staging"]
    """
MSG = {"model": "demo-claude", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
CHAT = {"model": "demo-gpt", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
async def tgw(make_gateway, mock_upstream, pg_env, tmp_path: Path):
    return await make_gateway(pg_toml(mock_upstream.base_url, TAGS_TOML.format(journal=tmp_path)))


async def _ledger(dsn: str, n: int) -> list[dict]:
    deadline = asyncio.get_running_loop().time() + 20
    while True:
        conn = await asyncpg.connect(dsn)
        try:
            got = await conn.fetch("SELECT request_id, key_id, tags::text, cost_micros FROM usage_ledger ORDER BY ts")
        finally:
            await conn.close()
        if len(got) >= n:
            return [{**r, "tags": orjson.loads(r["tags"]) if r["tags"] else None} for r in got]
        assert asyncio.get_running_loop().time() < deadline, f"{len(got)} of {n} ledger rows"
        await asyncio.sleep(0.05)


async def test_tags_from_header_metadata_and_key_defaults_are_stored_with_each_usage_record(tgw, pg_env,
                                                                                         mock_upstream):
    """Key default tags, overridden by OpenAI metadata (allow-listed names only), overridden by the
    header; Anthropic metadata.user_id becomes end_user; untagged requests store NULL; the header
    never reaches the provider."""
    user = await create_user(tgw, "tags@example.com")
    key = await create_key(tgw, user["id"])
    r = await tgw.put(f"/admin/keys/{key['id']}/tags", headers=ADMIN, json={"tags": {"project": "base", "env": "dev"}})
    assert 200 == r.status, await r.text()
    anth = {"x-api-key": key["key"], "anthropic-version": "2023-06-01"}
    oai = {"authorization": f"Bearer {key['key']}"}

    r = await tgw.post("/v1/messages", json=MSG, headers={**anth, "x-gateway-tags": "project=search, env=prod"})
    assert 200 == r.status, await r.text()
    r1 = r.headers["x-request-id"]
    r = await tgw.post("/v1/chat/completions", headers=oai,
                       json={**CHAT, "metadata": {"project": "ads", "other": "ignored value!"}})
    assert 200 == r.status, await r.text()
    r2 = r.headers["x-request-id"]
    r = await tgw.post("/v1/messages", headers=anth, json={**MSG, "metadata": {"user_id": "cust-42"}})
    assert 200 == r.status
    r3 = r.headers["x-request-id"]
    r = await tgw.post("/v1/messages", headers={"x-api-key": "gwk_test_" + "a" * 32,
                                                "anthropic-version": "2023-06-01"}, json=MSG)
    assert 200 == r.status
    r4 = r.headers["x-request-id"]

    seen = await mock_upstream.requests()
    assert seen and not any("x-gateway-tags" in {k.lower() for k in r["headers"]} for r in seen)
    got = {row["request_id"]: row["tags"] for row in await _ledger(pg_env, 4)}
    assert {"project": "search", "env": "prod"} == got[r1]
    assert {"project": "ads", "env": "dev"} == got[r2]
    assert {"project": "base", "env": "dev", "end_user": "cust-42"} == got[r3]
    assert got[r4] is None


@pytest.mark.parametrize(("header", "fragment"), [
    ("Project=x", "not a tag name"),
    ("project=has space", "must be 1 to 64"),
    ("secret=1", "not allowed"),
    ("project", "not name=value"),
    ("project=a,project=b", "given twice"),
    ("project=" + "v" * 65, "must be 1 to 64"),
])
async def test_invalid_tags_are_a_400_in_the_paths_dialect(tgw, pg_env, header, fragment):
    """Anthropic paths answer invalid_request_error in Anthropic's shape, OpenAI paths in OpenAI's."""
    r = await tgw.post("/v1/messages", json=MSG, headers={
        "x-api-key": "gwk_test_" + "a" * 32, "anthropic-version": "2023-06-01", "x-gateway-tags": header})
    assert 400 == r.status
    body = await r.json()
    assert "error" == body["type"] and "invalid_request_error" == body["error"]["type"]
    assert fragment in body["error"]["message"]
    r = await tgw.post("/v1/chat/completions", json=CHAT, headers={
        "authorization": "Bearer gwk_test_" + "a" * 32, "x-gateway-tags": header})
    assert 400 == r.status
    body = await r.json()
    assert "invalid_request" == body["error"]["code"] and fragment in body["error"]["message"]


async def test_without_an_allow_list_any_safe_name_passes_but_never_more_than_ten(make_gateway, mock_upstream, pg_env, tmp_path):
    """Without an allow-list any safe name is accepted, but never more than 10 tags."""
    gw = await make_gateway(pg_toml(mock_upstream.base_url, f"""
        [accounting]
        journal_dir = "{tmp_path}"
        """))
    hdr = {"x-api-key": "gwk_test_" + "a" * 32, "anthropic-version": "2023-06-01"}
    ten = ",".join(f"t{i}=v" for i in range(10))
    assert 200 == (await gw.post("/v1/messages", json=MSG, headers={**hdr, "x-gateway-tags": ten})).status
    r = await gw.post("/v1/messages", json=MSG, headers={**hdr, "x-gateway-tags": ten + ",t10=v"})
    assert 400 == r.status
    assert "at most 10" in (await r.json())["error"]["message"]


async def test_bad_metadata_value_for_an_allowed_name_is_a_400(tgw):
    r = await tgw.post("/v1/chat/completions", headers={"authorization": "Bearer gwk_test_" + "a" * 32},
                       json={**CHAT, "metadata": {"project": "no spaces allowed"}})
    assert 400 == r.status
    assert "metadata.project" in (await r.json())["error"]["message"]


async def test_usage_reports_filter_and_group_by_tag(tgw, pg_env):
    """/admin/usage/tags groups by tag value (null for untagged) and filters by name=value;
    /me/usage/tags only shows the caller's own usage."""
    user = await create_user(tgw, "rep@example.com")
    key = await create_key(tgw, user["id"])
    anth = {"x-api-key": key["key"], "anthropic-version": "2023-06-01"}
    sent = [("project=search,env=prod", 3), ("project=ads,env=prod", 2), ("env=staging", 1), (None, 1)]
    for tags, n in sent:
        for _ in range(n):
            h = {**anth, "x-gateway-tags": tags} if tags else anth
            assert 200 == (await tgw.post("/v1/messages", json=MSG, headers=h)).status
    rows = await _ledger(pg_env, 7)
    total_cost = sum(r["cost_micros"] for r in rows)

    r = await tgw.get("/admin/usage/tags", headers=ADMIN, params={"group_by": "tag:project"})
    assert 200 == r.status, await r.text()
    body = await r.json()
    by = {d["tag:project"]: d["requests"] for d in body["data"]}
    assert {"ads": 2, "search": 3, None: 2} == by
    assert total_cost == body["totals"]["cost_micros"]

    r = await tgw.get("/admin/usage/tags", headers=ADMIN,
                      params=[("tag", "env=prod"), ("group_by", "tag:project,key")])
    body = await r.json()
    assert [("ads", key["id"], 2), ("search", key["id"], 3)] == [
        (d["tag:project"], d["key_id"], d["requests"]) for d in body["data"]]
    r = await tgw.get("/admin/usage/tags", headers=ADMIN, params=[("tag", "project"), ("group_by", "tag:env")])
    assert {"prod": 5} == {d["tag:env"]: d["requests"] for d in (await r.json())["data"]}

    for bad in ({"group_by": "tag:Bad"}, {"tag": "nope=1"}, {"group_by": "colour"}, {"x": "1"}):
        assert 400 == (await tgw.get("/admin/usage/tags", headers=ADMIN, params=bad)).status, bad
    tokens = await login(tgw, "rep@example.com")
    r = await tgw.get("/me/usage/tags", headers=bearer(tokens["access_token"]), params={"group_by": "tag:env"})
    assert {"prod": 5, "staging": 1, None: 1} == {d["tag:env"]: d["requests"] for d in (await r.json())["data"]}
    other = await create_user(tgw, "other-rep@example.com")
    t2 = await login(tgw, "other-rep@example.com")
    r = await tgw.get("/me/usage/tags", headers=bearer(t2["access_token"]))
    assert [] == (await r.json())["data"]
    assert other["id"]


async def test_only_allow_listed_tags_become_metric_labels_with_bounded_values(tgw):
    """tags.metric_labels names env with values prod/staging: any other value is 'other'; project
    (not a metric label) never appears in /metrics."""
    hdr = {"x-api-key": "gwk_test_" + "a" * 32, "anthropic-version": "2023-06-01"}
    for tags in ("env=prod,project=secret-project-name", "env=wild-value-123", "env=prod"):
        assert 200 == (await tgw.post("/v1/messages", json=MSG, headers={**hdr, "x-gateway-tags": tags})).status
    text = await (await tgw.get("/metrics")).text()
    assert 'gateway_tagged_requests_total{tag="env",value="prod"} 2.0' in text
    assert 'gateway_tagged_requests_total{tag="env",value="other"} 1.0' in text
    assert "secret-project-name" not in text and "wild-value-123" not in text


async def test_key_default_tags_are_validated_and_scoped(tgw):
    user = await create_user(tgw, "kt@example.com")
    other = await create_user(tgw, "kt2@example.com")
    key = await create_key(tgw, user["id"])
    okey = await create_key(tgw, other["id"])
    for bad in ({"tags": {"nope": "x"}}, {"tags": {"project": ""}}, {"tags": "project=x"}, {"tags": {}, "x": 1}):
        assert 400 == (await tgw.put(f"/admin/keys/{key['id']}/tags", headers=ADMIN, json=bad)).status, bad
    tokens = await login(tgw, "kt@example.com")
    h = bearer(tokens["access_token"])
    assert 200 == (await tgw.put(f"/me/keys/{key['id']}/tags", headers=h, json={"tags": {"env": "prod"}})).status
    assert {"env": "prod"} == (await (await tgw.get(f"/me/keys/{key['id']}/tags", headers=h)).json())["tags"]
    assert 404 == (await tgw.put(f"/me/keys/{okey['id']}/tags", headers=h, json={"tags": {}})).status
    assert 403 == (await tgw.put(f"/admin/keys/{okey['id']}/tags", headers=h, json={"tags": {}})).status


_RULES = TagRules(TagsConfig())


@given(st.dictionaries(st.from_regex(r"[a-z][a-z0-9_.-]{0,31}", fullmatch=True),
                       st.from_regex(r"[A-Za-z0-9_.:/@+-]{1,64}", fullmatch=True), max_size=10))
def test_any_valid_tag_set_round_trips_through_the_header(tags):
    """Property: a header built from valid tags parses back to exactly those tags."""
    assert tags == _RULES.header(",".join(f"{k}={v}" for k, v in tags.items()))


@given(st.text(max_size=80))
def test_the_header_parser_accepts_only_safe_text(raw):
    """Property: whatever the header, the parser returns safe tags or raises TagError, nothing else."""
    try:
        out = _RULES.header(raw)
    except TagError:
        return
    for k, v in out.items():
        assert k.isascii() and v.isascii() and "," not in v and "=" not in k
