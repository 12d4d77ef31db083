"""A cloud credential kept fresh in the background, read from memory on the hot path.

The SDKs that know each cloud's credential chain (botocore, google-auth) and
token commands are synchronous: every fetch runs in a worker thread, one at a
time per credential, so the event loop never waits on a file, a subprocess or
a metadata server.  A request reads the cached value; only a credential that
has not been obtained yet (start-up) makes a request wait for the fetch in
flight, bounded by ``fetch_timeout``; after a failed fetch requests fail at
once with its reason while the background loop retries with backoff.

Reasons are written by the fetchers for operators and never hold a secret.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from gateway.tasks import stop

T = TypeVar("T")
REFUSED_EVERY_S = 30.0


class CredentialError(Exception):
    """A credential that cannot be obtained; ``reason`` is safe to show anywhere."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Fetched(Generic[T]):
    value: T
    expires_at: float | None = None  # unix time; None: does not expire (or unknown, see refresh_every)


class CredentialCache(Generic[T]):
    """One credential: fetched in a thread, refreshed ``margin`` seconds before it expires."""

    def __init__(
        self,
        what: str,
        fetch: Callable[[], Fetched[T]],
        *,
        forget: Callable[[], None] | None = None,
        margin: float = 300.0,
        refresh_every: float | None = None,
        fetch_timeout: float = 10.0,
        retry_min: float = 1.0,
        retry_max: float = 30.0,
    ) -> None:
        self.what = what  # e.g. "AWS credentials": names the credential in reasons
        self._fetch = fetch
        self._forget = forget  # drop what the fetcher resolved once (a credential chain), so that it resolves again
        self._margin = margin
        self._refresh_every = refresh_every
        self._fetch_timeout = fetch_timeout
        self._retry_min = retry_min
        self._retry_max = retry_max
        self._value: T | None = None
        self._expires_at: float | None = None
        self._reason = "not fetched yet"
        self._failed_at: float | None = None  # monotonic time of the last failed fetch
        self._failures = 0
        self.fetches = 0  # successful fetches (the first one and refreshes)
        self._refused_at = -1e9  # monotonic time of the last refusal that started a fetch
        self._inflight: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None

    # -- the hot path ------------------------------------------------------------

    def _usable(self) -> bool:
        return self._value is not None and (self._expires_at is None or time.time() < self._expires_at - 5.0)

    async def get(self) -> T:
        """The current credential, or CredentialError at once (or within ``fetch_timeout``)."""
        if self._usable():
            return self._value  # type: ignore[return-value]
        if self._failed_at is not None:
            # The background loop retries with backoff: requests never queue up behind it.
            raise CredentialError(f"{self.what}: {self._reason}")
        try:
            await asyncio.wait_for(asyncio.shield(self._refresh()), self._fetch_timeout)
        except TimeoutError:
            raise CredentialError(f"{self.what}: not obtained within {self._fetch_timeout:g} s") from None
        if not self._usable():
            raise CredentialError(f"{self.what}: {self._reason}")
        return self._value  # type: ignore[return-value]

    # -- fetching ----------------------------------------------------------------------

    def _refresh(self) -> asyncio.Future[None]:
        """One fetch in flight at a time; callers share it."""
        if self._inflight is None:
            self._inflight = asyncio.ensure_future(self._run_fetch())
        return self._inflight

    async def _run_fetch(self) -> None:
        try:
            got = await asyncio.to_thread(self._fetch)
        except CredentialError as exc:
            self._fail(exc.reason)
        except Exception as exc:  # noqa: BLE001 - a fetcher's unexpected error: class name only, no text
            self._fail(f"unexpected {type(exc).__name__}")
        else:
            self._value, self._expires_at = got.value, got.expires_at
            self._failed_at, self._failures = None, 0
            self._reason = ""
            self.fetches += 1
        finally:
            self._inflight = None

    def refused(self) -> None:
        """The service refused the credential (revoked early?): fetch a new one now, in the background.

        Requests keep the current one meanwhile; at most one such fetch per ``REFUSED_EVERY_S``, so a
        storm of refusals never becomes a storm of fetches.
        """
        now = time.monotonic()
        if self._inflight is None and now - self._refused_at > REFUSED_EVERY_S:
            self._refused_at = now
            if self._forget is not None:
                self._forget()
            self._refresh()

    def _fail(self, reason: str) -> None:
        self._reason = reason
        self._failed_at = time.monotonic()
        self._failures += 1

    def _next_refresh_in(self) -> float:
        if self._failed_at is not None:
            return float(min(self._retry_max, self._retry_min * 2.0 ** min(self._failures - 1, 8)))
        if self._expires_at is not None:
            return max(1.0, min(3600.0, self._expires_at - self._margin - time.time()))
        return float(self._refresh_every) if self._refresh_every is not None else 3600.0

    async def _keep_fresh(self) -> None:
        while True:
            await asyncio.sleep(self._next_refresh_in())
            with contextlib.suppress(Exception):
                await self._refresh()

    # -- lifecycle and readiness ---------------------------------------------------------

    async def start(self, first_wait: float) -> None:
        """Fetch once (waiting up to ``first_wait``), then keep it fresh in the background."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._refresh()), first_wait)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._keep_fresh())

    async def close(self) -> None:
        await stop(self._task)
        self._task = None
        if self._inflight is not None:
            # The thread cannot be interrupted; do not wait for it.
            self._inflight.cancel()
            self._inflight = None

    def status(self) -> dict[str, Any]:
        if self._usable():
            out: dict[str, Any] = {"status": "ok"}
            if self._expires_at is not None:
                out["expires_in_s"] = round(self._expires_at - time.time())
            return out
        if self._value is None and self._failed_at is None:
            return {"status": "down", "error": f"{self.what}: not obtained yet"}
        return {"status": "down", "error": f"{self.what}: {self._reason or 'expired'}"}
