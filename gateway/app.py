"""create_app(cfg): wiring only -- resources, middleware, routes."""

from __future__ import annotations

import functools
import os
from collections.abc import AsyncIterator

from aiohttp import web

from gateway import keys
from gateway.accounting import reports as usage_reports
from gateway.accounting import tag_reports
from gateway.accounting.ledger import LedgerWriter
from gateway.accounting.pricing import PriceTable
from gateway.accounting.sink import LogSink, NullSink, UsageSink
from gateway.accounting.tags import TagPolicy
from gateway.admin import budgets as admin_budgets
from gateway.admin import health as admin_health
from gateway.admin import routes as admin_routes
from gateway.alerts.service import alerts_ctx
from gateway.config import Config
from gateway.console import routes as console_routes
from gateway.middleware import make_middleware
from gateway.observability import tracing
from gateway.observability.budget_watch import budget_watch_ctx
from gateway.observability.health import healthz
from gateway.observability.metrics import Metrics, metrics_ctx, metrics_handler
from gateway.observability.readiness import readiness_ctx, readyz
from gateway.policy.admit import Admitter
from gateway.policy.budget_rebuild import rebuild_budgets
from gateway.policy.cache import PostgresResolver
from gateway.policy.limits import LocalLimiter, RedisLimiter
from gateway.policy.principals import PrincipalResolver, StandaloneResolver
from gateway.providers.cloud import clouds_ctx
from gateway.proxy import handlers, hot
from gateway.proxy.fairshare import FairShare
from gateway.proxy.headers import HeaderPolicy
from gateway.proxy.routing import Router, build_upstreams
from gateway.server import hygiene
from gateway.stores.postgres import postgres_ctx
from gateway.stores.redis import RedisStore
from gateway.tasks import TaskTracker
from gateway.upstream.client import LeanSession

DATA_PLANE = (
    ("POST", "/v1/messages", handlers.messages),
    ("POST", "/v1/messages/count_tokens", handlers.count_tokens),
    ("POST", "/v1/chat/completions", handlers.chat_completions),
    ("POST", "/v1/embeddings", handlers.embeddings),
    ("POST", "/v1/responses", handlers.responses),
    ("GET", "/v1/models", handlers.models),
)


async def _client_session(app: web.Application) -> AsyncIterator[None]:
    """The upstream client: one lean HTTP/1.1 client for every upstream (plain, TLS, cloud kinds)."""
    cfg = app[keys.CONFIG]
    per_host = max((u.max_connections for u in cfg.upstreams.values()), default=100)
    session = LeanSession(
        limit_per_host=per_host,
        trace_configs=tracing.client_trace_configs(app),  # None unless [tracing] is enabled
    )
    app[keys.CLIENT] = session
    yield
    await session.close()


async def _tasks(app: web.Application) -> AsyncIterator[None]:
    tracker = TaskTracker()
    app[keys.TASKS] = tracker
    yield
    await tracker.drain(timeout=app[keys.CONFIG].server.drain_seconds)


async def _principals(app: web.Application) -> AsyncIterator[None]:
    """Key -> principal: from the config file (standalone) or Postgres (cached)."""
    cfg = app[keys.CONFIG]
    resolver: PrincipalResolver = (
        StandaloneResolver(cfg) if cfg.standalone else await PostgresResolver.open(app[keys.PG], cfg)
    )
    app[keys.RESOLVER] = resolver
    yield
    await resolver.close()


async def _limits(app: web.Application) -> AsyncIterator[None]:
    """The limiter behind admission: Redis script, or per-process counters."""
    cfg = app[keys.CONFIG]
    share = (cfg.server.workers or os.cpu_count() or 1) * cfg.redis.instances
    limiter: RedisLimiter | LocalLimiter
    if cfg.redis_url:

        def on_state(down: bool) -> None:
            if keys.METRICS in app:
                app[keys.METRICS].set_degraded("redis", down)

        store = RedisStore(cfg.redis, cfg.redis_url, on_state=on_state)
        app[keys.REDIS] = store
        limiter = RedisLimiter(
            cfg, store, app[keys.PRICES], rebuild=functools.partial(rebuild_budgets, app), share=share
        )
        await limiter.start()
    else:
        limiter = LocalLimiter(app[keys.PRICES], share=cfg.server.workers or os.cpu_count() or 1)
    app[keys.LIMITER] = limiter
    app[keys.ADMITTER] = Admitter(limiter)
    yield
    await limiter.close()


