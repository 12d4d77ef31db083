"""Model name -> ordered upstream deployments (weighted pick, then fallbacks)."""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass

import aiohttp
from yarl import URL

from gateway.config import Config, RouteConfig, UpstreamConfig, model_matches
from gateway.errors import ErrorKind, GatewayError
from gateway.providers import PROVIDERS, CloudAdapter, Provider, make_cloud
from gateway.resilience.breaker import Breaker


@dataclass(slots=True)
class Deployment:
    """One upstream at run time: its provider, credentials, breaker, timeouts."""

    name: str
    cfg: UpstreamConfig
    provider: Provider
    auth_value: str
    breaker: Breaker
    timeout: aiohttp.ClientTimeout
    base: str
    _urls: dict[str, URL]
    cloud: CloudAdapter | None = None  # cloud kinds: URL, credentials, signing, stream framing


    def url(self, path_qs: str) -> URL:
        # URL objects are cached: parsing one costs more than the lookup.
        u = self._urls.get(path_qs)
        if u is None:
            u = URL(self.base + path_qs, encoded=True)
            if len(self._urls) < 256:
                self._urls[path_qs] = u
        return u


def build_deployments(cfg: Config, previous: dict[str, Deployment] | None = None) -> dict[str, Deployment]:
    out: dict[str, Deployment] = {}
    for name, up in cfg.upstreams.items():
        old = (previous or {}).get(name)
        # Keep the breaker's state across a reload when the upstream is unchanged.
        breaker = old.breaker if old is not None and old.cfg == up else Breaker(up.breaker)
        key = cfg.env(up.api_key_env)
        provider = PROVIDERS[up.provider]
        out[name] = Deployment(
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


class Router:
    def __init__(self, cfg: Config, deployments: dict[str, Deployment]) -> None:
        self.deployments = deployments
        self._exact: dict[str, RouteConfig] = {}
        self._globs: list[RouteConfig] = []
        for route in cfg.routes:
            if any(c in route.match for c in "*?["):
                self._globs.append(route)
            else:
                self._exact.setdefault(route.match, route)
        self._match_cache: dict[str, RouteConfig | None] = {}

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

    def candidates(self, model: str, dialect: str) -> tuple[RouteConfig, list[Deployment]]:
        """Deployments to try, in order; only those speaking the path's dialect."""
        route = self.match(model)
        if route is None:
            raise GatewayError(ErrorKind.NOT_FOUND, f"model: no route for model '{model}'.")
        primary = [
            (self.deployments[d.upstream], d.weight)
            for d in route.deployments
            if self.deployments[d.upstream].provider.name == dialect
        ]
        ordered: list[Deployment] = []
        if len(primary) == 1:
            ordered.append(primary[0][0])
        elif primary:
            # Weighted order without replacement: the first pick is weighted,
            # the rest follow as later choices.
            pool = list(primary)
            while pool:
                total = sum(w for _, w in pool)
                r = random.random() * total
                for i, (dep, w) in enumerate(pool):
                    r -= w
                    if r < 0:
                        ordered.append(dep)
                        pool.pop(i)
                        break
                else:  # pragma: no cover - float edge
                    ordered.append(pool.pop()[0])
        for name in route.fallbacks:
            dep = self.deployments[name]
            # Identity, not ==: dataclass equality would compare every field.
            if dep.provider.name == dialect and all(dep is not o for o in ordered):
                ordered.append(dep)
        if not ordered:
            raise GatewayError(
                ErrorKind.NOT_FOUND,
                f"model: '{model}' is not served in this API's format here.",
            )
        return route, ordered

    def listed_models(self, known: Iterable[str] = ()) -> list[str]:
        """Exact route names, plus known model names (the price table's) that a route serves."""
        names = set(self._exact)
        names.update(m for m in known if self.match(m) is not None)
        return sorted(names)
