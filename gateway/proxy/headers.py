"""Which request headers reach the provider: an allow-list, never a deny-list.

A header the gateway does not know is not forwarded: a new credential header
(Azure's ``api-key`` carrying a gateway key, say) or a proxy's ``x-real-ip``
must not leak by default.  What passes: the body's type, what the client
accepts, its user agent, the providers' own ``anthropic-*`` and ``openai-*``
headers, the SDKs' ``x-stainless-*`` telemetry, idempotency keys and W3C trace
context; plus what the operator adds in ``server.forward_headers``.  Headers
that carry credentials, client addresses or per-hop framing are never
forwarded, whatever the configuration says.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from itertools import compress

ALLOWED_NAMES = frozenset(
    {
        "content-type",
        "accept",
        "user-agent",
        "idempotency-key",
        "x-idempotency-key",
        "traceparent",
        "tracestate",
    }
)
ALLOWED_PREFIXES = ("anthropic-", "openai-", "x-stainless-")

# Never forwarded, even when server.forward_headers names them: credentials,
# client addresses, cookies, framing and per-hop headers (the gateway sets
# host, content-length and accept-encoding itself).
NEVER_NAMES = frozenset(
    {
        "authorization", "x-api-key", "api-key", "proxy-authorization", "cookie", "cookie2",
        "forwarded", "x-real-ip", "true-client-ip", "cf-connecting-ip", "x-client-ip", "via",
        "host", "content-length", "content-encoding", "transfer-encoding", "connection", "keep-alive",
        "proxy-connection", "te", "trailer", "trailers", "upgrade", "expect", "accept-encoding",
    }
)
NEVER_PREFIXES = ("x-forwarded-", "proxy-", "sec-", "x-gateway-")  # x-gateway-*: ours (tags, ...)
# Credential-shaped names, wherever they appear (``anthropic-api-key``, an operator's ``x-vendor-*``
# that also matches ``x-vendor-secret``): a key must never ride along under an allowed prefix.
NEVER_PARTS = ("api-key", "apikey", "api_key", "authorization", "secret", "password", "cookie", "credential")


def never_forwarded(name: str) -> bool:
    n = name.lower()
    return n in NEVER_NAMES or n.startswith(NEVER_PREFIXES) or any(part in n for part in NEVER_PARTS)


class HeaderPolicy:
    """The allow-list, compiled once per configuration (lookups are per header per request)."""

    __slots__ = ("_cache", "_names", "_plans", "_prefixes")

    def __init__(self, extra: Iterable[str] = ()) -> None:
        names = set(ALLOWED_NAMES)
        prefixes = list(ALLOWED_PREFIXES)
        for item in extra:
            item = item.strip().lower()
            if item.endswith("*"):
                prefixes.append(item[:-1])
            elif item:
                names.add(item)
        self._names = frozenset(names)
        self._prefixes = tuple(prefixes)
        # name -> verdict; header names repeat across requests, values do not matter.
        self._cache: dict[str, bool] = {}
        # The names of a request's headers, in order -> which of them pass: an SDK sends the
        # same names on every request, so the whole verdict is one lookup.
        self._plans: dict[tuple[str, ...], tuple[bool, ...]] = {}

    def allows(self, name: str) -> bool:
        verdict = self._cache.get(name)
        if verdict is None:
            n = name.lower()
            verdict = not never_forwarded(n) and (n in self._names or n.startswith(self._prefixes))
            if len(self._cache) < 1024:  # bounded: clients choose the names
                self._cache[name] = verdict
        return verdict

    def select(self, incoming: Mapping[str, str]) -> list[tuple[str, str]]:
        """The client's headers that may reach the provider (before the gateway adds its own), in order.

        Pairs, picked in C (``compress``): ``upstream_headers`` builds the one multidict from them."""
        names = tuple(incoming.keys())
        plan = self._plans.get(names)
        if plan is None:
            plan = self._plan(names, incoming.get("connection"))
        return list(compress(incoming.items(), plan))  # plan: one verdict per name, in the same order

    def _plan(self, names: tuple[str, ...], conn: str | None) -> tuple[bool, ...]:
        named: set[str] = set()
        if conn:
            # Headers named in Connection are hop-by-hop (RFC 9110 7.6.1), even allowed ones.
            named = {t.strip().lower() for t in conn.split(",")}
        plan = tuple(self.allows(name) and name.lower() not in named for name in names)
        if not conn and len(self._plans) < 256:  # bounded: clients choose the names
            self._plans[names] = plan
        return plan


def forward_header_errors(extra: Iterable[str]) -> list[str]:
    """Configuration errors in server.forward_headers (a credential header can never be allowed)."""
    errors = []
    for i, item in enumerate(extra):
        name = item.strip().lower()
        bare = name.rstrip("*")
        if not bare or any(c in bare for c in " :\t*"):
            errors.append(f"server.forward_headers[{i}]: not a header name or prefix: {item!r}")
        elif never_forwarded(bare) or (name.endswith("*") and any(n.startswith(bare) for n in NEVER_NAMES)):
            errors.append(f"server.forward_headers[{i}]: {item!r} is never forwarded (credentials, addresses, framing)")
    return errors