async def _accounting(app: web.Application) -> AsyncIterator[None]:
    """Usage sink: the ledger writer (journal, then Postgres) in database mode, else the log."""
    cfg = app[keys.CONFIG]
    sink: UsageSink
    if cfg.accounting.sink == "none":
        sink = NullSink()
    elif cfg.standalone or cfg.accounting.sink == "log":
        sink = LogSink()
    else:
        writer = LedgerWriter(app[keys.PG], cfg.accounting)
        limiter = app.get(keys.LIMITER)
        if isinstance(limiter, RedisLimiter):
            limiter.attach_ledger()
            writer.on_commit = limiter.apply_committed
        await writer.start()
        sink = writer
    app[keys.USAGE] = sink
    yield
    await sink.close()


def create_app(cfg: Config) -> web.Application:
    prices = PriceTable.load(cfg)
    # Priced model names are configured names: safe as metric labels.
    metrics = Metrics(cfg, known_models=getattr(prices, "_exact", {}))
    middleware = make_middleware(cfg.log.access_log, metrics)
    app = web.Application(
        client_max_size=cfg.server.max_body_bytes + 1,
        middlewares=[middleware],  # type: ignore[list-item]
        handler_args={"max_field_size": 16384, "keepalive_timeout": cfg.server.keepalive_timeout,
                      # Request bodies are decoded by gateway/server/body.py, within the size limit.
                      "auto_decompress": False},
    )
    app[keys.CONFIG] = cfg
    app[keys.MIDDLEWARE] = middleware
    app[keys.FAST_PATHS] = frozenset(path for _, path, _ in DATA_PLANE)  # server/dispatch.py
    app[keys.DRAINING] = [False]  # set by the worker when it drains
    app.on_response_prepare.append(hygiene.PrepareHook(app[keys.DRAINING]))
    app[keys.EXTRA] = {}
    app[keys.PRICES] = prices
    app[keys.METRICS] = metrics
    app[keys.TAGS] = TagPolicy(cfg.tags, metrics.registry)
    app[keys.ROUTER] = Router(cfg, build_upstreams(cfg))
    app[keys.HEADER_POLICY] = HeaderPolicy(cfg.server.forward_headers)
    app[keys.FAIR_SHARE] = FairShare(
        cfg.server.key_pool_share, cfg.server.user_pool_share, cfg.server.share_wait_seconds
    )
    # Torn down in reverse: accounting flushes after the tracked tasks drained.
    # Torn down in reverse: requests' tasks settle, the ledger writer flushes (and
    # applies committed costs through the limiter), then the limiter closes.
    app.cleanup_ctx.extend([postgres_ctx, _client_session, _principals, _limits, _accounting, _tasks])
    app.cleanup_ctx.extend([metrics_ctx, readiness_ctx])
    app.cleanup_ctx.append(clouds_ctx)  # cloud credentials: fetched once, kept fresh
    app.cleanup_ctx.append(alerts_ctx)  # spend alerts: evaluation and webhook delivery
    app.cleanup_ctx.append(budget_watch_ctx)
    tracing.install(app, cfg)  # nothing when [tracing] is off (the default)
    app.on_startup.append(hot.bind)  # last: the services every proxied request uses, looked up once
    app.router.add_get("/healthz", healthz)
    admin_routes.setup(app)
    usage_reports.setup(app)
    tag_reports.setup(app)
    app.router.add_get("/admin/budgets", admin_budgets.list_budgets)
    app.router.add_get("/admin/health", admin_health.health)
    console_routes.setup(app, enabled=cfg.console.enabled)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_handler)
    for method, path, handler in DATA_PLANE:
        app.router.add_route(method, path, handler)
        app.router.add_route(method, "/ak/{access_key}" + path, handler)
    return app
