"""The usage ledger writer: journal first, then batches into Postgres, exactly once.

``record()`` (on the hot path) appends the record as one JSON line to this
worker's journal segment with a single ``write(2)``: once it returns the
record is in the kernel's page cache, so a SIGKILLed worker loses nothing.
A flusher task then writes the records in batches (one multi-row
``INSERT ... ON CONFLICT DO NOTHING`` that also adds exactly the inserted rows
to the daily and hourly rollups, in one statement; ``ledger_sql.py``) and
deletes a segment once all its records are committed.  A batch still in
memory is sent as the journal lines ``record()`` already encoded (one JSON
array: no conversion per record in Python); records read back from a file go
as typed column arrays.

Exactly once: a replayed record has the same (request_id, ts) and the ledger's
unique index drops it; the rollup only adds rows the insert returned.

Journal segments are ``usage-<db>-<pid>-<run>-<seq>.jsonl`` in ``journal_dir``; each
is held under an exclusive ``flock`` by its writer for as long as it lives.
Any worker can therefore tell a dead worker's segment (lock free) from a live
one's and replays it (at start and every few seconds): the replacement of a
killed worker, or a sibling, finishes its work.  ``<db>`` fingerprints the
database so that two deployments sharing a directory never swap records.

Outages: records stay in the journal; memory keeps at most
``max_memory_records`` of them (beyond that they are read back from the
journal in batches when Postgres is back).

Refusals: a batch Postgres refuses for its data (``ledger_errors.classify``:
a NUL, an index row too large, a CHECK) is bisected to find the bad
record(s); those are set aside in ``set-aside-<db>-<pid>.jsonl`` in the
journal directory (with the SQLSTATE and reason), counted
(``gateway_usage_events_total{event="set_aside"}``) and reported by
``/readyz`` as degraded while such a file exists; the records behind them
are written as usual.  A refusal is never retried, so a restarted worker
never loops on a poisoned segment.  An operator inspects the file, fixes or
drops the records, and removes it (or renames it to ``usage-<db>-0-fix-1.jsonl``
to have it replayed).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from operator import attrgetter
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import orjson
import structlog

from gateway.accounting.ledger_errors import (
    ENCODING_ERRORS,
    RecordRefused,
    Verdict,
    classify,
    persistent,
    sqlstate,
)
from gateway.accounting.ledger_sql import INSERT_SQL, JSON_INSERT_SQL, columns, tag_column
from gateway.accounting.money import PICO_PER_MICRO
from gateway.accounting.record import _FIELDS, UsageRecord
from gateway.accounting.set_aside import SetAside
from gateway.config import AccountingConfig
from gateway.stores.postgres import Database, DatabaseUnavailable

log = structlog.get_logger("ledger")

SHARDS = 8  # rollup rows per (day, user, key, model): writers spread over them
SEGMENT_MAX_RECORDS = 50_000  # rotate the active segment beyond this (bounded replay reads)
ORPHAN_SCAN_S = 3.0
_FIELD_SET = frozenset(_FIELDS)
_TS = attrgetter("ts")
_NUL = b"\\u0000"  # how orjson writes a NUL character inside a JSON string

__all__ = ["INSERT_SQL", "LedgerWriter", "columns", "db_fingerprint", "decode", "encode", "tag_column"]

PROBE_AFTER = 5  # consecutive persistent failures (same SQLSTATE) before a batch is probed


def db_fingerprint(dsn: str) -> str:
    """A short stable id of the target database (host, port, name), never the credentials."""
    u = urlsplit(dsn)
    ident = f"{u.hostname or ''}:{u.port or 5432}/{u.path.lstrip('/')}"
    return hashlib.sha256(ident.encode()).hexdigest()[:12]


def encode(rec: UsageRecord) -> bytes:
    """One journal line: every field by name (orjson reads the dataclass itself: one call per record)."""
    return orjson.dumps(rec, option=orjson.OPT_APPEND_NEWLINE)


def decode(line: bytes) -> UsageRecord | None:
    """A journal line back into a record; None for a torn or foreign line."""
    try:
        d = orjson.loads(line)
        if not isinstance(d, dict):
            return None
        if "cost_pico" not in d and "cost_micros" in d:  # a journal line of the previous release
            d["cost_pico"] = d["cost_micros"] * PICO_PER_MICRO
        if isinstance(d.get("budget_keys"), list):  # a tuple, as recorded (the limiter keys caches on it)
            d["budget_keys"] = tuple(d["budget_keys"])
        return UsageRecord(**{k: v for k, v in d.items() if k in _FIELD_SET})
    except (orjson.JSONDecodeError, TypeError):
        return None


def read_segment(path: Path, batch_size: int) -> Iterator[list[UsageRecord]]:
    """The records of a journal file in batches (bounded memory); torn lines skipped."""
    batch: list[UsageRecord] = []
    with open(path, "rb") as f:
        for line in f:
            rec = decode(line)
            if rec is None:
                continue
            batch.append(rec)
            if len(batch) >= batch_size:
                yield batch
                batch = []
    if batch:
        yield batch


@dataclass(slots=True)
class LedgerStats:
    """The writer's counters (``gateway_usage_events_total{event=...}``)."""

    recorded: int = 0
    written: int = 0  # rows inserted (duplicates excluded)
    set_aside: int = 0  # records Postgres refused, kept in the set-aside file
    outages: int = 0  # batch writes that failed for an outage (retried with backoff)


