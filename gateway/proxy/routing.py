"""Public model name -> the ordered deployments that may serve it.

An ``Upstream`` is one configured provider endpoint at run time (credentials,
breaker, timeouts, its live figures); a ``Deployment`` is an upstream plus the
model name that upstream receives.  A route's plan is, in order: its own
deployments (ordered by the route's strategy), its ``fallbacks`` (upstreams
given the route's model), then the routes named in ``fallback_models``.
Plans are resolved once per public name and cached; per request only the
strategy's ordering of the route's own deployments runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import aiohttp
from yarl import URL

from gateway.config import Config, RouteConfig, UpstreamConfig, model_matches
from gateway.errors import ErrorKind, GatewayError
from gateway.providers import PROVIDERS, CloudAdapter, Provider, make_cloud
from gateway.proxy.strategies import UpstreamStats, order
from gateway.resilience.breaker import Breaker
from gateway.resilience.retry import Budget


@dataclass(slots=True)
class Upstream:
    """One upstream at run time: its provider, credentials, breaker, timeouts, live figures."""

    name: str
    cfg: UpstreamConfig
    provider: Provider
    auth_value: str
    breaker: Breaker
    timeout: aiohttp.ClientTimeout
    base: str
    _urls: dict[str, URL]
    stats: UpstreamStats = field(default_factory=UpstreamStats)
    retry_budget: Budget = field(default_factory=Budget)  # extra attempts on this upstream (per worker)
    hedge_budget: Budget = field(default_factory=Budget)  # hedges sent to this upstream (per worker)
    cloud: CloudAdapter | None = None  # cloud kinds: URL, credentials, signing, stream framing

    def url(self, path_qs: str) -> URL:
        # URL objects are cached: parsing one costs more than the lookup.
        u = self._urls.get(path_qs)
        if u is None:
            u = URL(self.base + path_qs, encoded=True)
            if len(self._urls) < 256:
                self._urls[path_qs] = u
        return u


class Deployment:
    """An upstream and the model name it receives: one thing an attempt can be sent to.

    The upstream's parts an attempt reads (name, breaker, provider, timeouts...)
    are copied here once, as plain attributes: each is read several times per
    request, and an upstream never changes them (a reload builds new ones).
    """

    __slots__ = ("auth_value", "breaker", "cfg", "cloud", "dialect", "kind", "model", "name", "provider",
                 "upstream", "weight")

    def __init__(self, upstream: Upstream, model: str, weight: int = 1) -> None:
        self.upstream = upstream
        self.model = model  # what the upstream receives as the body's "model"
        self.weight = weight
        self.name = upstream.name
        self.cfg: UpstreamConfig = upstream.cfg
        self.kind = upstream.cfg.provider  # the provider kind (config ``provider``)
        self.provider: Provider = upstream.provider
        self.dialect = upstream.provider.name  # the API format the upstream speaks: "anthropic" | "openai"
        self.breaker: Breaker = upstream.breaker
        self.auth_value = upstream.auth_value
        self.cloud: CloudAdapter | None = upstream.cloud

    def __repr__(self) -> str:
        return f"Deployment({self.name!r}, {self.model!r}, weight={self.weight})"


@dataclass(frozen=True, slots=True)
class Plan:
    """What a public model name resolves to (one dialect's view of it)."""

    route: RouteConfig
    primary: tuple[Deployment, ...]  # the route's own deployments, ordered per request by its strategy
    rest: tuple[Deployment, ...]  # fallbacks, then fallback_models' plans, in that order
    context: tuple[Deployment, ...]  # context_fallback_models' plans (a context-length 400 only)
    translates: bool = False  # some deployment speaks the other dialect (translating paths only)


def build_upstreams(cfg: Config, previous: dict[str, Upstream] | None = None) -> dict[str, Upstream]:
    out: dict[str, Upstream] = {}
    for name, up in cfg.upstreams.items():
        old = (previous or {}).get(name)
        # Keep the breaker's state across a reload when the upstream is unchanged.
        breaker = old.breaker if old is not None and old.cfg == up else Breaker(up.breaker)
        key = cfg.env(up.api_key_env)
        provider = PROVIDERS[up.provider]
        out[name] = Upstream(
            name=name,
            cfg=up,
            provider=provider,
            auth_value=provider.auth_value(key) if key else "",
            breaker=breaker,
            # sock_connect only: aiohttp's "connect" also counts the wait for a
            # free pooled connection, a saturation of ours that must not read as
            # the upstream failing (first_byte_timeout bounds that wait).
            timeout=aiohttp.ClientTimeout(total=up.total_timeout, sock_connect=up.connect_timeout),
            base=up.base_url,
            _urls={},
            # A reload keeps a cloud adapter (its credential cache and refresh loop) when unchanged.
            cloud=old.cloud if old is not None and old.cfg == up else make_cloud(name, up),
        )
    return out


def _speaking(dialect: str, deps: list[Deployment]) -> list[Deployment]:
    """One route's deployments (and fallbacks) for a client that translation may serve.

    Those of the client's dialect when the route has any (passthrough, as without
    translation); a route served only in the other dialect keeps them all, translated.
    """
    same = [d for d in deps if d.dialect == dialect]
    return same or deps


class Router:
    def __init__(self, cfg: Config, upstreams: dict[str, Upstream]) -> None:
        self.upstreams = upstreams
        self._exact: dict[str, RouteConfig] = {}
        self._globs: list[RouteConfig] = []
        for route in cfg.routes:
            if any(c in route.match for c in "*?["):
                self._globs.append(route)
            else:
                self._exact.setdefault(route.match, route)
        self._match_cache: dict[str, RouteConfig | None] = {}
        self._plans: dict[tuple[str, str, bool], Plan | None] = {}

    def match(self, model: str) -> RouteConfig | None:
        try:
            return self._match_cache[model]
        except KeyError:
            pass
        route = self._exact.get(model)
        if route is None:
            route = next((r for r in self._globs if model_matches(r.match, model)), None)
        if len(self._match_cache) < 10_000:
            self._match_cache[model] = route
        return route

    def plan(self, model: str, dialect: str, translate: bool = False) -> Plan:
        """The cached plan for a public name in one dialect (with ``translate``, deployments
        of the other dialect too); raises the 404s."""
        key = (model, dialect, translate)
        try:
            plan = self._plans[key]
        except KeyError:
            plan = self._resolve(model, dialect, translate)
            if len(self._plans) < 10_000:
                self._plans[key] = plan
        if plan is None:
            raise GatewayError(ErrorKind.NOT_FOUND, f"model: no route for model '{model}'.")
        if not plan.primary and not plan.rest:
            raise GatewayError(ErrorKind.NOT_FOUND, f"model: '{model}' is not served in this API's format here.")
        return plan

    def candidates(self, model: str, dialect: str, translate: bool = False) -> tuple[RouteConfig, list[Deployment]]:
        """Deployments to try, in order; only those speaking the path's dialect unless ``translate``."""
        plan = self.plan(model, dialect, translate)
        return plan.route, self.order(plan)

    @staticmethod
    def order(plan: Plan) -> list[Deployment]:
        """This request's order: the route's own deployments by its strategy, then the rest as planned."""
        ordered = order(plan.route.strategy, plan.primary) if len(plan.primary) > 1 else list(plan.primary)
        ordered.extend(plan.rest)
        return ordered

    # -- resolution (once per public name) ---------------------------------

    def _resolve(self, model: str, dialect: str, translate: bool = False) -> Plan | None:
        route = self.match(model)
        if route is None:
            return None
        own, fallbacks = self._own(route, model), self._fallbacks(route, model)
        if translate:
            kept = {id(d) for d in _speaking(dialect, own + fallbacks)}
            own = [d for d in own if id(d) in kept]
            fallbacks = [d for d in fallbacks if id(d) in kept]
        primary = [d for d in own if translate or d.dialect == dialect]
        rest: list[Deployment] = []
        seen = {(d.name, d.model) for d in primary}

        def add(deps: Iterable[Deployment], into: list[Deployment], seen: set[tuple[str, str]]) -> None:
            for d in deps:
                if (translate or d.dialect == dialect) and (d.name, d.model) not in seen:
                    seen.add((d.name, d.model))
                    into.append(d)

        keep = (lambda deps: _speaking(dialect, deps)) if translate else None
        add(fallbacks, rest, seen)
        visited = {id(route)}
        for name in route.fallback_models:
            add(self._chain(name, visited, keep), rest, seen)
        context: list[Deployment] = []
        context_seen: set[tuple[str, str]] = set()
        visited = {id(route)}
        for name in route.context_fallback_models:
            add(self._chain(name, visited, keep), context, context_seen)
        translates = any(d.dialect != dialect for d in (*primary, *rest, *context))
        return Plan(route, tuple(primary), tuple(rest), tuple(context), translates)

    def _own(self, route: RouteConfig, model: str) -> list[Deployment]:
        return [Deployment(self.upstreams[d.upstream], d.model or model, d.weight) for d in route.deployments]

    def _fallbacks(self, route: RouteConfig, model: str) -> list[Deployment]:
        """Fallback upstreams get the model of the route's first deployment of the same provider kind."""
        out = []
        for name in route.fallbacks:
            up = self.upstreams[name]
            same = next((d for d in route.deployments if self.upstreams[d.upstream].cfg.provider == up.cfg.provider), None)
            out.append(Deployment(up, (same.model if same is not None and same.model else model)))
        return out

    def _chain(
        self, name: str, visited: set[int], keep: Callable[[list[Deployment]], list[Deployment]] | None = None
    ) -> list[Deployment]:
        """A fallback route's whole plan (its deployments, fallbacks, its own fallback_models);
        ``keep`` picks from each route's deployments and fallbacks (translation)."""
        route = self.match(name)
        if route is None or id(route) in visited:
            return []
        visited.add(id(route))
        out = self._own(route, name) + self._fallbacks(route, name)
        if keep is not None:
            out = keep(out)
        for nxt in route.fallback_models:
            out.extend(self._chain(nxt, visited, keep))
        return out

    def listed_models(self, known: Iterable[str] = ()) -> list[str]:
        """Exact route names, plus known model names (the price table's) that a route serves."""
        names = set(self._exact)
        names.update(m for m in known if self.match(m) is not None)
        return sorted(names)
