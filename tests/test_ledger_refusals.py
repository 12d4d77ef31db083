"""A record Postgres refuses is set aside, never retried, never blocking the records behind it;
an outage is still retried (issue 10, item 1).  Plus the door that keeps bad model names out, and
bounded log lines."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import random
import string
from typing import Any

import asyncpg
import asyncpg.exceptions
import pytest
import structlog

from gateway import keys
from gateway.accounting.ledger import PROBE_AFTER, LedgerWriter, db_fingerprint, encode
from gateway.accounting.ledger_errors import REFUSED_CLASSES, RecordRefused, Verdict, classify
from gateway.accounting.record import UsageRecord
from gateway.observability import logging as gwlog
from gateway.policy.model_names import MAX_MODEL_LEN, model_problem
from gateway.stores.postgres import DatabaseUnavailable
from tests.test_accounting_reports import synthetic
from tests.test_ledger_gateway import ANTH, MSGS, OAI, checkpoint, ledger_toml, rows
from tests.test_ops_metrics import total

LONG_MODEL = "".join(random.Random(3).choices(string.ascii_letters + string.digits, k=3000))


# --------------------------------------------------------------------------- the door


@pytest.mark.parametrize("name", [
    "claude-sonnet-4-5", "anthropic.claude-sonnet-4-5-v1:0", "gpt-4o-2024-08-06", "accounts/fireworks/models/x",
    "meta-llama/Llama-3-8B@v1", "ft:gpt-4o-mini:org:custom:abc123", "a", "x" * MAX_MODEL_LEN,
])
def test_real_provider_model_names_pass_the_door(name: str) -> None:
    assert model_problem(name) is None


@pytest.mark.parametrize("name", [
    "", None, 7, ["gpt-4o"], "x" * (MAX_MODEL_LEN + 1), LONG_MODEL, "gpt\x00-4o", "gpt 4o", "gpt-4o\n", "\tgpt",
    "gpt-4o\x7f", "gpt\u00e9", "gpt\u202e4o", "model;drop", "a\"b", "a{b}",
])
def test_bad_model_names_are_refused_at_the_door(name: Any) -> None:
    assert model_problem(name) is not None


@pytest.mark.parametrize("model", [LONG_MODEL, "demo-\u0000claude", "demo claude", "demo-claude\r\n", "x" * 257])
async def test_a_bad_model_name_is_a_400_in_the_paths_dialect_and_never_recorded(
        make_gateway: Any, mock_upstream: Any, pg_env: str, tmp_path: Any, model: str) -> None:
    gw = await make_gateway(ledger_toml(mock_upstream.base_url, tmp_path))
    r = await gw.post("/v1/messages", json={"model": model, "max_tokens": 5, "messages": MSGS}, headers=ANTH)
    assert 400 == r.status
    doc = await r.json()
    assert "invalid_request_error" == doc["error"]["type"] and "model" in doc["error"]["message"]
    assert model not in await r.text()  # the offending input is not echoed back
    for path in ("/v1/chat/completions", "/v1/embeddings"):
        r = await gw.post(path, json={"model": model, "messages": MSGS, "input": "x"}, headers=OAI)
        assert 400 == r.status
        err = (await r.json())["error"]
        assert ("invalid_request_error", "invalid_request") == (err["type"], err["code"])
    assert 0 == (await mock_upstream.stats()).get("requests", 0)
    await gw.app[keys.USAGE].flush()
    assert {} == await rows(pg_env)


# --------------------------------------------------------------------------- outage or refusal


def _all_postgres_errors() -> list[type[asyncpg.PostgresError]]:
    out, todo = [], [asyncpg.PostgresError]
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if getattr(cls, "sqlstate", None):
            out.append(cls)
    return out


@pytest.mark.parametrize("cls", _all_postgres_errors(), ids=lambda c: f"{c.sqlstate}-{c.__name__}")
def test_every_postgres_error_class_is_either_an_outage_or_a_refusal(cls: type[asyncpg.PostgresError]) -> None:
    """Data, integrity, program-limit and PL/pgSQL errors refuse a record; everything else is an outage."""
    want = Verdict.REFUSED if cls.sqlstate[:2] in REFUSED_CLASSES else Verdict.OUTAGE
    assert want == classify(cls("x"))


@pytest.mark.parametrize(("exc", "want"), [
    (asyncpg.exceptions.ProgramLimitExceededError("index row size exceeds btree maximum"), Verdict.REFUSED),
    (asyncpg.exceptions.CharacterNotInRepertoireError("invalid byte sequence 0x00"), Verdict.REFUSED),
    (asyncpg.exceptions.CheckViolationError("check"), Verdict.REFUSED),
    (asyncpg.exceptions.NumericValueOutOfRangeError("out of range"), Verdict.REFUSED),
    (asyncpg.exceptions.SerializationError("40001"), Verdict.OUTAGE),
    (asyncpg.exceptions.DeadlockDetectedError("40P01"), Verdict.OUTAGE),
    (asyncpg.exceptions.AdminShutdownError("57P01"), Verdict.OUTAGE),
    (asyncpg.exceptions.CannotConnectNowError("57P03"), Verdict.OUTAGE),
    (asyncpg.exceptions.QueryCanceledError("statement timeout"), Verdict.OUTAGE),
    (asyncpg.exceptions.DiskFullError("53100"), Verdict.OUTAGE),
    (asyncpg.exceptions.TooManyConnectionsError("53300"), Verdict.OUTAGE),
    (asyncpg.exceptions.UndefinedTableError("42P01"), Verdict.OUTAGE),
    (asyncpg.exceptions.ConnectionDoesNotExistError("gone"), Verdict.OUTAGE),
    (asyncpg.exceptions._base.DataError("invalid input for query argument $11"), Verdict.REFUSED),
    (asyncpg.InterfaceError("connection is closed"), Verdict.OUTAGE),
    (RecordRefused("year out of range"), Verdict.REFUSED),
    (ConnectionResetError(), Verdict.OUTAGE),
    (OSError("no route"), Verdict.OUTAGE),
    (TimeoutError(), Verdict.OUTAGE),
    (DatabaseUnavailable("postgres unavailable: OSError"), Verdict.OUTAGE),
])
def test_classify_examples(exc: BaseException, want: Verdict) -> None:
    assert want == classify(exc)


def _poisoned() -> list[UsageRecord]:
    """Records the door would refuse, journaled anyway (an older release, a hand-edited journal)."""
    base = synthetic(3, seed=41)
    return [
        dataclasses.replace(base[0], request_id="bad-long-model", model=LONG_MODEL),  # 54000 in the rollup index
        dataclasses.replace(base[1], request_id="bad-nul", model="demo-\x00claude"),  # 22021
        dataclasses.replace(base[2], request_id="bad-negative", input_tokens=-5),  # 23514 CHECK
    ]


async def _wait(pred: Any, timeout: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await pred():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.05)


async def test_refused_records_are_set_aside_and_the_records_behind_them_land(
        make_gateway: Any, mock_upstream: Any, pg_env: str, tmp_path: Any) -> None:
    """A dead worker's poisoned segment and poisoned records among live traffic: the good records all land,
    the three bad ones go to the set-aside file once each, counted in /metrics, and /readyz says degraded."""
    good_orphans = synthetic(6, seed=42)
    bad = _poisoned()
    orphan = tmp_path / f"usage-{db_fingerprint(pg_env)}-999997-dead-1.jsonl"
    orphan.write_bytes(b"".join(encode(r) for r in [good_orphans[0], bad[0], *good_orphans[1:3], bad[1]]
                                + good_orphans[3:]))
    gw = await make_gateway(ledger_toml(mock_upstream.base_url, tmp_path))
    writer = gw.app[keys.USAGE]
    assert isinstance(writer, LedgerWriter)

    ids = []
    for i in range(9):
        if i == 4:
            writer.record(bad[2])  # between live requests, in the same batch
        r = await gw.post("/v1/messages", json={"model": "demo-claude", "max_tokens": 5, "messages": MSGS}, headers=ANTH)
        assert 200 == r.status
        ids.append(r.headers["x-request-id"])
    want = set(ids) | {r.request_id for r in good_orphans}

    async def landed() -> bool:
        return want <= set(await rows(pg_env)) and not orphan.exists()

    await _wait(landed)
    got = await rows(pg_env)
    assert want == set(got), "only the good records are in the ledger"

    set_aside = [json.loads(line) for f in tmp_path.glob("set-aside-*.jsonl") for line in f.read_text().splitlines()]
    assert {"bad-long-model", "bad-nul", "bad-negative"} == {d["request_id"] for d in set_aside}
    assert 3 == len(set_aside), "each refused record is set aside once"
    assert {"54000", "22021", "23514"} == {d["set_aside"]["sqlstate"] for d in set_aside}
    assert 3 == writer.stats.set_aside

    r = await gw.get("/readyz")
    assert 200 == r.status  # still serving
    body = await r.json()
    assert "degraded" == body["status"]
    assert "degraded" == body["checks"]["ledger"]["status"]
    assert "set aside" in body["checks"]["ledger"]["reason"]

    text = await (await gw.get("/metrics")).text()
    assert 3 == total(text, "gateway_usage_events_total", event="set_aside")

    # Nothing is retried: more traffic lands, the set-aside count stays.
    r = await gw.post("/v1/messages", json={"model": "demo-claude", "max_tokens": 5, "messages": MSGS}, headers=ANTH)
    rid = r.headers["x-request-id"]
    await writer.flush()
    assert rid in await rows(pg_env)
    assert 3 == writer.stats.set_aside

    # The operator deals with the file: ready again.
    for f in tmp_path.glob("set-aside-*.jsonl"):
        f.unlink()
    await _wait(lambda: _ready_status(gw, "ready"))


async def _ready_status(gw: Any, want: str) -> bool:
    r = await gw.get("/readyz")
    return want == (await r.json())["status"]


async def test_an_outage_is_retried_not_set_aside(
        make_gateway: Any, mock_upstream: Any, pg_env: str, pg_server: Any, tmp_path: Any) -> None:
    gw = await make_gateway(ledger_toml(mock_upstream.base_url, tmp_path))
    writer = gw.app[keys.USAGE]
    await checkpoint(pg_env)
    pg_server.stop()
    try:
        ids = []
        for _ in range(5):
            r = await gw.post("/v1/chat/completions", json={"model": "demo-gpt", "messages": MSGS}, headers=OAI)
            assert 200 == r.status
            ids.append(r.headers["x-request-id"])

        async def retried() -> bool:
            return writer.stats.outages >= 2

        await _wait(retried)
        assert 0 == writer.stats.set_aside
        assert [] == list(tmp_path.glob("set-aside-*.jsonl"))
        body = await (await gw.get("/readyz")).json()
        assert "unready" == body["status"] and "down" == body["checks"]["postgres"]["status"]
        assert "degraded" == body["checks"]["ledger"]["status"]
    finally:
        pg_server.start()

    async def landed() -> bool:
        try:
            return set(ids) <= set(await rows(pg_env))
        except (OSError, asyncpg.PostgresError):
            return False

    await _wait(landed)
    assert 0 == writer.stats.set_aside
    await _wait(lambda: _ready_status(gw, "ready"))


# --------------------------------------------------------------------------- bounded log lines


@pytest.mark.parametrize(("value", "limit"), [
    ("x" * 100_000, gwlog.MAX_VALUE_CHARS),
    (b"y" * 100_000, gwlog.MAX_VALUE_CHARS),
    (["z" * 50] * 1000, gwlog.MAX_VALUE_CHARS),
    ({"k": "v" * 10_000}, gwlog.MAX_VALUE_CHARS),
])
def test_oversized_values_are_cut(value: Any, limit: int) -> None:
    out = gwlog.bound_values(None, "info", {"event": "e", "v": value, "small": "ok"})
    assert isinstance(out["v"], str) and len(out["v"]) <= limit + 40
    assert "more chars]" in out["v"]
    assert "ok" == out["small"]


def test_a_real_log_line_stays_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the configured structlog pipeline (orjson renderer), a 1 MB value gives a short line."""
    old = structlog.get_config()
    buf = io.BytesIO()
    monkeypatch.setattr("sys.stdout", io.TextIOWrapper(buf))
    try:
        gwlog.configure("info")
        log = structlog.get_logger("t")
        log.info("big", model="m" * 1_000_000, request_id="r1")
        try:
            raise ValueError("v" * 1_000_000)
        except ValueError:
            log.exception("boom")
        gwlog.flush()
    finally:
        structlog.configure(**old)
    lines = buf.getvalue().splitlines()
    assert 2 == len(lines)
    assert all(len(line) < 16_384 for line in lines)
    first = json.loads(lines[0])
    assert "r1" == first["request_id"] and first["model"].startswith("mmmm")


