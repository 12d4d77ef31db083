"""CLI commands that work on Postgres directly (no HTTP): migrate, users, keys.

    llm-gateway migrate [--status]
    llm-gateway users create --email admin@example.com --role admin   # password: prompt, stdin or env
    llm-gateway users list
    llm-gateway keys create --user admin@example.com --name ci [--models 'claude-*'] [--rpm 60]
    llm-gateway keys list [--user admin@example.com] [--all]
    llm-gateway keys revoke <key id>

Every change is written to the audit log with actor 'cli'.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import os
import sys
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import orjson

from gateway.cli import EXTRA_COMMANDS, _load
from gateway.config import Config, Limits
from gateway.stores import access_keys, audit, migrate, users
from gateway.stores.postgres import CONNECTIVITY_ERRORS, _init_connection, unavailable_message


def _dsn(cfg: Config) -> str:
    if not cfg.database_url:
        print(f"error: set {cfg.database.url_env} to the Postgres URL (postgresql://...)", file=sys.stderr)
        raise SystemExit(2)
    return cfg.database_url


def _run(coro: Awaitable[int]) -> int:
    try:
        return asyncio.run(coro)  # type: ignore[arg-type]
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except (migrate.MigrationsMissing, ValueError) as exc:  # no migrations shipped; a misnamed file
        print(f"error: {exc}", file=sys.stderr)
        return 1


async def _with_conn(cfg: Config, fn: Callable[[Any], Awaitable[int]]) -> int:
    dsn = _dsn(cfg)
    try:
        conn = await asyncpg.connect(dsn, timeout=10)
    except (*CONNECTIVITY_ERRORS, asyncpg.PostgresError) as exc:
        print(f"error: {unavailable_message(dsn, exc)}", file=sys.stderr)
        return 1
    try:
        await _init_connection(conn)
        return await fn(conn)
    finally:
        await conn.close()


# ---------------------------------------------------------------- migrate


def _configure_migrate(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", default=None, help=f"migrations directory (default {migrate.MIGRATIONS_DIR})")
    p.add_argument("--status", action="store_true", help="list pending migrations, apply nothing")


def cmd_migrate(args: argparse.Namespace) -> int:
    from pathlib import Path

    cfg = _load(args)
    directory = Path(args.dir) if args.dir else None

    async def go(conn: Any) -> int:
        if args.status:
            todo = await migrate.pending(conn, directory)
            for m in todo:
                print(f"pending: {m.name}")
            print(f"{len(todo)} pending migration(s)")
            return 0
        done = await migrate.migrate(conn, directory)
        for name in done:
            print(f"applied: {name}")
        print(f"schema up to date ({len(done)} applied)")
        return 0

    return _run(_with_conn(cfg, go))


# ---------------------------------------------------------------- users


def _configure_users(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True)
    c = sub.add_parser("create", help="create a user (e.g. the first admin)")
    c.add_argument("--email", required=True)
    c.add_argument("--name", default="")
    c.add_argument("--role", choices=("admin", "user"), default="user")
    c.add_argument("--password-env", default=None, help="read the password from this environment variable")
    c.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    c.add_argument("--no-password", action="store_true", help="a user who cannot log in (keys only)")
    sub.add_parser("list", help="list users")


def _read_password(args: argparse.Namespace) -> str | None:
    """The new user's password from --password-env, --password-stdin or a prompt; a clear error
    (exit 2), never a traceback, when none of them can give one."""
    if args.no_password:
        return None
    if args.password_env:
        if args.password_env not in os.environ:
            raise SystemExit(f"error: --password-env {args.password_env}: that environment variable is not set")
        pw = os.environ[args.password_env]
    elif args.password_stdin:
        line = sys.stdin.readline()
        if not line:
            raise SystemExit("error: --password-stdin: standard input is empty (send the password as one line)")
        pw = line.rstrip("\n")
    else:
        if not sys.stdin.isatty():
            raise SystemExit("error: no terminal to ask for the password: use --password-env VAR, "
                             "--password-stdin, or --no-password (a user who cannot log in)")
        try:
            pw = getpass.getpass("password: ")
            if getpass.getpass("again: ") != pw:
                raise SystemExit("error: passwords differ")
        except (EOFError, KeyboardInterrupt):
            raise SystemExit("error: no password given") from None
    from gateway.auth.passwords import MAX_PASSWORD_LEN, MIN_PASSWORD_LEN

    if not MIN_PASSWORD_LEN <= len(pw) <= MAX_PASSWORD_LEN:
        raise SystemExit(f"error: the password needs {MIN_PASSWORD_LEN} to {MAX_PASSWORD_LEN} characters")
    return pw


def cmd_users(args: argparse.Namespace) -> int:
    cfg = _load(args)
    if args.action == "list":
        async def show(conn: Any) -> int:
            after = None
            while True:
                page = await users.list_page(conn, limit=200, after=after)
                for u in page:
                    state = "disabled" if u.disabled else "active"
                    print(f"{u.id}  {u.role:5}  {state:8}  {u.email}")
                if len(page) < 200:
                    return 0
                after = (page[-1].created_at, page[-1].id)

        return _run(_with_conn(cfg, show))

    from gateway.admin.validation import EMAIL
    from gateway.auth.passwords import Passwords

    email = args.email.strip().lower()
    if not EMAIL.match(email):
        print("error: --email is not an email address", file=sys.stderr)
        return 2
    pw = _read_password(args)
    pw_hash = Passwords(cfg.auth).hasher.hash(pw) if pw is not None else None

    async def create(conn: Any) -> int:
        async with conn.transaction():
            try:
                user = await users.create(conn, email=email, name=args.name, password_hash=pw_hash, role=args.role)
            except users.EmailTaken:
                print(f"error: a user with email {email} exists", file=sys.stderr)
                return 1
            await audit.record(conn, audit.CLI, "user.create", "user", user.id, {"role": args.role})
        print(orjson.dumps(user.public()).decode())
        return 0

    return _run(_with_conn(cfg, create))


# ---------------------------------------------------------------- keys


def _configure_keys(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True)
    c = sub.add_parser("create", help="create an access key (printed once)")
    c.add_argument("--user", required=True, help="the owner's email or id")
    c.add_argument("--name", default="")
    c.add_argument("--models", nargs="*", default=None, help="allowed models or globs")
    c.add_argument("--rpm", type=int, default=None)
    c.add_argument("--tpm", type=int, default=None)
    c.add_argument("--max-concurrency", type=int, default=None)
    c.add_argument("--budget-usd", type=float, default=None)
    c.add_argument("--budget-period", choices=("day", "month", "total"), default="total")
    r = sub.add_parser("revoke", help="revoke a key by id")
    r.add_argument("key_id")
    ls = sub.add_parser("list", help="list keys: id, prefix, name, status, owner (never the key)")
    ls.add_argument("--user", default=None, help="only this owner's keys (email or id)")
    ls.add_argument("--all", action="store_true", help="revoked and expired keys too (default: active only)")


def _key_status(key: access_keys.AccessKey) -> str:
    from datetime import UTC, datetime

    if key.revoked_at is not None:
        return "revoked"
    if key.expires_at is not None and key.expires_at <= datetime.now(UTC):
        return "expired"
    return "active"


async def _find_user(conn: Any, ref: str) -> users.User | None:
    try:
        return await users.get(conn, str(uuid.UUID(ref)))
    except ValueError:
        return await users.get_by_email(conn, ref.strip().lower())


def _list_keys(cfg: Config, args: argparse.Namespace) -> int:
    async def show(conn: Any) -> int:
        owner = None
        if args.user is not None:
            owner = await _find_user(conn, args.user)
            if owner is None:
                print(f"error: no user {args.user}", file=sys.stderr)
                return 1
        emails: dict[str, str] = {}
        after = None
        print(f"{'id':36}  {'prefix':12}  {'status':7}  {'owner':30}  name")
        while True:
            page = await access_keys.list_page(conn, limit=200, after=after, user_id=owner.id if owner else None,
                                               status=None if args.all else "active")
            for k in page:
                if k.user_id not in emails:
                    u = await users.get(conn, k.user_id)
                    emails[k.user_id] = u.email if u is not None else k.user_id
                print(f"{k.id:36}  {k.prefix:12}  {_key_status(k):7}  {emails[k.user_id]:30}  {k.name}")
            if len(page) < 200:
                return 0
            after = (page[-1].created_at, page[-1].id)

    return _run(_with_conn(cfg, show))


def cmd_keys(args: argparse.Namespace) -> int:
    cfg = _load(args)
    if args.action == "list":
        return _list_keys(cfg, args)
    if args.action == "revoke":
        try:
            key_id = str(uuid.UUID(args.key_id))
        except ValueError:
            print("error: not a key id", file=sys.stderr)
            return 2

        async def revoke(conn: Any) -> int:
            async with conn.transaction():
                key = await access_keys.revoke(conn, key_id)
                if key is None:
                    print("error: no such key", file=sys.stderr)
                    return 1
                await audit.record(conn, audit.CLI, "key.revoke", "key", key_id, {"prefix": key.prefix})
            print(f"revoked {key.prefix}… ({key_id})")
            return 0

        return _run(_with_conn(cfg, revoke))

    for name in ("rpm", "tpm", "max_concurrency"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            print(f"error: --{name.replace('_', '-')} must be positive", file=sys.stderr)
            return 2
    limits = Limits(
        models=tuple(args.models) if args.models else None, rpm=args.rpm, tpm=args.tpm,
        max_concurrency=args.max_concurrency, budget_usd=args.budget_usd, budget_period=args.budget_period,
    )

    async def create(conn: Any) -> int:
        try:
            user = await users.get(conn, str(uuid.UUID(args.user)))
        except ValueError:
            user = await users.get_by_email(conn, args.user.strip().lower())
        if user is None:
            print(f"error: no user {args.user}", file=sys.stderr)
            return 1
        async with conn.transaction():
            key, plaintext = await access_keys.create(conn, user_id=user.id, name=args.name, limits=limits)
            await audit.record(conn, audit.CLI, "key.create", "key", key.id, {"user_id": user.id,
                                                                                "prefix": key.prefix})
        print(orjson.dumps({**key.public(), "key": plaintext}).decode())
        print("# the key is shown once; store it now", file=sys.stderr)
        return 0

    return _run(_with_conn(cfg, create))


EXTRA_COMMANDS["migrate"] = ("apply the SQL migrations in migrations/ (idempotent)", _configure_migrate, cmd_migrate)
EXTRA_COMMANDS["users"] = ("create or list users without the HTTP API", _configure_users, cmd_users)
EXTRA_COMMANDS["keys"] = ("create, list or revoke access keys without the HTTP API", _configure_keys, cmd_keys)
