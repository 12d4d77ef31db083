"""The one failure classifier: what is retried, what fails over, what trips a breaker.

Caller faults (4xx other than 401/408/409/429) never trip a breaker and never
fail over: the next deployment would refuse the same request.  An upstream
401 is the gateway's provider key failing, a fault of that deployment.  A
context-length 400 is a caller fault too, except that a route may name
bigger-context routes for it (``context_fallback_models``).

Same-upstream retries (before failing over) are for what a second try can
fix: connection errors, 429, 500, 502, 503, 529.  A first-byte or
first-token timeout is never retried on the same upstream: it fails over.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import orjson

from gateway.errors import ErrorKind


class Verdict(enum.Enum):
    OK = "ok"
    CALLER = "caller"  # the request itself is bad: relay, no failover, no trip
    CONTEXT = "context"  # a caller fault the route may answer with a bigger-context model
    THROTTLED = "throttled"  # upstream 429: fail over, do not trip
    FAILED = "failed"  # 5xx, connection error, cut stream: fail over and trip
    TIMEOUT = "timeout"  # first byte or first token too late: fail over and trip

    @property
    def fails_over(self) -> bool:
        return self in (Verdict.THROTTLED, Verdict.FAILED, Verdict.TIMEOUT)

    @property
    def trips(self) -> bool:
        return self is Verdict.FAILED or self is Verdict.TIMEOUT


# Statuses worth a second try on the same upstream (after a backoff).
RETRY_STATUSES = frozenset({429, 500, 502, 503, 529})


def classify_status(status: int) -> Verdict:
    if status < 400:
        return Verdict.OK
    if status == 429:
        return Verdict.THROTTLED
    if status >= 500 or status in (401, 408, 409):
        return Verdict.FAILED
    return Verdict.CALLER


@dataclass(slots=True)
class Failure:
    """Why one attempt did not produce an answer to relay, and what may follow."""

    verdict: Verdict
    kind: ErrorKind  # the gateway's own error, when nothing better is left to answer
    message: str
    retry_same: bool  # a retry on the same upstream may help
    retry_after: float | None = None  # seconds the upstream asked for (retry-after / retry-after-ms)
    status: int = 0  # the upstream's HTTP status, 0 when it gave none
    relayable: bool = False  # the upstream's answer may be relayed as the final one


def status_failure(status: int, upstream: str, retry_after: float | None) -> Failure:
    verdict = classify_status(status)
    if status == 401:
        # The provider refused the gateway's own key, not the caller's: never relay it.
        return Failure(verdict, ErrorKind.UPSTREAM_ERROR, f"Upstream '{upstream}' refused the gateway's credentials.",
                       retry_same=False, status=status)
    return Failure(
        verdict, ErrorKind.UPSTREAM_ERROR, f"Upstream '{upstream}' answered {status}.",
        retry_same=status in RETRY_STATUSES, retry_after=retry_after, status=status, relayable=True,
    )


def connection_failure(upstream: str) -> Failure:
    return Failure(Verdict.FAILED, ErrorKind.UPSTREAM_ERROR, f"Upstream '{upstream}' is unreachable.", retry_same=True)


def timeout_failure(upstream: str, what: str) -> Failure:
    return Failure(Verdict.TIMEOUT, ErrorKind.UPSTREAM_TIMEOUT, f"Upstream '{upstream}' timed out ({what}).",
                   retry_same=False)


def cut_failure(upstream: str, what: str) -> Failure:
    """A stream that failed before its first content event (cut, or an error event)."""
    return Failure(Verdict.FAILED, ErrorKind.UPSTREAM_ERROR, f"Upstream '{upstream}' {what}.", retry_same=True)


def is_context_length(status: int, body: bytes) -> bool:
    """OpenAI's ``context_length_exceeded`` code or Anthropic's 400 "prompt is too long"."""
    if status != 400 or not body:
        return False
    if b"context_length_exceeded" not in body and b"prompt is too long" not in body.lower():
        return False
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    err = doc.get("error") if isinstance(doc, dict) else None
    if not isinstance(err, dict):
        return False
    if err.get("code") == "context_length_exceeded":
        return True
    msg = err.get("message")
    return isinstance(msg, str) and "prompt is too long" in msg.lower()
