"""Configuration: one TOML file + ``GATEWAY_*`` overrides -> frozen dataclasses.

Every error in a file is collected and reported at once with its path
(``routes[2].deployments[0].upstream: unknown upstream 'x'``); unknown keys are
rejected.  Secrets never live in the file: fields ending in ``_env`` name the
environment variable that holds them.

Overrides: ``GATEWAY_SERVER__PORT=9000`` sets ``server.port`` (``__`` separates
levels, values are parsed as TOML literals when they parse, strings otherwise).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import ipaddress
import math
import os
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from gateway import governance_config
from gateway.governance_config import AlertsConfig, OidcConfig, TagsConfig
from gateway.proxy.headers import forward_header_errors
from gateway.resources import CONFIG_DIR

DEFAULT_CONFIG = CONFIG_DIR / "gateway.toml"  # the repository's config/, or the copy a wheel ships


def _default_journal_dir() -> str:
    """Under systemd, the unit's state directory ($STATE_DIRECTORY, from StateDirectory=): its /tmp is
    private and wiped at every start (PrivateTmp=yes), which would lose journaled usage. Elsewhere /tmp."""
    state = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    return str(Path(state) / "journal") if state else "/tmp/llm-gateway-journal"


class ConfigError(Exception):
    """A configuration that cannot be used; ``errors`` lists every problem."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = errors
        super().__init__("invalid configuration:\n  " + "\n  ".join(errors))


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 0  # 0 = one per core
    backlog: int = 2048
    max_body_bytes: int = 10 * 1024 * 1024
    drain_seconds: float = 30.0
    worker_ping_seconds: float = 5.0
    worker_start_seconds: float = 30.0  # a worker not serving this long after its start is killed
    # Slow clients (see gateway/server/protocol.py): the request line and headers
    # must arrive within header_timeout of their first byte (or of the connection
    # opening), the whole body within body_timeout of the headers; an idle
    # keep-alive connection is closed after keepalive_timeout.
    header_timeout: float = 10.0
    body_timeout: float = 60.0
    keepalive_timeout: float = 75.0  # above common load balancers' idle timeouts (AWS ALB: 60 s)
    # Extra request headers forwarded upstream, beyond the built-in allow-list
    # (gateway/proxy/headers.py): exact names or prefixes ending in "*".
    forward_headers: tuple[str, ...] = ()
    # Fair share of each upstream's connection pool (max_connections): one key
    # may hold at most key_pool_share of it, one user user_pool_share; over that a
    # request waits up to share_wait_seconds for a slot, then gets 429.
    key_pool_share: float = 0.5
    user_pool_share: float = 0.75
    share_wait_seconds: float = 5.0


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: Literal["debug", "info", "warning", "error"] = "info"
    access_log: bool = True


@dataclass(frozen=True, slots=True)
class AuthConfig:
    bootstrap_admin_token_env: str = "GATEWAY_ADMIN_TOKEN"
    jwt_secret_env: str = "GATEWAY_JWT_SECRET"
    jwt_issuer: str = "llm-gateway"
    jwt_audience: str = "llm-gateway-admin"
    access_token_seconds: int = 900
    refresh_token_seconds: int = 30 * 24 * 3600
    # argon2id cost (OWASP's 19 MiB, t=2, p=1: ~20 ms per login on one core)
    argon2_memory_kib: int = 19456
    argon2_time_cost: int = 2
    argon2_parallelism: int = 1
    # Failed logins: after login_max_failures within login_window_seconds an
    # email is locked, doubling from login_lockout_seconds up to 15 minutes.
    login_max_failures: int = 5
    login_max_failures_per_ip: int = 100  # 0: off (behind a proxy every client shares its address)
    login_window_seconds: int = 900
    login_lockout_seconds: int = 30
    max_keys_per_user: int = 100  # active keys a user may hold via /me/keys
    # Gateway keys not in the worker's filter of live keys (random guesses, or
    # keys created a moment ago) may cost a Postgres lookup at this rate per
    # client IP (and database.key_lookup_rate per worker); over it, such a key
    # waits up to new_key_wait_seconds for its creation to be announced.
    key_lookup_rate_per_ip: float = 20.0
    new_key_wait_seconds: float = 1.0


