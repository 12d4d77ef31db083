"""What the proxy needs to know about a provider, as data."""

from __future__ import annotations

from dataclasses import dataclass

# Never forwarded in either direction (RFC 9110 hop-by-hop plus what we recompute).
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)

# Request headers reach the provider by allow-list: gateway/proxy/headers.py (which never
# lists x-gateway-tags: the gateway's own cost-attribution tags are not the provider's business).

# Response headers we never relay (ours to set, or meaningless to the client).
# content-encoding is relayed: the gateway asks for identity, but an upstream
# that compresses anyway must not reach the client as undeclared gzip bytes.
UPSTREAM_ONLY = frozenset({"set-cookie", "server", "date", "alt-svc", "server-timing"})


@dataclass(frozen=True, slots=True)
class Provider:
    name: str  # also the dialect the provider speaks: "anthropic" | "openai"
    auth_header: str
    auth_prefix: str  # "Bearer " or ""
    # Upstream's own request-id header; relayed under x-upstream-request-id when
    # it would clash with the gateway's x-request-id.
    request_id_header: str

    def auth_value(self, api_key: str) -> str:
        return self.auth_prefix + api_key
