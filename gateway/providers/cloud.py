"""Cloud upstream kinds: what differs from a native provider, behind one small interface.

A native upstream (anthropic, openai) gets the client's path appended to its
base URL and a static key header.  A cloud kind decides more, and the proxy
asks it at four points only:

- ``prepare``: the URL and body for this request, and its auth headers (added
  after the forwarded headers were filtered; a signature covers the final
  body bytes).  Raises GatewayError when it cannot serve the request (no
  credential, a path the cloud has no equivalent of).
- ``upstream_status``: the status as the failure classifier must see it (a
  cloud's "access denied" is the gateway's credential failing, like a 401).
- ``error_body``: an error answer in the provider's dialect (status, body).
- ``stream_reader``: a reader of SSE bytes for a stream the cloud sends in
  another framing (Bedrock's event stream), or None; the client then gets
  ``content-type: text/event-stream``.

Credentials live in a ``CredentialCache`` per upstream, started and stopped
with the app (``clouds_ctx``) and reported by /readyz.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, Protocol

import orjson
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from gateway import keys
from gateway.errors import ErrorKind, GatewayError
from gateway.providers.credentials import CredentialCache, CredentialError
from gateway.upstream.client import LeanResponse

# Response content types that are streams to relay (after the cloud's reader, if any).
STREAM_TYPES = ("text/event-stream", "application/vnd.amazon.eventstream")

Reader = Callable[[], Awaitable[bytes]]


class CloudAdapter(Protocol):
    kind: str
    credential: CredentialCache[Any] | None

    async def prepare(self, path_qs: str, body: bytes, headers: CIMultiDict[str]) -> tuple[URL, bytes]: ...

    def upstream_status(self, status: int, headers: Mapping[str, str]) -> int: ...

    def error_body(self, status: int, headers: Mapping[str, str], body: bytes) -> tuple[int, bytes]: ...

    def stream_reader(self, resp: LeanResponse) -> Reader | None: ...


async def credential(upstream: str, cache: CredentialCache[Any]) -> Any:
    """The cached credential, or the gateway's 502 naming the upstream (never the secret)."""
    try:
        return await cache.get()
    except CredentialError as exc:
        raise GatewayError(
            ErrorKind.UPSTREAM_ERROR, f"Upstream '{upstream}' has no usable credentials ({exc.reason})."
        ) from None


def not_served(upstream: str, kind: str, path: str) -> GatewayError:
    return GatewayError(ErrorKind.NOT_FOUND, f"{path} is not available on upstream '{upstream}' ({kind}).")


def json_doc(body: bytes) -> dict[str, Any]:
    """The request body as a dict: handlers already checked it is a JSON object."""
    doc = orjson.loads(body)
    if not isinstance(doc, dict):  # pragma: no cover - parse_facts refused it before
        raise GatewayError(ErrorKind.INVALID_REQUEST, "Request body must be a JSON object.")
    return doc


def betas_to_body(doc: dict[str, Any], headers: CIMultiDict[str]) -> None:
    """Bedrock and Vertex take ``anthropic-beta`` in the body (as the Anthropic SDK's clients send it)."""
    headers.popall("anthropic-version", None)
    betas = headers.popall("anthropic-beta", None)
    if betas and "anthropic_beta" not in doc:
        doc["anthropic_beta"] = [b.strip() for v in betas for b in v.split(",") if b.strip()]


def anthropic_error(status: int, etype: str, message: str) -> tuple[int, bytes]:
    return status, orjson.dumps({"type": "error", "error": {"type": etype, "message": message}})


# --------------------------------------------------------------------------- lifecycle


def credential_checks(app: web.Application) -> dict[str, Any] | None:
    """The readiness check of the cloud credentials (None: no cloud upstream)."""
    states: dict[str, Any] = {}
    for name, up in app[keys.ROUTER].upstreams.items():
        cloud = up.cloud
        if cloud is not None and cloud.credential is not None:
            states[name] = cloud.credential.status()
    if not states:
        return None
    down = any(s["status"] != "ok" for s in states.values())
    return {"status": "down" if down else "ok", "upstreams": states}


async def clouds_ctx(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: fetch every cloud credential once (bounded), keep them fresh, stop at shutdown."""
    caches = [
        cloud.credential
        for up in app[keys.ROUTER].upstreams.values()
        if (cloud := up.cloud) is not None and cloud.credential is not None
    ]
    # In parallel, each bounded: a missing credential must not hold the worker's start.
    await asyncio.gather(*(c.start(first_wait=5.0) for c in caches))
    yield
    await asyncio.gather(*(c.close() for c in caches))
