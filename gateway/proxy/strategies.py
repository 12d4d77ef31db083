"""How a route orders its own deployments for one request.

- ``weighted``: a weighted draw without replacement (the first pick is
  weighted, the rest follow as later choices).
- ``least_busy``: fewest attempts in flight on this worker first (ties by weight).
- ``latency``: power of two choices on each upstream's EWMA of time to first
  token (per worker): draw two by weight, the faster goes first; the rest
  follow by EWMA.  An upstream without a figure yet counts as fast, so that
  each one gets measured.

Breakers are not consulted here: an open circuit is skipped when attempted.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.proxy.routing import Deployment

EWMA_ALPHA = 0.2  # weight of the newest sample


@dataclass(slots=True)
class UpstreamStats:
    """Live per-worker figures of one upstream, fed by attempts."""

    inflight: int = 0  # attempts open now (headers awaited or answer being relayed)
    ttft_ewma: float = 0.0  # seconds; 0.0 = no sample yet
    # Counters for metrics (deltas are published once a second).
    attempts: int = 0
    retries: int = 0
    hedges: int = 0
    wins: int = 0  # requests this upstream served
    hedge_wins: int = 0  # ... as the hedge (second) attempt

    def observe_ttft(self, seconds: float) -> None:
        self.ttft_ewma = seconds if self.ttft_ewma == 0.0 else self.ttft_ewma + EWMA_ALPHA * (seconds - self.ttft_ewma)


def weighted(deps: Sequence[Deployment], rnd: random.Random | None = None) -> list[Deployment]:
    pick = (rnd or random).random
    pool = list(deps)
    out: list[Deployment] = []
    while pool:
        total = sum(d.weight for d in pool)
        r = pick() * total
        for i, d in enumerate(pool):
            r -= d.weight
            if r < 0:
                out.append(pool.pop(i))
                break
        else:  # pragma: no cover - float edge
            out.append(pool.pop())
    return out


def least_busy(deps: Sequence[Deployment], rnd: random.Random | None = None) -> list[Deployment]:
    # Shuffle first (weighted) so that equal loads do not always pick the same one.
    return sorted(weighted(deps, rnd), key=lambda d: d.upstream.stats.inflight)


def latency(deps: Sequence[Deployment], rnd: random.Random | None = None) -> list[Deployment]:
    drawn = weighted(deps, rnd)
    a, b = drawn[0], drawn[1]
    first = b if b.upstream.stats.ttft_ewma < a.upstream.stats.ttft_ewma else a
    others = sorted((d for d in drawn if d is not first), key=lambda d: d.upstream.stats.ttft_ewma)
    return [first, *others]


STRATEGIES = {"weighted": weighted, "least_busy": least_busy, "latency": latency}


def order(strategy: str, deps: Sequence[Deployment], rnd: random.Random | None = None) -> list[Deployment]:
    """The route's own deployments in the order to try them (two or more)."""
    return STRATEGIES[strategy](deps, rnd)