@dataclass(frozen=True, slots=True)
class DatabaseConfig:
    url_env: str = "GATEWAY_DATABASE_URL"
    pool_min: int = 1
    pool_max: int = 10
    timeout_ms: int = 500
    key_cache_seconds: float = 60.0
    key_cache_size: int = 100_000
    negative_cache_seconds: float = 5.0
    negative_cache_size: int = 10_000
    key_lookup_rate: float = 200.0  # cache-miss lookups per second per worker (burst: the same)
    stale_key_seconds: float = 3600.0  # serve a cached key this long past its TTL while Postgres is down
    last_used_flush_seconds: float = 10.0


@dataclass(frozen=True, slots=True)
class RedisConfig:
    url_env: str = "GATEWAY_REDIS_URL"
    topology: Literal["single", "sentinel", "cluster"] = "single"
    sentinel_master: str = "mymaster"
    failure_mode: Literal["local", "open", "closed"] = "local"
    timeout_ms: int = 100
    retry_seconds: float = 1.0
    lease_seconds: float = 15.0  # a concurrency lease or budget reservation not renewed (dead worker) lapses after this
    budget_reconcile_seconds: float = 300.0  # reset budget counters in use to the ledger's figure this often (0: never)
    key_prefix: str = "gw"  # Redis key namespace (several gateways may share one Redis)
    instances: int = 1  # gateway hosts sharing the limits: the local fallback's share is 1/(workers x instances)


