"""What goes to an upstream: the client's headers, cleaned, with the provider key.

The attempts themselves (retries, failover, hedging) are in ``attempts.py``
and ``failover.py``.
"""

from __future__ import annotations

from collections.abc import Mapping

from multidict import CIMultiDict

from gateway.errors import ANTHROPIC
from gateway.providers.anthropic import DEFAULT_VERSION
from gateway.proxy.routing import Deployment


def upstream_headers(incoming: Mapping[str, str] | list[tuple[str, str]], dep: Deployment) -> CIMultiDict[str]:
    """The allowed client headers (proxy/headers.py selected them), plus the provider key."""
    out: CIMultiDict[str] = CIMultiDict(incoming)
    if dep.auth_value:
        out[dep.provider.auth_header] = dep.auth_value
    if dep.dialect == ANTHROPIC and "anthropic-version" not in out:
        # Anthropic requires it; an OpenAI client's request translated for it has none.
        out["anthropic-version"] = DEFAULT_VERSION
    # Identity encoding: the tap reads the bytes it relays.
    out["accept-encoding"] = "identity"
    return out
