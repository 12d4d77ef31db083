"""Circuit breaker per upstream deployment: closed -> open -> half-open -> closed.

Fed only by the failure classifier's verdicts on upstream failures; caller
errors never reach it.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable

from gateway.config import BreakerConfig


class State(enum.IntEnum):
    CLOSED = 0
    OPEN = 1
    HALF_OPEN = 2


class Breaker:
    __slots__ = ("_cfg", "_clock", "_probes", "failures", "opened_at", "state")

    def __init__(self, cfg: BreakerConfig, clock: Callable[[], float] | None = None) -> None:
        self._cfg = cfg
        self._clock = clock or time.monotonic
        self.state = State.CLOSED
        self.failures = 0
        self.opened_at = 0.0
        self._probes = 0

    def allow(self) -> bool:
        """May a request go to this deployment now?  Counts half-open probes."""
        if self.state is State.CLOSED:
            return True
        if self.state is State.OPEN:
            if self._clock() - self.opened_at < self._cfg.cooldown_seconds:
                return False
            self.state = State.HALF_OPEN
            self._probes = 0
        if self._probes >= self._cfg.half_open_probes:
            return False
        self._probes += 1
        return True

    def retry_after(self) -> float:
        """Seconds until this breaker lets a probe through."""
        if self.state is not State.OPEN:
            return 1.0
        return max(0.0, self._cfg.cooldown_seconds - (self._clock() - self.opened_at))

    def record_success(self) -> None:
        if self.state is State.OPEN:
            # A call admitted before the trip (a long stream) ending well says
            # little about now: the probe after the cooldown decides.
            return
        self.failures = 0
        self.state = State.CLOSED

    def record_failure(self) -> None:
        if self.state is State.HALF_OPEN:
            self._trip()
            return
        self.failures += 1
        if self.failures >= self._cfg.failure_threshold:
            self._trip()

    def release_probe(self) -> None:
        """A half-open probe ended without a verdict (e.g. caller error)."""
        if self.state is State.HALF_OPEN and self._probes > 0:
            self._probes -= 1

    def _trip(self) -> None:
        self.state = State.OPEN
        self.opened_at = self._clock()
        self.failures = 0
