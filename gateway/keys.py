"""Every typed AppKey and request key in one place."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aiohttp import web

if TYPE_CHECKING:
    from gateway.accounting.pricing import PriceTable
    from gateway.accounting.sink import UsageSink
    from gateway.accounting.tags import TagPolicy
    from gateway.alerts.service import AlertService
    from gateway.auth.oidc import OidcClient
    from gateway.auth.settings import AuthSettings
    from gateway.config import Config
    from gateway.observability.metrics import Metrics
    from gateway.observability.readiness import Readiness
    from gateway.policy.admit import Admitter
    from gateway.policy.limits import LocalLimiter, RedisLimiter
    from gateway.policy.principals import PrincipalResolver
    from gateway.proxy.context import RequestContext
    from gateway.proxy.fairshare import FairShare
    from gateway.proxy.headers import HeaderPolicy
    from gateway.proxy.routing import Router
    from gateway.stores.postgres import Database
    from gateway.stores.redis import RedisStore
    from gateway.tasks import TaskTracker
    from gateway.upstream.client import LeanSession

CONFIG: web.AppKey[Config] = web.AppKey("config")
CLIENT: web.AppKey[LeanSession] = web.AppKey("client_session")
ROUTER: web.AppKey[Router] = web.AppKey("router")
RESOLVER: web.AppKey[PrincipalResolver] = web.AppKey("resolver")
ADMITTER: web.AppKey[Admitter] = web.AppKey("admitter")
USAGE: web.AppKey[UsageSink] = web.AppKey("usage_sink")
TASKS: web.AppKey[TaskTracker] = web.AppKey("tasks")
PRICES: web.AppKey[PriceTable] = web.AppKey("prices")
DRAINING: web.AppKey[list[bool]] = web.AppKey("draining")  # one mutable flag
EXTRA: web.AppKey[dict[str, Any]] = web.AppKey("extra")  # stores added by later subsystems
METRICS: web.AppKey[Metrics] = web.AppKey("metrics")
READINESS: web.AppKey[Readiness] = web.AppKey("readiness")
PG: web.AppKey[Database] = web.AppKey("postgres")  # database mode only
AUTH: web.AppKey[AuthSettings] = web.AppKey("auth_settings")  # control-plane secrets
REDIS: web.AppKey[RedisStore] = web.AppKey("redis")  # only when a Redis URL is configured
LIMITER: web.AppKey[RedisLimiter | LocalLimiter] = web.AppKey("limiter")  # .stats for metrics
HEADER_POLICY: web.AppKey[HeaderPolicy] = web.AppKey("header_policy")  # request headers forwarded upstream
FAIR_SHARE: web.AppKey[FairShare] = web.AppKey("fair_share")  # per-key/user share of the upstream pool
TAGS: web.AppKey[TagPolicy] = web.AppKey("tags")  # request tags for cost attribution
ALERTS: web.AppKey[AlertService] = web.AppKey("alerts")  # database mode with [alerts] enabled
OIDC: web.AppKey[OidcClient] = web.AppKey("oidc")  # single sign-on, when [oidc] enabled
# The gateway middleware (server/dispatch.py calls it directly for the data plane's exact paths).
MIDDLEWARE: web.AppKey[Any] = web.AppKey("middleware")
FAST_PATHS: web.AppKey[frozenset[str]] = web.AppKey("fast_paths")  # ... and those paths

# Request-scoped, set by the middleware.
REQ_CTX: web.RequestKey[RequestContext] = web.RequestKey("gw_ctx")
