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
from gateway.proxy.context import RequestContext
from gateway.proxy.failures import Verdict, classify_status
from gateway.proxy.routing import Deployment
from gateway.resilience.breaker import State


def upstream_headers(incoming: Mapping[str, str], dep: Deployment) -> CIMultiDict[str]:
    """The allowed client headers (proxy/headers.py selected them), plus the provider key."""
    out: CIMultiDict[str] = CIMultiDict(incoming)
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
        ctx.attempts += 1
        ctx.upstream = dep.name
        headers = upstream_headers(incoming_headers, dep)
        t0 = time.perf_counter()
        try:
            async with asyncio.timeout(dep.cfg.first_byte_timeout):
                resp = await session.request(
                    method, dep.url(path_qs), data=body, headers=headers, timeout=dep.timeout,
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
        verdict = classify_status(resp.status)
        if verdict is Verdict.OK:
            # Success is recorded when the body or stream completes (streaming.py).
            return dep, resp
        if verdict.trips:
            dep.breaker.record_failure()
        else:
            dep.breaker.release_probe()
        if resp.status == 401:
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
