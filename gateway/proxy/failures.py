"""The one failure classifier: what fails over, what trips a breaker.

Caller faults (4xx other than 401/408/409/429) never trip a breaker and never
fail over: the next deployment would refuse the same request.  An upstream
401 is the gateway's provider key failing, a fault of that deployment.
"""

from __future__ import annotations

import enum


class Verdict(enum.Enum):
    OK = "ok"
    CALLER = "caller"  # the request itself is bad: relay, no failover, no trip
    THROTTLED = "throttled"  # upstream 429: fail over, do not trip
    FAILED = "failed"  # 5xx, connection error, timeout: fail over and trip

    @property
    def fails_over(self) -> bool:
        return self in (Verdict.THROTTLED, Verdict.FAILED)

    @property
    def trips(self) -> bool:
        return self is Verdict.FAILED


def classify_status(status: int) -> Verdict:
    if status < 400:
        return Verdict.OK
    if status == 429:
        return Verdict.THROTTLED
    if status >= 500 or status in (401, 408, 409):
        return Verdict.FAILED
    return Verdict.CALLER
