"""Open one upstream response, trying deployments in order before the first byte.

A failover happens only here, before any byte reached the client: on
connection errors, timeouts, 429 and 5xx (the failure classifier decides).
The last deployment's HTTP answer is relayed as it is (an upstream error in
the client's dialect passes through unchanged), except a 401: that is the
gateway's provider key failing, answered as the gateway's own 502.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping

import aiohttp
from multidict import CIMultiDict

from gateway.errors import ErrorKind, GatewayError
from gateway.providers.base import CLIENT_ONLY, HOP_BY_HOP
from gateway.proxy.context import RequestContext
from gateway.proxy.failures import Verdict, classify_status
from gateway.proxy.routing import Deployment
from gateway.resilience.breaker import State

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


async def open_upstream(
    session: aiohttp.ClientSession,
    ctx: RequestContext,
    candidates: list[Deployment],
    method: str,
    path_qs: str,
    incoming_headers: Mapping[str, str],
    body: bytes,
) -> tuple[Deployment, aiohttp.ClientResponse]:
    """Return the deployment and the open response to relay, or raise GatewayError."""
    last_exc: GatewayError | None = None
    open_retry: list[float] = []
    n = len(candidates)
    for i, dep in enumerate(candidates):
        is_last = i == n - 1
        if not dep.breaker.allow():
            open_retry.append(dep.breaker.retry_after())
            continue
        headers = upstream_headers(incoming_headers, dep)
        url, data = dep.url(path_qs), body
        if dep.cloud is not None:
            # The cloud kind's URL, body and auth (signed over the final bytes, after the header filter).
            try:
                url, data = await dep.cloud.prepare(path_qs, body, headers)
            except GatewayError as err:
                dep.breaker.release_probe()  # no attempt made: not the upstream's failure
                last_exc = err
                continue
        ctx.attempts += 1
        ctx.upstream = dep.name
        t0 = time.perf_counter()
        try:
            async with asyncio.timeout(dep.cfg.first_byte_timeout):
                resp = await session.request(
                    method, url, data=data, headers=headers, timeout=dep.timeout,
                    allow_redirects=False,
                )
        except TimeoutError:
            ctx.upstream_s += time.perf_counter() - t0
            dep.breaker.record_failure()
            last_exc = GatewayError(ErrorKind.UPSTREAM_TIMEOUT, f"Upstream '{dep.name}' timed out.")
            continue
        except (aiohttp.ClientError, OSError):
            ctx.upstream_s += time.perf_counter() - t0
            dep.breaker.record_failure()
            last_exc = GatewayError(ErrorKind.UPSTREAM_ERROR, f"Upstream '{dep.name}' is unreachable.")
            continue
        except BaseException:
            ctx.upstream_s += time.perf_counter() - t0
            dep.breaker.release_probe()
            raise
        ctx.upstream_s += time.perf_counter() - t0
        status = resp.status if dep.cloud is None else dep.cloud.upstream_status(resp.status, resp.headers)
        verdict = classify_status(status)
        if verdict is Verdict.OK:
            # Success is recorded when the body or stream completes (streaming.py).
            return dep, resp
        if verdict.trips:
            dep.breaker.record_failure()
        else:
            dep.breaker.release_probe()
        if status == 401:
            # The provider refused the gateway's own key, not the caller's: never
            # relay that 401 (the SDK would blame its key, and the provider's
            # message may quote part of ours).
            resp.release()
            last_exc = GatewayError(ErrorKind.UPSTREAM_ERROR, f"Upstream '{dep.name}' refused the gateway's credentials.")
            continue
        if verdict.fails_over and not is_last and _any_allowed(candidates[i + 1 :]):
            resp.release()
            continue
        return dep, resp
    if last_exc is not None:
        raise last_exc
    raise GatewayError(
        ErrorKind.UNAVAILABLE,
        "All upstreams for this model are unavailable (circuit open); retry later.",
        retry_after_s=min(open_retry) if open_retry else 1.0,
    )


def _any_allowed(rest: list[Deployment]) -> bool:
    # Peek without consuming a half-open probe.
    for dep in rest:
        b = dep.breaker
        if b.state is State.CLOSED or b.retry_after() <= 0 or b.state is State.HALF_OPEN:
            return True
    return False
