"""Running the limiter's Lua scripts: EVALSHA with a NOSCRIPT fallback, one call or many per round trip.

The fast connection (``stores/resp.py``) pipelines by itself and enforces the
timeout with its watchdog; through redis-py (Sentinel, Cluster) many calls go
in one pipeline, or, on a Cluster (whose pipelines refuse scripts), all in
flight at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoScriptError

from gateway.stores import redis_scripts as scripts
from gateway.stores.redis import REDIS_ERRORS, RedisStore
from gateway.stores.resp import encode_parts


@dataclass(slots=True)
class Call:
    """One script call's KEYS and ARGV."""

    keys: list[str]
    args: list[Any]


class ScriptRunner:
    def __init__(self, store: RedisStore, timeout: float) -> None:
        self.store = store
        self.timeout = timeout

    async def load_all(self, timeout: float) -> None:
        """Load every script before traffic (the first request pays no NOSCRIPT round trip)."""
        try:
            async with asyncio.timeout(timeout):
                for script in scripts.ALL:
                    if self.store.fast is not None:
                        await self.store.fast.call("SCRIPT", "LOAD", script.source)
                    else:
                        await self.store.client.script_load(script.source)
        except REDIS_ERRORS as exc:
            self.store.failed(exc)

    async def eval(self, script: scripts.Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
        fast = self.store.fast
        if fast is not None:  # its watchdog enforces the timeout
            try:
                return await fast.call("EVALSHA", script.sha, len(keys), *keys, *args)
            except NoScriptError:
                return await fast.call("EVAL", script.source, len(keys), *keys, *args)
        client = self.store.client
        async with asyncio.timeout(self.timeout):
            try:
                return await client.evalsha(script.sha, len(keys), *keys, *args)  # type: ignore[no-untyped-call]
            except NoScriptError:
                return await client.eval(script.source, len(keys), *keys, *args)  # type: ignore[no-untyped-call]

    async def eval_encoded(self, script: scripts.Script, nkeys: int, keys: bytes, args: Sequence[Any]) -> Any:
        """EVALSHA on the fast connection with the KEYS already encoded (RESP bulk strings); EVAL on NOSCRIPT."""
        fast = self.store.fast
        assert fast is not None
        body = encode_parts(nkeys) + keys + encode_parts(*args)
        count = 3 + nkeys + len(args)
        try:
            return await fast.call_encoded(count, script.head + body)
        except NoScriptError:
            return await fast.call_encoded(count, encode_parts("EVAL", script.source) + body)

    async def eval_many(self, script: scripts.Script, items: Sequence[Call]) -> None:
        """One round trip for many calls of ``script`` (per node on a Cluster); raises the first error."""
        if len(items) == 1 or self.store.fast is not None:  # the fast connection pipelines by itself
            results = await asyncio.gather(
                *(self.eval(script, it.keys, it.args) for it in items), return_exceptions=True
            )
            for r in results:
                if isinstance(r, BaseException):
                    raise r
            return
        async with asyncio.timeout(self.timeout * 2):
            results = await self._pipeline(script, items)
            missing = [it for it, r in zip(items, results, strict=True) if isinstance(r, NoScriptError)]
            if missing:
                await self.store.client.script_load(script.source)
                results = await self._pipeline(script, missing)
        for r in results:
            if isinstance(r, REDIS_ERRORS):
                raise r

    async def eval_chunked(self, script: scripts.Script, items: Sequence[Call], size: int = 500) -> None:
        for start in range(0, len(items), size):
            await self.eval_many(script, items[start : start + size])

    async def _pipeline(self, script: scripts.Script, items: Sequence[Call]) -> list[Any]:
        client = self.store.client
        if isinstance(client, RedisCluster):
            # Cluster pipelines refuse scripts: one call per item, all in flight at once.
            calls = (client.evalsha(script.sha, len(it.keys), *it.keys, *it.args) for it in items)  # type: ignore[no-untyped-call]
            return await asyncio.gather(*calls, return_exceptions=True)
        pipe = client.pipeline(transaction=False)
        for it in items:
            pipe.evalsha(script.sha, len(it.keys), *it.keys, *it.args)  # type: ignore[no-untyped-call]
        return await pipe.execute(raise_on_error=False)  # type: ignore[no-any-return]