@dataclass(eq=False, slots=True)
class _Segment:
    path: Path
    fd: int
    count: int = 0
    mem: list[UsageRecord] | None = field(default_factory=list)  # None: read back from the file
    # The journal lines of ``mem``, as written (None: not kept, e.g. during an outage; the typed path then).
    lines: list[bytes] | None = field(default_factory=list)


class LedgerWriter:
    """UsageSink writing to the journal, then to Postgres in batches."""

    def __init__(self, db: Database, cfg: AccountingConfig) -> None:
        self.db = db
        self.batch_size = max(1, cfg.batch_size)
        self.flush_s = max(cfg.flush_ms, 1) / 1000.0
        self.max_memory = max(cfg.max_memory_records, self.batch_size)
        self.dir = Path(cfg.journal_dir)
        self.prefix = f"usage-{db_fingerprint(db.dsn)}-"
        self.set_aside = SetAside(self.dir, db_fingerprint(db.dsn))
        self._suspect = ("", 0)  # (SQLSTATE, consecutive failures) of a persistent outage
        self.last_outage = ""  # why the last batch could not be written ("" once Postgres took one)
        self.shard = os.getpid() % SHARDS
        self._seq = 0
        self._run_id = secrets.token_hex(4)
        self._active: _Segment | None = None
        self._sealed: list[_Segment] = []
        self._mem_count = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._down_since: float | None = None
        self._last_scan = -ORPHAN_SCAN_S  # scan at start
        self._partitions: set[tuple[int, int]] = set()  # (year, month) known to exist
        self._lock = asyncio.Lock()  # one flush at a time (the flusher, flush(), close())
        self.stats = LedgerStats()  # figures for tests, metrics and the benchmark
        # Called with the records a batch newly committed (those carrying budget
        # keys and a cost) and the committing transaction id: the limiter moves
        # their cost into the Redis budget counters.  It must not raise.
        self.on_commit: Callable[[list[UsageRecord], str], Awaitable[None]] | None = None

    # ------------------------------------------------------------ hot path

    @property
    def written(self) -> int:
        return self.stats.written

    @property
    def recorded(self) -> int:
        return self.stats.recorded

    def record(self, rec: UsageRecord) -> None:
        self.stats.recorded += 1
        seg = self._active
        if seg is None:
            seg = self._active = self._open_segment()
        line = orjson.dumps(rec, option=orjson.OPT_APPEND_NEWLINE)  # encode(), written out
        if seg.fd >= 0:
            try:
                os.write(seg.fd, line)
            except OSError as exc:
                log.error("ledger journal write failed; records kept in memory until it works",
                          error=exc.strerror)
                self._seal()  # what is already on disk stays in that segment
                seg = self._active = _Segment(self.dir / "memory-only", -1)
        seg.count += 1
        lines = seg.lines  # not None: neither is ``mem``
        if lines is not None and self._mem_count < self.max_memory and self._down_since is None:
            # The usual case (Postgres up, memory not full): the record and its line kept for the batch.
            seg.mem.append(rec)  # type: ignore[union-attr]
            lines.append(line)
            self._mem_count += 1
        elif seg.mem is not None:
            if self._mem_count >= self.max_memory and seg.fd >= 0:
                # Bounded memory: the journal has them; read back when flushing.
                self._mem_count -= len(seg.mem)
                seg.mem = seg.lines = None
            else:
                seg.mem.append(rec)
                if seg.lines is not None:
                    if self._down_since is None:
                        seg.lines.append(line)
                    else:  # an outage: memory holds the records only (their lines are in the journal)
                        seg.lines = None
                self._mem_count += 1
        if seg.count >= self.batch_size and self._down_since is None:
            self._wake.set()  # a full batch goes now (during an outage, the backoff decides)

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        try:
            self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            log.error("ledger journal directory unusable; records kept in memory only",
                      dir=str(self.dir), error=exc.strerror)
        self._active = self._open_segment()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self, timeout: float = 10.0) -> None:
        """Flush everything (bounded by ``timeout``); what is left stays journaled for the next worker."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, timeout=timeout)
            except TimeoutError:
                log.warning("ledger flush did not finish before shutdown; left in the journal",
                            segments=len(self._sealed) + 1)
            except Exception:
                log.exception("ledger flusher failed")
        for seg in [*self._sealed, *([self._active] if self._active else [])]:
            if seg.count == 0 and seg.fd >= 0:
                with contextlib.suppress(OSError):
                    os.unlink(seg.path)
            if seg.fd >= 0:
                os.close(seg.fd)  # releases the lock: the next worker replays it
        self._sealed.clear()
        self._active = None

    async def flush(self) -> None:
        """Seal the active segment and write everything now (raises when Postgres is down)."""
        async with self._lock:
            self._seal()
            await self._flush_sealed()

    @property
    def pending(self) -> int:
        return sum(s.count for s in self._sealed) + (self._active.count if self._active else 0)

    # ------------------------------------------------------------ flusher

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        delay = self.flush_s
        next_flush = loop.time() + delay
        while True:
            if not self._closing:
                timeout = max(0.0, min(next_flush, self._last_scan + ORPHAN_SCAN_S) - loop.time())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=timeout)
            woken = self._wake.is_set()
            self._wake.clear()
            try:
                async with self._lock:
                    if loop.time() - self._last_scan >= ORPHAN_SCAN_S:
                        self._last_scan = loop.time()
                        await self._replay_orphans()
                    if woken or self._closing or loop.time() >= next_flush:
                        next_flush = loop.time() + delay
                        if not self._sealed or (
                            self._active is not None and self._active.count >= SEGMENT_MAX_RECORDS
                        ):
                            self._seal()
                        await self._flush_sealed()
            except Exception as exc:  # refusals never get here: _insert sets them aside
                self.stats.outages += 1
                self.last_outage = _outage_reason(exc)
                if self._closing:
                    log.warning("ledger: postgres unavailable at shutdown; records left in the journal",
                                pending=self.pending, error=self.last_outage)
                    return
                if self._down_since is None:
                    self._down_since = loop.time()
                    for seg in [*self._sealed, *([self._active] if self._active else [])]:
                        seg.lines = None  # memory bounded by max_memory_records as before
                    if isinstance(exc, DatabaseUnavailable | asyncpg.PostgresError | OSError | asyncpg.InterfaceError):
                        log.warning("ledger: postgres unavailable; journaling until it is back", error=self.last_outage)
                    else:  # not a database error at all: a bug, retried like an outage but loud
                        log.exception("ledger: batch write failed; journaling and retrying", error=self.last_outage)
                delay = min(max(delay * 2, 0.25), 5.0)
                next_flush = loop.time() + delay
                self._wake.clear()
                continue
            self.last_outage = ""
            if self._down_since is not None and not self._sealed:
                log.info("ledger: postgres back; journal replayed", outage_s=round(loop.time() - self._down_since, 1))
                self._down_since = None
                delay = self.flush_s
            if self._closing:
                self._seal()
                if not self._sealed:
                    return

    def _open_segment(self) -> _Segment:
        self._seq += 1
        # pid + a random run id: a pid reused after a restart never names (or overwrites) an orphan.
        name = f"{self.prefix}{os.getpid()}-{self._run_id}-{self._seq}.jsonl"
        path = self.dir / name
        tmp = self.dir / f".{name}.tmp"  # invisible to scanners until locked
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                os.link(tmp, path)  # fails rather than replace an existing file
            except OSError:
                os.close(fd)
                raise
            finally:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
        except OSError as exc:
            log.error("ledger journal unavailable; records kept in memory only", error=exc.strerror)
            return _Segment(path, -1)
        return _Segment(path, fd)

    def _seal(self) -> None:
        seg = self._active
        if seg is None or seg.count == 0:
            return
        self._sealed.append(seg)
        self._active = self._open_segment()

    async def _flush_sealed(self) -> None:
        while self._sealed:
            seg = self._sealed[0]
            if seg.mem is not None:
                lines = seg.lines
                for i in range(0, len(seg.mem), self.batch_size):
                    await self._insert(seg.mem[i : i + self.batch_size],
                                       None if lines is None else lines[i : i + self.batch_size])
                self._mem_count -= len(seg.mem)
            else:
                for batch in read_segment(seg.path, self.batch_size):
                    await self._insert(batch)
            self._sealed.pop(0)
            if seg.fd >= 0:
                os.unlink(seg.path)  # committed: unlink while still holding the lock
                os.close(seg.fd)

    async def _replay_orphans(self) -> None:
        """Replay journal segments whose writer is dead (their lock is free)."""
        try:
            names = sorted(n for n in os.listdir(self.dir) if n.startswith(self.prefix) and n.endswith(".jsonl"))
        except OSError:
            return
        mine = {s.path.name for s in self._sealed} | ({self._active.path.name} if self._active else set())
        for name in names:
            if name in mine:
                continue
            path = self.dir / name
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as exc:
                    if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                        continue  # a live writer holds it
                    raise
                if os.fstat(fd).st_nlink == 0:
                    continue  # its writer committed and unlinked it meanwhile
                n = 0
                for batch in read_segment(path, self.batch_size):
                    n += await self._insert(batch)
                os.unlink(path)
                log.info("ledger: replayed a journal segment", segment=name, inserted=n)
            finally:
                os.close(fd)

    async def _insert(self, batch: list[UsageRecord], lines: list[bytes] | None = None) -> int:
        """Insert a batch (duplicates skipped); records Postgres refuses are set aside, the rest go in.

        An outage raises (the caller retries the whole segment later; what went in
        meanwhile is deduplicated).  A refusal is bisected down to the bad records.
        A persistent outage is probed (``_probe``) every ``PROBE_AFTER``-th time it repeats.
        """
        if self.set_aside.ids:
            kept = [r for r in batch if r.request_id not in self.set_aside.ids]
            if len(kept) != len(batch):
                batch, lines = kept, None
        if not batch:
            return 0
        try:
            n = await self._insert_rows(batch, lines)
        except Exception as exc:
            if classify(exc) is Verdict.OUTAGE:
                if persistent(exc) and self._repeats(exc) % PROBE_AFTER == 0:
                    return await self._probe(batch, exc)
                raise
            if len(batch) == 1:
                self._set_aside(batch[0], exc)
                return 0
        else:
            self._suspect = ("", 0)
            return n
        mid = len(batch) // 2
        if lines is None:
            return await self._insert(batch[:mid]) + await self._insert(batch[mid:])
        return await self._insert(batch[:mid], lines[:mid]) + await self._insert(batch[mid:], lines[mid:])

    def _repeats(self, exc: BaseException) -> int:
        """How many times in a row batches failed with this SQLSTATE."""
        state = sqlstate(exc)
        count = self._suspect[1] + 1 if self._suspect[0] == state else 1
        self._suspect = (state, count)
        return count

    async def _probe(self, batch: list[UsageRecord], exc: BaseException) -> int:
        """A batch keeps failing with an error Postgres answers: is it the records' fault or the database's?

        A harmless canary record is written in a transaction that is rolled back.  If Postgres
        refuses it too, every write fails: an outage (raise).  If it takes it, the batch is
        bisected and the records that still fail are set aside; the others go in.
        """
        if await self._canary() is not None:
            raise exc
        failed: list[tuple[UsageRecord, BaseException]] = []
        written = await self._probe_insert(batch, failed)
        for rec, err in failed:
            self._set_aside(rec, err)
        self._suspect = ("", 0)
        return written

    async def _canary(self) -> BaseException | None:
        """Write a harmless record of now and roll it back: the error Postgres gives, or None."""
        probe = UsageRecord(
            request_id=f"ledger-canary-{secrets.token_hex(6)}", ts=time.time(), key_id="ledger-canary",
            user_id="ledger-canary", model="ledger-canary", route="", upstream="", status=0, streamed=False,
            partial=False, input_tokens=0, output_tokens=0, cache_write_tokens=0, cache_read_tokens=0, cost_pico=0,
            priced=True, upstream_ms=0.0, ttft_ms=None, gateway_ms=0.0,
        )
        cols = columns([probe])
        try:
            async with self.db.connection(timeout=5.0) as conn, conn.transaction():
                await conn.execute("SELECT usage_ledger_ensure_partition($1)", cols[1][0], timeout=10.0)
                await conn.fetchrow(INSERT_SQL, *cols, self.shard, timeout=30.0)
                raise _RolledBack
        except _RolledBack:
            return None
        except Exception as exc:  # any failure of the canary is the answer
            if classify(exc) is Verdict.OUTAGE and not persistent(exc):
                raise  # a real outage meanwhile
            return exc

    async def _probe_insert(self, batch: list[UsageRecord], failed: list[tuple[UsageRecord, BaseException]]) -> int:
        try:
            return await self._insert_rows(batch)  # typed: a probe is rare and its records few
        except Exception as exc:
            if classify(exc) is Verdict.OUTAGE and not persistent(exc):
                raise  # a real outage meanwhile: retried later like any other
            if len(batch) == 1:
                failed.append((batch[0], exc))
                return 0
        mid = len(batch) // 2
        return await self._probe_insert(batch[:mid], failed) + await self._probe_insert(batch[mid:], failed)

    async def _insert_rows(self, batch: list[UsageRecord], lines: list[bytes] | None = None) -> int:
        # First: a record that cannot be encoded is refused, not an outage.
        payload = b"[" + b",".join(lines) + b"]" if lines is not None else b""
        if lines is None or _NUL in payload:  # a NUL: Postgres refuses it as text (22021), as a typed column
            cols = columns(batch)
            months = {(t.year, t.month) for t in cols[1]}
            sql, args = INSERT_SQL, (*cols, self.shard)
        else:
            months = _months(batch)
            sql, args = JSON_INSERT_SQL, (payload.decode(), self.shard)
        months -= self._partitions
        async with self.db.connection(timeout=5.0) as conn:
            for y, m in sorted(months):
                await conn.execute(
                    "SELECT usage_ledger_ensure_partition($1)", datetime(y, m, 1, tzinfo=UTC), timeout=10.0
                )
                self._partitions.add((y, m))
            row = await conn.fetchrow(sql, *args, timeout=30.0)
        ids = row["ids"] or []
        n = len(ids)
        self.stats.written += n
        if self.on_commit is not None:
            # Only rows this statement inserted (a replayed duplicate was applied when first committed);
            # all of them, the usual case: no set to look each record up in.
            if n == len(batch):
                committed = [r for r in batch if r.budget_keys and r.cost_pico]
            else:
                new = set(ids)
                committed = [r for r in batch if r.budget_keys and r.cost_pico and r.request_id in new]
            if committed:
                try:
                    await self.on_commit(committed, row["xid"])
                except Exception:  # committed is committed: never retry the batch for this
                    log.exception("ledger: budget application failed")
        return n

    def _set_aside(self, rec: UsageRecord, exc: BaseException) -> None:
        self.stats.set_aside += 1
        self.set_aside.add(rec, exc)


def _months(batch: list[UsageRecord]) -> set[tuple[int, int]]:
    """The (year, month) partitions a batch needs, from its earliest and latest record when they agree."""
    try:
        lo, hi = datetime.fromtimestamp(min(map(_TS, batch)), UTC), datetime.fromtimestamp(max(map(_TS, batch)), UTC)
        if (lo.year, lo.month) == (hi.year, hi.month):
            return {(lo.year, lo.month)}
        return {(t.year, t.month) for t in (datetime.fromtimestamp(r.ts, UTC) for r in batch)}
    except ENCODING_ERRORS as exc:
        raise RecordRefused(f"{type(exc).__name__}: {exc}") from None


class _RolledBack(Exception):
    """Rolls the canary's transaction back."""


def _outage_reason(exc: BaseException) -> str:
    """A short, secret-free reason: the class and SQLSTATE (a DSN in a message may hold a password)."""
    state = sqlstate(exc)
    if isinstance(exc, DatabaseUnavailable):
        return str(exc)
    return f"{type(exc).__name__} {state}".strip()