@dataclass(frozen=True, slots=True)
class MockUpstreamConfig:
    """The bundled fake provider; ``enabled`` makes ``serve`` run it as a child."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 8199
    latency_ms: float = 0.0
    ttft_ms: float = 0.0
    chunk_gap_ms: float = 0.0
    chunks: int = 20


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    failure_threshold: int = 5
    cooldown_seconds: float = 10.0
    half_open_probes: int = 1


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    provider: Literal["anthropic", "openai", "azure-openai", "bedrock", "vertex"]
    base_url: str = ""  # bedrock, vertex: derived from region when empty
    api_key_env: str = ""
    # Cloud kinds (gateway/providers/): which fields each reads is checked below.
    deployment: str = ""  # azure-openai: Azure's deployment name (default: the model sent upstream)
    api_version: str = ""  # azure-openai: the api-version query parameter
    token_command: str = ""  # azure-openai: prints a Microsoft Entra ID token (instead of api_key_env)
    token_file: str = ""  # azure-openai: a file holding an Entra ID token, kept fresh by someone else
    token_refresh_seconds: float = 300.0  # azure-openai: re-read a token without a readable expiry this often
    region: str = ""  # bedrock, vertex
    project: str = ""  # vertex: the Google Cloud project id
    aws_profile: str = ""  # bedrock: a profile of the shared AWS config files (default: the standard chain)
    credentials_file: str = ""  # vertex: an ADC/service-account JSON file (default: application default credentials)
    max_connections: int = 256
    connect_timeout: float = 5.0
    first_byte_timeout: float = 120.0
    idle_timeout: float = 60.0
    total_timeout: float = 900.0
    breaker: BreakerConfig = field(default_factory=BreakerConfig)
    retries: int = 2  # extra attempts on this upstream (connection error, 429, 500, 502, 503, 529)
    retry_base_ms: float = 200.0  # exponential backoff with full jitter from this
    max_retry_wait: float = 10.0  # honour retry-after up to this; longer: fail over at once
    ttft_timeout: float = 120.0  # streams: the first content event within this (from the attempt's start)


@dataclass(frozen=True, slots=True)
class DeploymentConfig:
    upstream: str
    weight: int = 1
    model: str = ""  # the upstream's model name; "" = the name the client sent


@dataclass(frozen=True, slots=True)
class RouteConfig:
    match: str
    deployments: tuple[DeploymentConfig, ...]
    fallbacks: tuple[str, ...] = ()
    fallback_models: tuple[str, ...] = ()  # other routes by public name, after deployments and fallbacks
    context_fallback_models: tuple[str, ...] = ()  # routes tried on a context-length 400 only
    strategy: Literal["weighted", "least_busy", "latency"] = "weighted"
    hedge_after_ms: int = 0  # >0: a second attempt when the first has no first token by then
    # Translation to a deployment of the other dialect (gateway/translate/):
    drop_unsupported: bool = False  # drop a parameter with no equivalent instead of answering 400
    default_max_tokens: int = 4096  # max_tokens sent to an Anthropic deployment when an OpenAI client gave none


@dataclass(frozen=True, slots=True)
class Limits:
    """Policy limits of a key or a user; ``None`` means no limit."""

    models: tuple[str, ...] | None = None
    rpm: int | None = None
    tpm: int | None = None
    max_concurrency: int | None = None
    max_tokens: int | None = None
    budget_usd: float | None = None
    budget_period: Literal["day", "month", "total"] = "total"
    allowed_ips: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class StandaloneKeyConfig:
    """A key of the standalone mode: the plaintext by env reference or its SHA-256."""

    name: str
    user: str = "standalone"
    key_env: str = ""
    key_sha256: str = ""
    expires_at: str = ""
    limits: Limits = field(default_factory=Limits)


@dataclass(frozen=True, slots=True)
class StandaloneUserConfig:
    name: str
    limits: Limits = field(default_factory=Limits)


@dataclass(frozen=True, slots=True)
class PricingConfig:
    file: str = "prices.toml"
    unknown_model: Literal["default", "refuse"] = "default"
    default_input_per_mtok: float = 15.0
    default_output_per_mtok: float = 75.0


@dataclass(frozen=True, slots=True)
class AccountingConfig:
    # "auto": the Postgres ledger in database mode, the log standalone; "log": always the log;
    # "none": record nothing (only to measure the ledger's cost in benchmarks).
    sink: Literal["auto", "log", "none"] = "auto"
    journal_dir: str = field(default_factory=_default_journal_dir)
    batch_size: int = 500
    flush_ms: int = 200
    max_memory_records: int = 100_000


@dataclass(frozen=True, slots=True)
class ConsoleConfig:
    """The web console at /ui (console/)."""

    enabled: bool = True
    # The refresh-token cookie's Secure flag; false only for a console reached over plain http.
    secure_cookie: bool = True


@dataclass(frozen=True, slots=True)
class TracingConfig:
    """OpenTelemetry traces over OTLP/HTTP (observability/tracing.py); off unless enabled."""

    enabled: bool = False
    endpoint: str = "http://127.0.0.1:4318/v1/traces"
    sample_ratio: float = 1.0
    service_name: str = "llm-gateway"


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    log: LogConfig = field(default_factory=LogConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    redis: RedisConfig = field(default_factory=RedisConfig)
    mock_upstream: MockUpstreamConfig = field(default_factory=MockUpstreamConfig)
    pricing: PricingConfig = field(default_factory=PricingConfig)
    accounting: AccountingConfig = field(default_factory=AccountingConfig)
    console: ConsoleConfig = field(default_factory=ConsoleConfig)
    tracing: TracingConfig = field(default_factory=TracingConfig)
    upstreams: dict[str, UpstreamConfig] = field(default_factory=dict)
    routes: tuple[RouteConfig, ...] = ()
    keys: tuple[StandaloneKeyConfig, ...] = ()
    users: tuple[StandaloneUserConfig, ...] = ()
    tags: TagsConfig = field(default_factory=TagsConfig)
    alerts: AlertsConfig = field(default_factory=AlertsConfig)
    oidc: OidcConfig = field(default_factory=OidcConfig)
    source: str = ""  # the file this came from; not settable in TOML

    # Secrets resolved from the environment at load time (never from the file).
    def env(self, name: str) -> str:
        return os.environ.get(name, "") if name else ""

    @property
    def database_url(self) -> str:
        return self.env(self.database.url_env)

    @property
    def redis_url(self) -> str:
        return self.env(self.redis.url_env)

    @property
    def standalone(self) -> bool:
        return not self.database_url

    @property
    def config_dir(self) -> Path:
        return Path(self.source).parent if self.source else DEFAULT_CONFIG.parent


_INTERNAL_FIELDS = {"source"}


# --------------------------------------------------------------------------- build


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _build(tp: Any, value: Any, path: str, errors: list[str]) -> Any:
    """Convert a TOML value to ``tp``; append ``path: problem`` to errors on failure."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _build(inner[0], value, path, errors)
    if origin is Literal:
        if value not in args:
            errors.append(f"{path}: must be one of {', '.join(map(repr, args))}, got {value!r}")
            return args[0]
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            errors.append(f"{path}: must be a table")
            try:
                return typing.cast(Any, tp)()  # its defaults, so that the checks after the build still run
            except TypeError:
                return None  # required fields: callers skip None
        return _build_dataclass(tp, value, path, errors)
    if origin is tuple:
        if not isinstance(value, list):
            errors.append(f"{path}: must be an array")
            return ()
        return tuple(_build(args[0], v, f"{path}[{i}]", errors) for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            errors.append(f"{path}: must be a table")
            return {}
        return {k: _build(args[1], v, f"{path}.{k}", errors) for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            errors.append(f"{path}: must be a number, got {value!r}")
            return 0.0
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            errors.append(f"{path}: must be an integer, got {value!r}")
            return 0
        return value
    if tp is bool:
        if not isinstance(value, bool):
            errors.append(f"{path}: must be true or false, got {value!r}")
            return False
        return value
    if tp is str:
        if not isinstance(value, str):
            errors.append(f"{path}: must be a string, got {value!r}")
            return ""
        return value
    raise TypeError(f"unsupported config type {_type_name(tp)} at {path}")  # pragma: no cover


def _build_dataclass(cls: Any, data: dict[str, Any], path: str, errors: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)} - _INTERNAL_FIELDS
    prefix = f"{path}." if path else ""
    for key in data:
        if key not in known:
            errors.append(f"{prefix}{key}: unknown key")
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name not in data or f.name in _INTERNAL_FIELDS:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                errors.append(f"{prefix}{f.name}: required")
                kwargs[f.name] = None
            continue
        kwargs[f.name] = _build(hints[f.name], data[f.name], f"{prefix}{f.name}", errors)
    try:
        return cls(**kwargs)
    except TypeError as exc:  # pragma: no cover - only with errors already listed
        errors.append(f"{path or '<root>'}: {exc}")
        return None


# --------------------------------------------------------------------------- checks


def _check_limits(limits: Limits, path: str, errors: list[str]) -> None:
    for name in ("rpm", "tpm", "max_concurrency", "max_tokens"):
        v = getattr(limits, name)
        if v is not None and v <= 0:
            errors.append(f"{path}.{name}: must be positive")
    if limits.budget_usd is not None and limits.budget_usd < 0:
        errors.append(f"{path}.budget_usd: must not be negative")
    if limits.budget_usd is not None and not math.isfinite(limits.budget_usd):
        errors.append(f"{path}.budget_usd: must be a finite number")
    for i, cidr in enumerate(limits.allowed_ips or ()):
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            errors.append(f"{path}.allowed_ips[{i}]: not an IP network: {cidr!r}")


def _check_cloud(up: UpstreamConfig, p: str, errors: list[str]) -> None:
    """Each upstream kind's own fields: required ones set, other kinds' fields unset."""
    own = {
        "anthropic": ("base_url", "api_key_env"),
        "openai": ("base_url", "api_key_env"),
        "azure-openai": ("base_url", "api_key_env", "deployment", "api_version", "token_command", "token_file"),
        "bedrock": ("base_url", "region", "aws_profile"),
        "vertex": ("base_url", "region", "project", "credentials_file"),
    }.get(up.provider, ())
    for name in ("base_url", "api_key_env", "deployment", "api_version", "token_command", "token_file",
                 "region", "project", "aws_profile", "credentials_file"):
        if getattr(up, name) and name not in own:
            errors.append(f"{p}.{name}: not used by provider {up.provider!r}")
    needs = {"anthropic": ("base_url",), "openai": ("base_url",), "azure-openai": ("base_url", "api_version"),
             "bedrock": ("region",), "vertex": ("region", "project")}.get(up.provider, ())
    for name in needs:
        if not getattr(up, name):
            errors.append(f"{p}.{name}: required")
    if up.provider == "azure-openai" and sum(bool(x) for x in (up.api_key_env, up.token_command, up.token_file)) != 1:
        errors.append(f"{p}: set exactly one of api_key_env, token_command or token_file")
    if up.token_refresh_seconds <= 0:
        errors.append(f"{p}.token_refresh_seconds: must be positive")
    if up.region and not all(c.isalnum() or c == "-" for c in up.region):
        errors.append(f"{p}.region: not a region name: {up.region!r}")


def _check(cfg: Config, errors: list[str]) -> None:
    s = cfg.server
    if not 0 <= s.port <= 65535:
        errors.append("server.port: must be 0..65535")
    if s.workers < 0:
        errors.append("server.workers: must be 0 (one per core) or more")
    if s.max_body_bytes <= 0:
        errors.append("server.max_body_bytes: must be positive")
    if s.drain_seconds < 0:
        errors.append("server.drain_seconds: must not be negative")
    if s.backlog <= 0:
        errors.append("server.backlog: must be positive")
    if s.worker_ping_seconds <= 0:
        errors.append("server.worker_ping_seconds: must be positive")
    if s.worker_start_seconds <= 0:
        errors.append("server.worker_start_seconds: must be positive")
    for name in ("header_timeout", "body_timeout", "keepalive_timeout"):
        if getattr(s, name) <= 0:
            errors.append(f"server.{name}: must be positive")
    for name in ("key_pool_share", "user_pool_share"):
        if not 0 < getattr(s, name) <= 1:
            errors.append(f"server.{name}: must be in (0, 1]")
    if s.share_wait_seconds < 0:
        errors.append("server.share_wait_seconds: must not be negative")
    errors.extend(forward_header_errors(s.forward_headers))
    for name in ("pool_max", "timeout_ms", "key_cache_seconds", "key_cache_size", "negative_cache_seconds",
                 "negative_cache_size", "key_lookup_rate", "last_used_flush_seconds"):
        if getattr(cfg.database, name) <= 0:
            errors.append(f"database.{name}: must be positive")
    if cfg.auth.key_lookup_rate_per_ip <= 0:
        errors.append("auth.key_lookup_rate_per_ip: must be positive")
    if cfg.auth.new_key_wait_seconds < 0:
        errors.append("auth.new_key_wait_seconds: must not be negative")
    for name in ("access_token_seconds", "refresh_token_seconds", "argon2_memory_kib", "argon2_time_cost",
                 "argon2_parallelism", "login_max_failures", "login_window_seconds", "login_lockout_seconds",
                 "max_keys_per_user"):
        if getattr(cfg.auth, name) <= 0:
            errors.append(f"auth.{name}: must be positive")
    for name in ("timeout_ms", "retry_seconds", "lease_seconds", "instances"):
        if getattr(cfg.redis, name) <= 0:
            errors.append(f"redis.{name}: must be positive")
    if cfg.redis.budget_reconcile_seconds < 0:
        errors.append("redis.budget_reconcile_seconds: must not be negative")
    for name in ("batch_size", "flush_ms", "max_memory_records"):
        if getattr(cfg.accounting, name) <= 0:
            errors.append(f"accounting.{name}: must be positive")
    if not cfg.accounting.journal_dir:
        errors.append("accounting.journal_dir: must not be empty")
    if not 0.0 <= cfg.tracing.sample_ratio <= 1.0:
        errors.append("tracing.sample_ratio: must be from 0 to 1")
    if cfg.tracing.enabled and not cfg.tracing.endpoint.startswith(("http://", "https://")):
        errors.append("tracing.endpoint: must be an http(s) URL of an OTLP/HTTP traces receiver")
    for name, up in cfg.upstreams.items():
        p = f"upstreams.{name}"
        if up is None:
            continue
        base_url = up.base_url or ""  # None: already reported as required
        if base_url and not base_url.startswith(("http://", "https://")):
            errors.append(f"{p}.base_url: must start with http:// or https://")
        _check_cloud(up, p, errors)
        if base_url.endswith("/"):
            errors.append(f"{p}.base_url: must not end with '/'")
        for t in ("connect_timeout", "first_byte_timeout", "idle_timeout", "total_timeout"):
            if getattr(up, t) <= 0:
                errors.append(f"{p}.{t}: must be positive")
        if up.max_connections <= 0:
            errors.append(f"{p}.max_connections: must be positive")
        if up.retries < 0:
            errors.append(f"{p}.retries: must not be negative")
        for t in ("retry_base_ms", "max_retry_wait"):
            if getattr(up, t) < 0:
                errors.append(f"{p}.{t}: must not be negative")
        if up.ttft_timeout <= 0:
            errors.append(f"{p}.ttft_timeout: must be positive")
        if up.breaker.failure_threshold <= 0:
            errors.append(f"{p}.breaker.failure_threshold: must be positive")
        if up.breaker.half_open_probes <= 0:
            errors.append(f"{p}.breaker.half_open_probes: must be positive (0 would never close an open circuit)")
        if up.breaker.cooldown_seconds < 0:
            errors.append(f"{p}.breaker.cooldown_seconds: must not be negative")
    for i, route in enumerate(cfg.routes):
        p = f"routes[{i}]"
        if route is None:
            continue
        if not route.match:
            errors.append(f"{p}.match: must not be empty")
        if not route.deployments:
            errors.append(f"{p}.deployments: needs at least one deployment")
        for j, dep in enumerate(route.deployments or ()):
            if dep is None:
                continue
            if dep.upstream not in cfg.upstreams:
                errors.append(f"{p}.deployments[{j}].upstream: unknown upstream {dep.upstream!r}")
            if dep.weight <= 0:
                errors.append(f"{p}.deployments[{j}].weight: must be positive")
        for j, fb in enumerate(route.fallbacks):
            if fb not in cfg.upstreams:
                errors.append(f"{p}.fallbacks[{j}]: unknown upstream {fb!r}")
        if route.hedge_after_ms < 0:
            errors.append(f"{p}.hedge_after_ms: must not be negative")
        if route.default_max_tokens < 1:
            errors.append(f"{p}.default_max_tokens: must be positive")
    _check_route_graph(cfg, errors)
    seen: set[str] = set()
    for i, key in enumerate(cfg.keys):
        p = f"keys[{i}]"
        if key is None:
            continue
        if key.name in seen:
            errors.append(f"{p}.name: duplicate key name {key.name!r}")
        seen.add(key.name)
        if bool(key.key_env) == bool(key.key_sha256):
            errors.append(f"{p}: set exactly one of key_env or key_sha256")
        if key.key_env:
            _check_key_from_env(cfg.env(key.key_env), key.key_env, p, errors)
        if key.key_sha256 and (
            len(key.key_sha256) != 64 or any(c not in "0123456789abcdef" for c in key.key_sha256)
        ):
            errors.append(f"{p}.key_sha256: must be 64 lowercase hex characters")
        if key.expires_at:
            try:
                datetime.fromisoformat(key.expires_at.replace("Z", "+00:00"))
            except ValueError:
                errors.append(f"{p}.expires_at: not an ISO 8601 date-time: {key.expires_at!r}")
        _check_limits(key.limits, f"{p}.limits", errors)
    for i, user in enumerate(cfg.users):
        if user is not None:
            _check_limits(user.limits, f"users[{i}].limits", errors)
    governance_config.check(cfg.tags, cfg.alerts, cfg.oidc, errors)


def route_for(routes: typing.Sequence[RouteConfig], model: str) -> int | None:
    """Index of the route serving a public model name: an exact match first, then the first glob."""
    for i, r in enumerate(routes):
        if r is not None and r.match == model:
            return i
    for i, r in enumerate(routes):
        if r is not None and model_matches(r.match, model):
            return i
    return None


def _check_route_graph(cfg: Config, errors: list[str]) -> None:
    """fallback_models and context_fallback_models name routes that exist, without a cycle."""
    routes = cfg.routes
    edges: dict[int, list[int]] = {}
    for i, route in enumerate(routes):
        if route is None:
            continue
        for field_name in ("fallback_models", "context_fallback_models"):
            for j, name in enumerate(getattr(route, field_name)):
                target = route_for(routes, name)
                if target is None:
                    errors.append(f"routes[{i}].{field_name}[{j}]: no route serves model {name!r}")
                elif target == i:
                    errors.append(f"routes[{i}].{field_name}[{j}]: {name!r} is this route itself")
                elif field_name == "fallback_models":
                    edges.setdefault(i, []).append(target)
    # A cycle through fallback_models would send a failing request round in circles.
    state: dict[int, int] = {}  # 1: on the current path, 2: done

    def visit(node: int, path: list[int]) -> None:
        state[node] = 1
        for nxt in edges.get(node, ()):
            if state.get(nxt) == 1:
                loop = [*path[path.index(nxt):], nxt] if nxt in path else [node, nxt]
                names = " -> ".join(repr(routes[k].match) for k in loop)
                errors.append(f"routes[{nxt}].fallback_models: cycle {names}")
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for start in edges:
        if start not in state:
            visit(start, [start])


def _check_key_from_env(value: str, variable: str, path: str, errors: list[str]) -> None:
    """A key given in the environment (``key_env``) must be as strong as the keys the gateway makes:
    32 to 256 url-safe characters. Unset is fine (the key is simply not active); the value is never shown."""
    if not value:
        return
    if not STANDALONE_KEY_MIN_LEN <= len(value) <= STANDALONE_KEY_MAX_LEN:
        errors.append(f"{path}.key_env: ${variable} holds {len(value)} characters; a key needs "
                      f"{STANDALONE_KEY_MIN_LEN} to {STANDALONE_KEY_MAX_LEN} url-safe characters (A-Z a-z 0-9 - _), "
                      "e.g. gwk_ + the output of: python3 -c 'import secrets; print(secrets.token_urlsafe(32))'")
    elif not _URL_SAFE.fullmatch(value):
        errors.append(f"{path}.key_env: ${variable} holds characters that are not url-safe; "
                      "a key may use only A-Z a-z 0-9 - _")


STANDALONE_KEY_MIN_LEN = 32
STANDALONE_KEY_MAX_LEN = 256
_URL_SAFE = re.compile(r"[A-Za-z0-9_-]+")


# --------------------------------------------------------------------------- env


def _parse_env_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _apply_env(
    data: dict[str, Any], environ: typing.Mapping[str, str], errors: list[str], origin: dict[str, str]
) -> None:
    """Apply ``GATEWAY_A__B=v``; ``origin`` maps each path set (``a.b``) to its variable."""
    for name, raw in environ.items():
        if not name.startswith("GATEWAY_") or "__" not in name:
            continue
        parts = [p.lower() for p in name[len("GATEWAY_") :].split("__")]
        node = data
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                errors.append(f"{name}: {'.'.join(parts)} is not a table")
                break
            node = child
        else:
            node[parts[-1]] = _parse_env_value(raw)
            origin[".".join(parts)] = name


def parse(
    text: str, *, source: str = "", environ: typing.Mapping[str, str] | None = None
) -> Config:
    """Parse TOML text (plus env overrides) into a Config or raise ConfigError."""
    errors: list[str] = []
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{source or '<config>'}: TOML syntax: {exc}"]) from None
    origin: dict[str, str] = {}
    _apply_env(data, os.environ if environ is None else environ, errors, origin)
    cfg = _build_dataclass(Config, data, "", errors)
    if cfg is not None:
        cfg = dataclasses.replace(cfg, source=source)
        _check(cfg, errors)
    if errors:
        if origin:  # name the variable behind a bad overridden value: it is not in the file
            errors = [
                f"{e} (from {origin[e.split(':', 1)[0]]})" if e.split(":", 1)[0] in origin else e for e in errors
            ]
        raise ConfigError(errors)
    return typing.cast(Config, cfg)


def load(path: str | os.PathLike[str] | None = None) -> Config:
    """Load the file named by ``path``, ``$GATEWAY_CONFIG`` or the embedded default."""
    chosen = Path(path or os.environ.get("GATEWAY_CONFIG") or DEFAULT_CONFIG).resolve()
    try:
        text = chosen.read_text()
    except OSError as exc:
        raise ConfigError([f"{chosen}: cannot read: {exc.strerror}"]) from None
    return parse(text, source=str(chosen))


def model_matches(pattern: str, model: str) -> bool:
    """Model names and globs (``claude-*``), case-sensitive as providers are."""
    return pattern == model or fnmatch.fnmatchcase(model, pattern)
