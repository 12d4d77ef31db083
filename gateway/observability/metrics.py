"""Prometheus metrics, aggregated over every worker process.

Under ``llm-gateway serve`` the supervisor sets ``PROMETHEUS_MULTIPROC_DIR``
(see ``multiproc.py``) before any worker imports prometheus_client, so each
worker writes its values to mmap files and ``GET /metrics`` on any worker
sums all of them.  Without that variable (an in-process app in tests) the
metrics live in a registry of this app alone.

Hot path: the middleware calls ``started()`` and ``finished()`` once per
request.  ``finished`` looks up one tuple key in a dict of pre-bound label
children and adds to plain ints there; a task flushes them into the metric
files every second (and before each scrape of this worker), so a request
costs no lock and no mmap write, and another worker's counts are at most a
second old.  Label values are never user input beyond configured names: the
model label is the request's model only when it is a configured model name
(an exact route or a priced model), otherwise ``other``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from bisect import bisect_left
from collections.abc import AsyncIterator, Iterable
from typing import Any

import prometheus_client.values
from aiohttp import web
from aiohttp.web_urldispatcher import AbstractResource
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from gateway import keys, tasks
from gateway.config import Config
from gateway.observability import multiproc
from gateway.proxy.context import RequestContext
from gateway.resilience.breaker import State

OTHER_MODEL = "other"
DEPENDENCIES = frozenset({"postgres", "redis"})
_CIRCUIT_STATES = {State.CLOSED: "closed", State.OPEN: "open", State.HALF_OPEN: "half_open"}
_ADMITTED = frozenset({None, "upstream_error", "upstream_timeout"})
_LIMITER_DECISIONS = frozenset({"admitted", "rate_limited", "budget_exceeded", "degraded"})
_MAX_BOUND = 20_000  # label combinations cached; all are bounded by config anyway

OVERHEAD_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
UPSTREAM_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)


def multiprocess_dir() -> str | None:
    """The shared directory when prometheus_client runs in multiprocess mode here."""
    path = os.environ.get(multiproc.ENV)
    if path and prometheus_client.values.ValueClass is not prometheus_client.values.MutexValue:
        return path
    return None


class _Hist:
    """Observations of one histogram child, buffered in plain ints until the next flush."""

    __slots__ = ("bounds", "child", "counts", "total")

    def __init__(self, child: Any) -> None:
        self.child = child
        self.bounds: list[float] = child._upper_bounds  # ascending, +Inf last
        self.counts = [0] * len(self.bounds)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def flush(self) -> None:
        # What Histogram.observe does per value, once per bucket: the child's
        # value objects are the mmap-backed ones in multiprocess mode.
        self.child._sum.inc(self.total)
        self.total = 0.0
        counts = self.counts
        for i, n in enumerate(counts):
            if n:
                self.child._buckets[i].inc(n)
                counts[i] = 0


class _Bound:
    """One (endpoint, route, model, upstream, status, error): its label children and pending counts."""

    __slots__ = ("cost", "cost_pico", "decision", "n", "overhead", "requests", "tokens_in", "tokens_in_n",
                 "tokens_out", "tokens_out_n", "ttft", "upstream")

    def __init__(self, requests: Any, overhead: Any, upstream: Any, ttft: Any, tokens_in: Any, tokens_out: Any,
                 cost: Any, decision: Any) -> None:
        self.requests = requests
        self.overhead = _Hist(overhead)
        self.upstream = _Hist(upstream) if upstream is not None else None
        self.ttft = _Hist(ttft) if ttft is not None else None
        self.tokens_in = tokens_in
        self.tokens_out = tokens_out
        self.cost = cost
        self.decision = decision
        self.n = 0
        self.tokens_in_n = 0
        self.tokens_out_n = 0
        self.cost_pico = 0

    def flush(self) -> None:
        self.requests.inc(self.n)
        if self.decision is not None:
            self.decision.inc(self.n)
        self.n = 0
        self.overhead.flush()
        if self.upstream is not None:
            self.upstream.flush()
        if self.ttft is not None:
            self.ttft.flush()
        if self.tokens_in_n:
            self.tokens_in.inc(self.tokens_in_n)
            self.tokens_in_n = 0
        if self.tokens_out_n:
            self.tokens_out.inc(self.tokens_out_n)
            self.tokens_out_n = 0
        if self.cost_pico:
            self.cost.inc(self.cost_pico / 1e12)  # a Prometheus float: display only (the ledger is exact)
            self.cost_pico = 0


def _error_label(error: str | None, status: int, upstream: str) -> str:
    if error:
        return error
    if status < 400:
        return "none"
    if status == 499:
        return "client_closed"
    if upstream:
        return "upstream_status"  # the provider's own error, passed through
    return "internal" if status >= 500 else "http"


def _decision(route: str, error: str | None) -> str | None:
    """What admission decided, for requests that reached it (a route matched)."""
    if not route:
        return None
    if error in ("rate_limited", "budget_exceeded"):
        return error
    if error == "unavailable":
        return "shed"
    return "admitted" if error in _ADMITTED else "denied"


class Metrics:
    """Every metric of one worker; ``render()`` returns all workers' sum."""

    def __init__(self, cfg: Config, known_models: Iterable[str] = ()) -> None:
        self.dir = multiprocess_dir()
        # In multiprocess mode values go to files whatever the registry; the
        # per-app registry keeps in-process apps (tests) apart.
        self.registry: CollectorRegistry | None = None if self.dir else CollectorRegistry(auto_describe=True)
        reg = self.registry
        self.known_models = {r.match for r in cfg.routes if not any(c in r.match for c in "*?[")}
        self.known_models.update(known_models)
        self._bound: dict[tuple[Any, ...], _Bound] = {}
        self._circuits: dict[str, State] = {}

        self.requests = Counter(
            "gateway_requests", "Requests by endpoint, configured route, model, status and error kind.",
            ["endpoint", "route", "model", "status", "error"], registry=reg,
        )
        self.overhead = Histogram(
            "gateway_overhead_seconds", "Time spent inside the gateway per request, upstream time excluded.",
            ["endpoint"], buckets=OVERHEAD_BUCKETS, registry=reg,
        )
        self.upstream = Histogram(
            "gateway_upstream_seconds", "Time spent waiting on the upstream per request (whole stream included).",
            ["upstream"], buckets=UPSTREAM_BUCKETS, registry=reg,
        )
        self.ttft = Histogram(
            "gateway_time_to_first_token_seconds", "Time from request arrival to the first streamed token.",
            ["upstream"], buckets=TTFT_BUCKETS, registry=reg,
        )
        self.tokens = Counter(
            "gateway_tokens", "Tokens reported by upstreams (input includes cache reads and writes).",
            ["route", "model", "direction"], registry=reg,
        )
        self.cost = Counter(
            "gateway_cost_usd", "Cost of the recorded usage, in US dollars.", ["route", "model"], registry=reg,
        )
        self.admission = Counter(
            "gateway_admission_decisions", "Admission decisions: admitted, rate_limited, budget_exceeded, denied, shed.",
            ["decision"], registry=reg,
        )
        self.circuit = Gauge(
            "gateway_circuit_state", "Workers whose circuit breaker for an upstream is in each state.",
            ["upstream", "state"], multiprocess_mode="livesum", registry=reg,
        )
        self.degraded = Gauge(
            "gateway_dependency_degraded", "Workers currently running degraded because a dependency is unreachable.",
            ["dependency"], multiprocess_mode="livesum", registry=reg,
        )
        self.degradations = Counter(
            "gateway_dependency_degradations", "Times a worker lost a dependency and switched to degraded mode.",
            ["dependency"], registry=reg,
        )
        self.limiter = Counter(
            "gateway_limiter_decisions", "The limiter's own decisions (degraded: taken without Redis).",
            ["decision"], registry=reg,
        )
        self.limiter_events = Counter(
            "gateway_limiter_events", "Limiter housekeeping: budget rebuilds from the ledger, settlements, parked settlements.",
            ["event"], registry=reg,
        )
        self._limiter_seen: dict[str, int] = {}
        self.key_cache = Counter(
            "gateway_key_cache_events", "Key lookups: cache hits, negative hits, Postgres lookups, stale entries "
            "served and unknown keys refused while Postgres is unreachable (unavailable), invalidations.",
            ["event"], registry=reg,
        )
        self._resolver_seen: dict[str, int] = {}
        self.usage_events = Counter(
            "gateway_usage_events", "The usage ledger writer's own counters (records written, batches, spills ...).",
            ["event"], registry=reg,
        )
        self._usage_seen: dict[str, int] = {}
        self.upstream_events = Counter(
            "gateway_upstream_events", "Per upstream: attempts, retries, hedges, wins (requests served), hedge_wins, "
            "and extra attempts refused by the retry or hedge budget.", ["upstream", "event"], registry=reg,
        )
        self._upstream_seen: dict[tuple[str, str], int] = {}
        self.fair_share = Counter(
            "gateway_fair_share_events", "Requests over their key's or user's share of the upstream pool: "
            "queued (waited for a slot), refused (429 after share_wait_seconds).",
            ["event"], registry=reg,
        )
        self._fair_share_seen: dict[str, int] = {}
        self.in_flight = Gauge(
            "gateway_requests_in_flight", "Requests (and streams) in flight.", multiprocess_mode="livesum", registry=reg,
        )
        self.workers = Gauge(
            "gateway_workers", "Live worker processes.", multiprocess_mode="livesum", registry=reg,
        )
        self.worker_starts = Counter(
            "gateway_worker_starts", "Worker processes started (a rolling reload starts each once; more is crashes).",
            registry=reg,
        )
        self.budgets = Gauge(
            "gateway_budgets", "Keys and users whose spend this period is near (>= 80 %) or at their budget "
            "(observability/budget_watch.py).", ["scope", "state"], multiprocess_mode="livemax", registry=reg,
        )
        self.active = 0  # requests in flight in this worker
        self.scrapes = 0  # of which scrapes of /metrics: never counted as in flight (idle must read 0)
        self._active_flushed = 0
        self._dirty: list[_Bound] = []
        self._degraded_state: dict[str, bool] = {}
        for dep in DEPENDENCIES:
            self.degraded.labels(dep).set(0)
        self.workers.set(1)
        self.worker_starts.inc()

    # -- hot path ------------------------------------------------------------------

    def started(self) -> None:
        self.active += 1

    def finished(self, request: web.Request, ctx: RequestContext, status: int, gateway_ms: float | None = None) -> None:
        """Count one finished request in this worker's buffers (plain ints; flushed every second)."""
        self.active -= 1
        model = ctx.model
        if model and model not in self.known_models:
            model = OTHER_MODEL
        # The resource, not the route: an unmatched request gets a new SystemRoute each time.
        resource = request._match_info._route._resource  # type: ignore[union-attr]  # match_info.route.resource
        key = (resource, ctx.route, model, ctx.upstream, status, ctx.error_kind)
        b = self._bound.get(key)
        if b is None:
            b = self._bind(resource, ctx.route, model, ctx.upstream, status, ctx.error_kind)
            if len(self._bound) < _MAX_BOUND:
                self._bound[key] = b
        if not b.n:
            self._dirty.append(b)
        b.n += 1
        # _Hist.observe, inlined for the two histograms of every request.
        h = b.overhead
        value = (ctx.gateway_ms() if gateway_ms is None else gateway_ms) / 1000.0
        h.counts[bisect_left(h.bounds, value)] += 1
        h.total += value
        up = b.upstream
        value = ctx.upstream_s
        if up is not None and value:
            up.counts[bisect_left(up.bounds, value)] += 1
            up.total += value
            if ctx.ttft_s is not None and b.ttft is not None:
                b.ttft.observe(ctx.ttft_s)
        if b.tokens_in is not None:
            b.tokens_in_n += ctx.input_tokens
            b.tokens_out_n += ctx.output_tokens
            b.cost_pico += ctx.cost_pico

    def flush(self) -> None:
        """Move the buffered counts into the shared metric files."""
        dirty, self._dirty = self._dirty, []
        for b in dirty:
            b.flush()
        active = self.active - self.scrapes
        if active != self._active_flushed:
            self._active_flushed = active
            self.in_flight.set(active)

    def _bind(
        self, resource: AbstractResource | None, route: str, model: str, upstream: str, status: int, error: str | None
    ) -> _Bound:
        endpoint = resource.canonical.removeprefix("/ak/{access_key}") if resource is not None else "unmatched"
        decision = _decision(route, error)
        return _Bound(
            requests=self.requests.labels(endpoint, route, model, str(status), _error_label(error, status, upstream)),
            overhead=self.overhead.labels(endpoint),
            upstream=self.upstream.labels(upstream) if upstream else None,
            ttft=self.ttft.labels(upstream) if upstream else None,
            tokens_in=self.tokens.labels(route, model, "input") if route else None,
            tokens_out=self.tokens.labels(route, model, "output") if route else None,
            cost=self.cost.labels(route, model) if route else None,
            decision=self.admission.labels(decision) if decision else None,
        )

    # -- state gauges --------------------------------------------------------------

    def set_degraded(self, dependency: str, degraded: bool) -> None:
        """Stores call this when they lose or regain Postgres or Redis."""
        if dependency not in DEPENDENCIES:
            raise ValueError(f"unknown dependency {dependency!r}")
        if self._degraded_state.get(dependency, False) == degraded:
            return
        self._degraded_state[dependency] = degraded
        self.degraded.labels(dependency).set(1 if degraded else 0)
        if degraded:
            self.degradations.labels(dependency).inc()

    def refresh(self, app: web.Application) -> None:
        """Flush this worker's buffered counts; update its state gauges and limiter counters."""
        self.flush()
        self.refresh_circuits(app)
        self.refresh_limiter(app)
        self.refresh_upstreams(app)

    def refresh_upstreams(self, app: web.Application) -> None:
        """Attempts, retries, hedges and wins per upstream, and extra attempts the budgets refused (deltas)."""
        for name, up in app[keys.ROUTER].upstreams.items():
            s = up.stats
            for event, value in (
                ("attempts", s.attempts), ("retries", s.retries), ("hedges", s.hedges), ("wins", s.wins),
                ("hedge_wins", s.hedge_wins), ("retry_budget_denied", up.retry_budget.denied),
                ("hedge_budget_denied", up.hedge_budget.denied),
            ):
                seen = self._upstream_seen.get((name, event), 0)
                if value > seen:
                    self.upstream_events.labels(name, event).inc(value - seen)
                    self._upstream_seen[(name, event)] = value

    def refresh_limiter(self, app: web.Application) -> None:
        """The limiter's, key cache's and usage writer's counters (ints on a ``stats`` dataclass), as deltas."""
        limiter = getattr(app.get(keys.LIMITER), "stats", None)
        for name, delta in _deltas(limiter, self._limiter_seen):
            if name in _LIMITER_DECISIONS:
                self.limiter.labels(name).inc(delta)
            else:
                self.limiter_events.labels(name).inc(delta)
        resolver = getattr(app.get(keys.RESOLVER), "stats", None)
        for name, delta in _deltas(resolver, self._resolver_seen):
            self.key_cache.labels(name).inc(delta)
        sink = getattr(app.get(keys.USAGE), "stats", None)
        for name, delta in _deltas(sink, self._usage_seen):
            self.usage_events.labels(name).inc(delta)
        share = getattr(app.get(keys.FAIR_SHARE), "stats", None)
        for name, delta in _deltas(share, self._fair_share_seen):
            self.fair_share.labels(name).inc(delta)

    def refresh_circuits(self, app: web.Application) -> None:
        for name, dep in app[keys.ROUTER].upstreams.items():
            state = dep.breaker.state
            old = self._circuits.get(name)
            if old is state:
                continue
            self._circuits[name] = state
            for s, label in _CIRCUIT_STATES.items():
                self.circuit.labels(name, label).set(1 if s is state else 0)

    # -- exposition ----------------------------------------------------------------

    def render(self) -> bytes:
        """The Prometheus text of every worker (blocking: run it off the loop)."""
        if self.dir is None:
            assert self.registry is not None
            return generate_latest(self.registry)
        registry = CollectorRegistry(auto_describe=True)
        MultiProcessCollector(registry, self.dir)  # type: ignore[no-untyped-call]
        with multiproc.locked(self.dir, exclusive=False):
            return generate_latest(registry)


