"""Hedging: when the first attempt has no first token after ``hedge_after_ms``, race a second.

Lanes are coroutines that each walk the request's shared queue of
deployments (``failover.py``): the second lane takes the next deployment.
The first lane to produce an answer wins; the other is cancelled, which
closes its connection (and records whatever usage it had reported).  A lane
that runs out of deployments ends with ``Exhausted`` and the other lane
goes on alone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class Exhausted(Exception):
    """A lane found no deployment left to try."""


async def race(
    lane: Callable[[], Coroutine[Any, Any, T]],
    hedge_after_s: float,
    may_hedge: Callable[[], Awaitable[bool]],
    discard: Callable[[T], None],
) -> T:
    """Run one lane; after ``hedge_after_s`` without an answer and if ``may_hedge()``, a second.

    Returns the first answer; raises Exhausted when every lane ran out.
    ``discard`` is given a second answer that arrived together with the winner.
    """
    first = asyncio.ensure_future(lane())
    lanes: set[asyncio.Future[T]] = {first}
    try:
        done, _ = await asyncio.wait(lanes, timeout=hedge_after_s)
        if not done and await may_hedge():
            lanes.add(asyncio.ensure_future(lane()))
        winner: T | None = None
        while lanes and winner is None:
            done, lanes = await asyncio.wait(lanes, return_when=asyncio.FIRST_COMPLETED)
            error: BaseException | None = None
            for task in done:
                exc = task.exception()
                if exc is None:
                    if winner is None:
                        winner = task.result()
                    else:
                        discard(task.result())
                elif not isinstance(exc, Exhausted):
                    error = exc
            if winner is None and error is not None:
                raise error
        if winner is None:
            raise Exhausted
        return winner
    finally:
        for task in lanes:
            task.cancel()
        if lanes:
            for result in await asyncio.gather(*lanes, return_exceptions=True):
                if not isinstance(result, BaseException):
                    discard(result)  # finished just before its cancellation
