"""What every control-plane handler needs: a connection (503 when Postgres is down)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from gateway import keys
from gateway.auth.responses import unavailable
from gateway.policy.cache import PostgresResolver
from gateway.stores.postgres import DatabaseUnavailable


@contextlib.asynccontextmanager
async def connect(request: web.Request, *, transaction: bool = False) -> AsyncIterator[Any]:
    db = request.app.get(keys.PG)
    if db is None:
        raise unavailable("The admin API needs a database; this gateway runs standalone.")
    try:
        if transaction:
            async with db.transaction(timeout=5.0) as conn:
                yield conn
        else:
            async with db.connection(timeout=5.0) as conn:
                yield conn
    except DatabaseUnavailable:
        raise unavailable() from None


def invalidate(request: web.Request, *, key_id: str | None = None, user_id: str | None = None) -> None:
    """Drop cached principals in this worker now; NOTIFY reaches every other worker."""
    resolver = request.app.get(keys.RESOLVER)
    if not isinstance(resolver, PostgresResolver):
        return
    if key_id is not None:
        resolver.invalidate_key(key_id)
    if user_id is not None:
        resolver.invalidate_user(user_id)