def _deltas(stats: object, seen: dict[str, int]) -> list[tuple[str, int]]:
    """(field, increase) of a stats dataclass's int fields since the last call; names are code-defined."""
    if stats is None or not dataclasses.is_dataclass(stats):
        return []
    out = []
    for f in dataclasses.fields(stats):
        value = getattr(stats, f.name)
        if isinstance(value, int) and value > seen.get(f.name, 0):
            out.append((f.name, value - seen.get(f.name, 0)))
            seen[f.name] = value
    return out


async def metrics_handler(request: web.Request) -> web.Response:
    app = request.app
    metrics = app[keys.METRICS]
    metrics.scrapes += 1  # the middleware counted this request as started: it is no traffic
    try:
        metrics.refresh(app)
        body = await asyncio.get_running_loop().run_in_executor(None, metrics.render)
    finally:
        metrics.scrapes -= 1
    return web.Response(body=body, headers={"content-type": CONTENT_TYPE_LATEST})


async def metrics_ctx(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: keep this worker's circuit gauges fresh between scrapes."""
    metrics = app[keys.METRICS]

    async def refresh_loop() -> None:
        while True:
            metrics.refresh(app)
            await asyncio.sleep(1.0)

    task = asyncio.get_running_loop().create_task(refresh_loop())
    yield
    await tasks.stop(task)
    metrics.refresh(app)  # the last requests of a draining worker count too
