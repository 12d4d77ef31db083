"""The journal: torn lines skipped, live writers' segments left alone, dead ones replayed once."""

from __future__ import annotations

import asyncio
import fcntl
import os

from gateway.accounting.ledger import LedgerWriter, db_fingerprint, encode
from gateway.config import AccountingConfig
from gateway.stores.postgres import Database
from tests.test_accounting_reports import synthetic
from tests.test_ledger_gateway import checkpoint, rows


async def _writer(dsn: str, journal) -> tuple[Database, LedgerWriter]:
    db = Database(dsn)
    await db.start()
    w = LedgerWriter(db, AccountingConfig(journal_dir=str(journal), batch_size=2, flush_ms=20))
    return db, w


async def test_a_dead_workers_segment_is_replayed_once_and_a_torn_last_line_skipped(db_url, tmp_path):
    recs = synthetic(5, seed=11)
    seg = tmp_path / f"usage-{db_fingerprint(db_url)}-999999-1.jsonl"
    seg.write_bytes(b"".join(encode(r) for r in recs) + encode(recs[0]) + b'{"request_id": "torn')
    foreign = tmp_path / "usage-000000000000-999999-1.jsonl"  # another database's journal
    foreign.write_bytes(encode(synthetic(1, seed=12)[0]))
    db, w = await _writer(db_url, tmp_path)
    await w.start()
    try:
        for _ in range(200):
            if not seg.exists():
                break
            await asyncio.sleep(0.02)
        assert not seg.exists()
        assert foreign.exists(), "a journal of another database must never be replayed here"
        assert {r.request_id for r in recs} == set(await rows(db_url))
        assert 5 == w.written
    finally:
        await w.close()
        await db.close()


async def test_a_live_writers_segment_is_left_alone_until_its_lock_is_released(db_url, tmp_path):
    recs = synthetic(3, seed=13)
    seg = tmp_path / f"usage-{db_fingerprint(db_url)}-999998-1.jsonl"
    seg.write_bytes(b"".join(encode(r) for r in recs))
    fd = os.open(seg, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as its (live) writer holds it
    db, w = await _writer(db_url, tmp_path)
    await w.start()
    try:
        await asyncio.sleep(0.3)
        assert seg.exists()
        assert {} == await rows(db_url)
        os.close(fd)  # the writer dies
        await w._replay_orphans()
        assert not seg.exists()
        assert {r.request_id for r in recs} == set(await rows(db_url))
    finally:
        await w.close()
        await db.close()


async def test_records_written_while_closed_down_survive_into_the_next_writer(db_url, pg_server, tmp_path):
    """Postgres down at shutdown: the segment stays on disk; the next writer (same directory) replays it."""
    db, w = await _writer(db_url, tmp_path)
    await w.start()
    recs = synthetic(4, seed=14)
    assert {} == await rows(db_url)
    await checkpoint(db_url)
    pg_server.stop()
    try:
        for r in recs:
            w.record(r)
        await w.close(timeout=3.0)
        await db.close()
        assert 1 == len(list(tmp_path.glob("usage-*.jsonl")))
    finally:
        pg_server.start()
    db2, w2 = await _writer(db_url, tmp_path)
    await w2.start()
    try:
        for _ in range(300):
            if len(await rows(db_url)) == 4:
                break
            await asyncio.sleep(0.05)
        assert {r.request_id for r in recs} == set(await rows(db_url))
    finally:
        await w2.close()
        await db2.close()
