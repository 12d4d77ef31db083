"""What goes to an upstream: the client's headers, cleaned, with the provider key.

The attempts themselves (retries, failover, hedging) are in ``attempts.py``
and ``failover.py``.
"""

from __future__ import annotations

from collections.abc import Mapping

from multidict import CIMultiDict

from gateway.providers.base import CLIENT_ONLY, HOP_BY_HOP
from gateway.proxy.routing import Deployment

_SKIP_REQUEST = HOP_BY_HOP | CLIENT_ONLY


def upstream_headers(incoming: Mapping[str, str], dep: Deployment) -> CIMultiDict[str]:
    """The client's headers minus credentials and hop-by-hop, plus the provider key."""
    out: CIMultiDict[str] = CIMultiDict()
    skip = _SKIP_REQUEST
    conn = incoming.get("connection")
    if conn and conn.lower() not in ("keep-alive", "close"):
        # Headers named in Connection are hop-by-hop too (RFC 9110 7.6.1).
        skip = skip | {t.strip().lower() for t in conn.split(",")}
    for name, value in incoming.items():
        if name.lower() not in skip:
            out.add(name, value)
    if dep.auth_value:
        out[dep.provider.auth_header] = dep.auth_value
    # Identity encoding: the tap reads the bytes it relays.
    out["accept-encoding"] = "identity"
    return out
