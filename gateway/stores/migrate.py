"""Ordered SQL migrations: apply the missing ones, each in a transaction, under a lock.

Files in ``migrations/`` are named ``NNNN_description.sql`` and applied in
lexical order.  ``schema_migrations`` records each applied version with the
file's SHA-256.  A session advisory lock serialises concurrent runs (two
gateways migrating at once), so running ``migrate`` twice changes nothing.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import structlog

from gateway.resources import MIGRATIONS_DIR as MIGRATIONS_DIR

# pg_advisory_lock key: any constant unique to this application ("llmgwmig").
LOCK_KEY = 0x6C6C6D67776D6967
_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")

log = structlog.get_logger("migrate")

_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version     text PRIMARY KEY,
    name        text NOT NULL,
    checksum    text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
)
"""


class SchemaOutdated(RuntimeError):
    """The database lacks migrations this gateway needs."""


class MigrationsMissing(RuntimeError):
    """No migration files where they should be: an incomplete installation, never "nothing to do"."""


@dataclass(frozen=True, slots=True)
class Migration:
    version: str
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def discover(directory: Path | None = None) -> list[Migration]:
    """Every ``NNNN_name.sql`` in lexical order; duplicated versions are an error."""
    d = directory or MIGRATIONS_DIR
    found: list[Migration] = []
    seen: dict[str, str] = {}
    for path in sorted(d.glob("*.sql")):
        m = _NAME.match(path.name)
        if m is None:
            raise ValueError(f"{path}: migration files must be named NNNN_lowercase_name.sql")
        version = m.group(1)
        if version in seen:
            raise ValueError(f"{path}: version {version} already used by {seen[version]}")
        seen[version] = path.name
        found.append(Migration(version, path.name, path.read_text()))
    if not found:
        raise MigrationsMissing(
            f"no migrations found in {d}: the installation is incomplete (a release must ship its "
            "migrations; see README, Install under systemd) or --dir points to the wrong place"
        )
    return found


async def applied(conn: asyncpg.Connection) -> dict[str, str]:
    """version -> checksum of what the database has applied (empty on a fresh database)."""
    exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    if not exists:
        return {}
    rows = await conn.fetch("SELECT version, checksum FROM schema_migrations")
    return {r["version"]: r["checksum"] for r in rows}


async def pending(conn: asyncpg.Connection, directory: Path | None = None) -> list[Migration]:
    done = await applied(conn)
    return [m for m in discover(directory) if m.version not in done]


async def check_schema(conn: asyncpg.Connection, directory: Path | None = None) -> None:
    """Raise SchemaOutdated, telling the operator to run ``migrate``, when any migration is missing."""
    missing = await pending(conn, directory)
    if missing:
        names = ", ".join(m.name for m in missing)
        raise SchemaOutdated(
            f"the database schema is older than this gateway needs (missing: {names}); "
            "run `llm-gateway migrate` first"
        )


async def migrate(conn: asyncpg.Connection, directory: Path | None = None) -> list[str]:
    """Apply every missing migration in order; returns the names applied (empty if none)."""
    migrations = discover(directory)
    done_names: list[str] = []
    await conn.execute("SELECT pg_advisory_lock($1)", LOCK_KEY)
    try:
        await conn.execute(_CREATE_TABLE)
        done = await applied(conn)
        for m in migrations:
            if m.version in done:
                if done[m.version] != m.checksum:
                    log.warning("applied migration changed on disk; not re-applied", migration=m.name)
                continue
            async with conn.transaction():
                await conn.execute(m.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                    m.version, m.name, m.checksum,
                )
            done_names.append(m.name)  # the caller reports it (the CLI prints one line per migration)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", LOCK_KEY)
    return done_names


async def migrate_dsn(dsn: str, directory: Path | None = None) -> list[str]:
    conn = await asyncpg.connect(dsn)
    try:
        return await migrate(conn, directory)
    finally:
        await conn.close()