_POISON_TRIGGER = """
CREATE TABLE test_poison_all (on_ boolean);
CREATE FUNCTION test_poison() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.model = 'poison-xx' OR EXISTS (SELECT 1 FROM test_poison_all) THEN
        RAISE EXCEPTION 'simulated internal error' USING ERRCODE = 'XX000';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER test_poison BEFORE INSERT ON usage_ledger FOR EACH ROW EXECUTE FUNCTION test_poison();
"""


async def _sql(dsn: str, sql: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def test_a_persistent_error_of_one_record_is_probed_and_set_aside_but_a_systemic_one_is_not(
        db_url: str, tmp_path: Any) -> None:
    """An internal error (XX000, an outage class) raised for one record only: retried as an outage a few
    times, then the batch is probed (a rolled-back canary goes in), the good records land and only that
    record is set aside, also when it is alone in its batch.  The same error for every record (the canary
    fails too: a database fault) is never blamed on the records: they wait, then land."""
    from gateway.config import AccountingConfig
    from gateway.stores.postgres import Database

    await _sql(db_url, _POISON_TRIGGER)
    db = Database(db_url)
    await db.start()
    w = LedgerWriter(db, AccountingConfig(journal_dir=str(tmp_path), batch_size=50, flush_ms=20))
    await w.start()
    try:
        recs = synthetic(8, seed=51)
        recs[3] = dataclasses.replace(recs[3], request_id="poison-1", model="poison-xx")
        for r in recs:
            w.record(r)

        async def probed() -> bool:
            return w.stats.set_aside == 1

        await _wait(probed)
        assert w.stats.outages >= 4  # retried as an outage first
        assert {r.request_id for r in recs} - {"poison-1"} == set(await rows(db_url))
        (line,) = [json.loads(x) for f in tmp_path.glob("set-aside-*.jsonl") for x in f.read_text().splitlines()]
        assert ("poison-1", "XX000") == (line["request_id"], line["set_aside"]["sqlstate"])

        # A one-record batch: the canary tells it apart too.
        w.record(dataclasses.replace(recs[0], request_id="poison-2", model="poison-xx"))

        async def probed_alone() -> bool:
            return w.stats.set_aside == 2

        await _wait(probed_alone)

        # Every record fails alike: the database's fault, nothing is set aside however often it is retried.
        await _sql(db_url, "INSERT INTO test_poison_all VALUES (true)")
        more = [dataclasses.replace(r, request_id=f"sys-{i}") for i, r in enumerate(synthetic(20, seed=52))]
        before = w.stats.outages
        for r in more:
            w.record(r)

        async def retried_past_the_probe() -> bool:
            return w.stats.outages >= before + PROBE_AFTER + 1

        await _wait(retried_past_the_probe, timeout=60)
        assert 2 == w.stats.set_aside
        await _sql(db_url, "DELETE FROM test_poison_all")

        async def landed() -> bool:
            return {r.request_id for r in more} <= set(await rows(db_url))

        await _wait(landed, timeout=60)
        assert 2 == w.stats.set_aside
    finally:
        await w.close()
        await db.close()
