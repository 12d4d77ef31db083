"""Walk one request's deployments until one can be relayed: retry, fail over, hedge.

Everything here happens before the first byte reached the client (an
attempt is committed only once it is chosen):

- each deployment is tried up to ``1 + retries`` times when the failure is
  one a retry can fix (the classifier's ``retry_same``), after a backoff with
  full jitter or the upstream's ``retry-after`` (if longer than
  ``max_retry_wait``: fail over at once), and only while the upstream's
  retry budget has a token;
- then the next deployment (route deployments, fallbacks, fallback_models);
- a context-length 400 switches to ``context_fallback_models`` when the
  route names them, else it is relayed;
- a caller error is relayed at once;
- with ``hedge_after_ms``, a second lane starts on the next deployment when
  the first has no answer by then (``hedging.py``).

When nothing is left, the last upstream answer is relayed as it is (an error
in the client's dialect), or the gateway answers its own error for the last
failure (502, 504), or 529/503 when every circuit was open.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence

from gateway.accounting.sse import StreamTap
from gateway.accounting.usage import Usage
from gateway.errors import ErrorKind, GatewayError
from gateway.proxy.attempts import Attempt, AttemptFailed, Opened, UpstreamRequest
from gateway.proxy.context import RequestContext
from gateway.proxy.failures import Failure, Verdict
from gateway.proxy.hedging import Exhausted, race
from gateway.proxy.routing import Deployment
from gateway.resilience.breaker import State
from gateway.resilience.retry import backoff
from gateway.upstream.client import LeanSession

CLOSED = State.CLOSED

Sleep = Callable[[float], Awaitable[None]]


class Failover:
    __slots__ = (
        "_context",
        "_first",
        "_hedge_after",
        "_lanes",
        "_last",
        "_open_retry",
        "_queue",
        "_reserve_hedge",
        "_sleep",
        "_winner",
        "abandoned",
        "ctx",
        "req",
        "session",
    )

    def __init__(
        self,
        session: LeanSession,
        ctx: RequestContext,
        req: UpstreamRequest,
        candidates: Sequence[Deployment],
        context: Sequence[Deployment] = (),
        hedge_after_ms: int = 0,
        reserve_hedge: Callable[[], Awaitable[bool]] | None = None,
        sleep: Sleep | None = None,
    ) -> None:
        self.session = session
        self.ctx = ctx
        self.req = req
        self._queue: deque[Deployment] = deque(candidates)
        self._context: Sequence[Deployment] | None = context or None
        self._hedge_after = hedge_after_ms / 1000.0
        self._reserve_hedge = reserve_hedge
        self._sleep = sleep
        self._last: AttemptFailed | None = None
        self._open_retry: list[float] = []
        self._winner: Opened | None = None
        self._lanes = 0
        self._first: Deployment | None = None  # the first deployment attempted (the one a hedge backs up)
        # Usage reported by attempts that were not relayed (a hedge that lost, a
        # stream dropped after message_start), with the model each was sent:
        # recorded against the same request so that spend stays honest.
        self.abandoned: list[tuple[Usage, str]] = []

    async def open(self) -> Opened:
        """The answer to relay (success, or an upstream error to pass on); raises GatewayError."""
        t0 = time.perf_counter()
        try:
            try:
                if self._hedge_after > 0 and len(self._queue) > 1:
                    opened = await race(self._lane, self._hedge_after, self._may_hedge, self._discard)
                else:
                    # One lane, inline (the common case: no coroutine of its own).
                    self._lanes = 1
                    found = None
                    while self._queue:  # not a local: a context-length 400 replaces the queue
                        found = await self._deployment(self._queue.popleft())
                        if found is not None:
                            break
                    opened = found if found is not None else self._final()
            except Exhausted:
                opened = self._final()
        finally:
            self.ctx.upstream_s += time.perf_counter() - t0
        self._won(opened)
        return opened

    def close(self) -> None:
        """The relay ended: the winner no longer counts as in flight."""
        if self._winner is not None:
            self._winner.dep.upstream.stats.inflight -= 1
            self._winner = None

    # -- one lane: deployments from the shared queue ------------------------

    async def _lane(self) -> Opened:
        self._lanes += 1
        lane = self._lanes
        while self._queue:
            dep = self._queue.popleft()
            opened = await self._deployment(dep)
            if opened is not None:
                opened.lane = lane
                return opened
        raise Exhausted

    async def _deployment(self, dep: Deployment) -> Opened | None:
        """Attempts on one deployment (with retries): an answer, or None to fail over."""
        up = dep.upstream
        ctx = self.ctx
        retry = 0
        while True:
            breaker = dep.breaker
            if breaker.state is not CLOSED and not breaker.allow():  # closed: allow() is True
                self._open_retry.append(dep.breaker.retry_after())
                return None
            if retry == 0:
                up.retry_budget.pending += 1  # Budget.deposit(), inlined: one request went to the upstream
                up.hedge_budget.pending += 1
                if self._first is None:
                    self._first = dep
            ctx.attempts += 1
            ctx.upstream = dep.name
            ctx.served_model = dep.model
            up.stats.attempts += 1
            up.stats.inflight += 1
            attempt = Attempt(dep)
            try:
                opened = await attempt.open(self.session, self.req)
            except AttemptFailed as exc:
                up.stats.inflight -= 1
                self._keep_usage(attempt)
                failure = exc.failure
                if failure.verdict.trips:
                    dep.breaker.record_failure()
                else:
                    dep.breaker.release_probe()
                self._last = exc
                if failure.verdict is Verdict.CALLER:
                    return exc.answer  # the next deployment would refuse the same request
                if failure.verdict is Verdict.CONTEXT:
                    if self._context is None:
                        return exc.answer
                    # Only the bigger-context routes are worth trying now.
                    self._queue = deque(self._context)
                    self._context = None
                    return None
                wait = self._retry_wait(dep, failure, retry)
                if wait is None:
                    return None
                retry += 1
                ctx.retries += 1
                up.stats.retries += 1
                await (self._sleep or asyncio.sleep)(wait)
                continue
            except BaseException:
                # Cancelled: a hedge that lost, or the client left.  No verdict on the upstream.
                up.stats.inflight -= 1
                self._keep_usage(attempt)
                dep.breaker.release_probe()
                raise
            return opened

    def _retry_wait(self, dep: Deployment, failure: Failure, retry: int) -> float | None:
        """Seconds to wait before retrying on the same upstream, or None to fail over now."""
        cfg = dep.cfg
        if not failure.retry_same or retry >= cfg.retries or dep.breaker.state is State.OPEN:
            return None
        if failure.retry_after is not None:
            if failure.retry_after > cfg.max_retry_wait:
                return None  # the upstream wants longer than we wait: another one may answer now
            wait = failure.retry_after
        else:
            wait = backoff(retry, cfg.retry_base_ms, cfg.max_retry_wait, random.random)
        if not dep.upstream.retry_budget.withdraw():
            return None  # an outage must not be amplified: fail over instead
        return wait

    # -- hedging ---------------------------------------------------------------

    async def _may_hedge(self) -> bool:
        if not self._queue:
            return False
        nxt = self._queue[0]
        if not nxt.breaker.allow():
            return False  # the lane would skip it anyway; no hedge into an open circuit
        nxt.breaker.release_probe()
        # The budget of the slow upstream being backed up: hedges stay at most 20 % of its
        # requests (plus 3 a second), so a slow provider does not double the traffic.
        slow = self._first or nxt
        if not slow.upstream.hedge_budget.withdraw():
            return False
        if self._reserve_hedge is not None and not await self._reserve_hedge():
            return False
        self.ctx.hedges += 1
        nxt.upstream.stats.hedges += 1
        return True

    def _discard(self, opened: Opened) -> None:
        """A second answer that arrived with the winner: close it, keep the usage it reported."""
        opened.resp.close()
        if opened.resp.status >= 400:
            return  # an error answer: its attempt was judged and counted already
        opened.dep.upstream.stats.inflight -= 1
        opened.dep.breaker.release_probe()
        if opened.streaming and opened.ahead:
            tap = StreamTap(opened.dep.dialect)
            tap.feed(opened.ahead)
            tap.flush()
            if tap.usage.found:
                self.abandoned.append((tap.usage, opened.dep.model))

    # -- the end ---------------------------------------------------------------

    def _keep_usage(self, attempt: Attempt) -> None:
        usage = attempt.reported_usage()
        if usage is not None:
            self.abandoned.append((usage, attempt.dep.model))

    def _won(self, opened: Opened) -> None:
        ctx = self.ctx
        dep = opened.dep
        ctx.upstream = dep.name
        ctx.served_model = dep.model
        if opened.resp.status < 400:
            stats = dep.upstream.stats
            stats.wins += 1
            if opened.lane > 1:
                stats.hedge_wins += 1
            if opened.ttft_s is not None:
                stats.observe_ttft(opened.ttft_s)
            elif not opened.streaming:
                stats.observe_ttft(time.perf_counter() - ctx.start)
            breaker = dep.breaker
            if not opened.streaming and (breaker.failures or breaker.state is not CLOSED):
                # A stream's verdict comes when it ends (streaming.py); closed without failures: nothing to record.
                breaker.record_success()
            self._winner = opened
        else:
            # An error answer relayed as it is: its attempt is over.
            self._winner = None

    def _final(self) -> Opened:
        last = self._last
        if last is None:
            raise GatewayError(
                ErrorKind.UNAVAILABLE,
                "All upstreams for this model are unavailable (circuit open); retry later.",
                retry_after_s=min(self._open_retry) if self._open_retry else 1.0,
            )
        if last.answer is not None:
            return last.answer
        raise GatewayError(last.failure.kind, last.failure.message)
