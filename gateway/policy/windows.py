"""Limit arithmetic in one process's memory: the Redis script's twin.

``LocalCounters.admit`` answers exactly as ``stores/redis_scripts.ADMIT``
does for the same history (same windows, same retry times, same all-or-
nothing reservation); ``settle`` as ``SETTLE``.  The local limiter uses it in
standalone mode and while Redis is unreachable, and the property tests pin
its invariants.

Kinds: ``r`` requests in a rolling minute (exact: one timestamp each), ``t``
tokens per second bucket over the last 60 seconds, ``c`` leases held by
in-flight requests, ``b`` pico-dollars spent + reserved.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

WINDOW_MS = 60_000
WINDOW_S = 60


@dataclass(slots=True)
class Decision:
    """``status`` 1 admitted (all reserved) or 0 rejected (nothing reserved).

    ``used[i]`` is check i's count (including this request when admitted),
    ``reset[i]`` ms until its oldest entry leaves the window (0: nothing
    to wait for), ``failed`` the 1-based index of the reported failure
    (a budget failure wins: waiting does not help it) and ``retry_ms`` when
    every failing rate check would admit the request.
    """

    status: int
    sec: int
    failed: int
    retry_ms: int
    used: list[int]
    reset: list[int]


class LocalCounters:
    def __init__(self) -> None:
        self.requests: dict[str, deque[int]] = {}
        self.tokens: dict[str, deque[list[int]]] = {}  # [second, tokens], oldest first
        self.leases: dict[str, set[str]] = {}
        self.spend: dict[str, int] = {}

    def _requests(self, key: str, now_ms: int) -> deque[int]:
        log = self.requests.get(key)
        if log is None:
            log = self.requests[key] = deque()
        cutoff = now_ms - WINDOW_MS
        while log and log[0] <= cutoff:
            log.popleft()
        return log

    def _tokens(self, key: str, sec: int) -> deque[list[int]]:
        buckets = self.tokens.get(key)
        if buckets is None:
            buckets = self.tokens[key] = deque()
        while buckets and buckets[0][0] <= sec - WINDOW_S:
            buckets.popleft()
        return buckets

    def admit(
        self,
        checks: Sequence[tuple[str, str, int]],
        now_ms: int,
        member: str,
        tokens: int,
        cost: int,
    ) -> Decision:
        """Check every (kind, key, limit); reserve all of them or none."""
        sec = now_ms // 1000
        n = len(checks)
        used = [0] * n
        reset = [0] * n
        failed = 0
        retry = 0
        budget_failed = False
        for i, (kind, key, limit) in enumerate(checks):
            over = False
            if kind == "r":
                log = self._requests(key, now_ms)
                u = len(log)
                if u:
                    reset[i] = log[0] + WINDOW_MS - now_ms
                if u + 1 > limit:
                    over = True
                    retry = max(retry, log[u - limit] + WINDOW_MS - now_ms)
            elif kind == "t":
                buckets = self._tokens(key, sec)
                u = sum(b[1] for b in buckets)
                if buckets:
                    reset[i] = (buckets[0][0] + WINDOW_S) * 1000 - now_ms
                if u + tokens > limit:
                    over = True
                    left, wait = u, WINDOW_MS
                    for s, v in buckets:
                        left -= v
                        if left + tokens <= limit:
                            wait = (s + WINDOW_S) * 1000 - now_ms
                            break
                    retry = max(retry, wait)
            elif kind == "c":
                u = len(self.leases.get(key, ()))
                over = u + 1 > limit
            else:
                u = self.spend.get(key, 0)
                if u + cost > limit:
                    over = True
                    if not budget_failed:
                        failed = i + 1
                    budget_failed = True
            used[i] = u
            if over and failed == 0:
                failed = i + 1
        if failed:
            return Decision(0, sec, failed, retry, used, reset)
        for i, (kind, key, _) in enumerate(checks):
            if kind == "r":
                self.requests[key].append(now_ms)
                if used[i] == 0:
                    reset[i] = WINDOW_MS
            elif kind == "t":
                buckets = self.tokens[key]
                if buckets and buckets[-1][0] >= sec:
                    buckets[-1][1] += tokens
                else:
                    buckets.append([sec, tokens])
                if used[i] == 0:
                    reset[i] = WINDOW_MS
                used[i] += tokens
                continue
            elif kind == "c":
                self.leases.setdefault(key, set()).add(member)
            else:
                self.spend[key] = used[i] + cost
                used[i] += cost
                continue
            used[i] += 1
        return Decision(1, sec, 0, 0, used, reset)

    def settle(
        self,
        checks: Sequence[tuple[str, str]],
        member: str,
        sec: int,
        tokens_delta: int,
        cost_reserved: int,
        cost_actual: int,
    ) -> None:
        """Tokens and spend move to the actual (never below zero); the lease is released."""
        for kind, key in checks:
            if kind == "t":
                for bucket in self.tokens.get(key, ()):
                    if bucket[0] == sec:
                        bucket[1] = max(0, bucket[1] + tokens_delta)
                        break
            elif kind == "c":
                held = self.leases.get(key)
                if held is not None:
                    held.discard(member)
                    if not held:
                        del self.leases[key]
            elif kind == "b":
                self.spend[key] = max(0, self.spend.get(key, 0) - cost_reserved + cost_actual)

    def prune(self, now_ms: int) -> None:
        """Drop empty windows so memory follows the active keys only."""
        for key in [k for k in self.requests if not self._requests(k, now_ms)]:
            del self.requests[key]
        sec = now_ms // 1000
        for key in [k for k in self.tokens if not self._tokens(k, sec)]:
            del self.tokens[key]
