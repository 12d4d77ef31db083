"""The admission decision: static checks on the principal, then the limiter.

``admit`` raises GatewayError or returns an Admission that the proxy settles
when the request ends (always, also on client disconnect or upstream failure).
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Protocol

from gateway.config import Limits, model_matches
from gateway.errors import ErrorKind, GatewayError
from gateway.policy.output_cap import OutputAsk, cap_problem
from gateway.policy.principals import Principal


@dataclass(slots=True)
class RequestFacts:
    """What policy needs to know about one request, read from its body once."""

    model: str
    stream: bool
    max_tokens: int | None
    body_len: int
    client_ip: str
    request_id: str
    # The output ask beyond max_tokens (per choice, above): how many choices
    # (OpenAI ``n``) and where a cap is written when none was asked
    # ("" on paths that produce no output); see policy/output_cap.py.
    choices: int = 1
    cap_field: str = ""

    @property
    def output_ask(self) -> OutputAsk:
        return OutputAsk(self.max_tokens, self.choices, self.cap_field)

    @property
    def est_input_tokens(self) -> int:
        # ~4 bytes per token is the usual estimate; settle corrects it.
        return self.body_len // 4 + 1


@dataclass(slots=True)
class Reservation:
    """What the limiter reserved for a request; opaque to the proxy."""

    headers: dict[str, str] = field(default_factory=dict)
    state: object = None
    # Budget counters the usage record's cost goes to once the ledger commits it
    # (RedisLimiter with a ledger writer; see stores/redis_scripts.py).
    budget_keys: tuple[str, ...] = ()


class Limiter(Protocol):
    async def reserve(self, principal: Principal, facts: RequestFacts) -> Reservation: ...

    async def settle(
        self, principal: Principal, facts: RequestFacts, reservation: Reservation,
        tokens: int, cost_pico: int,
    ) -> None: ...

    def settle_later(
        self, principal: Principal, facts: RequestFacts, reservation: Reservation,
        tokens: int, cost_pico: int,
    ) -> None:
        """``settle`` off the hot path, without a task per request: the limiter owns it from here
        (sends it soon, and at the latest when it closes)."""

    async def close(self) -> None: ...


class NullLimiter:
    """No counters: used when no limit applies anywhere."""

    async def reserve(self, principal: Principal, facts: RequestFacts) -> Reservation:
        return Reservation()

    async def settle(
        self, principal: Principal, facts: RequestFacts, reservation: Reservation,
        tokens: int, cost_pico: int,
    ) -> None:
        return None

    def settle_later(
        self, principal: Principal, facts: RequestFacts, reservation: Reservation,
        tokens: int, cost_pico: int,
    ) -> None:
        return None

    async def close(self) -> None:
        return None


@lru_cache(maxsize=4096)
def _networks(cidrs: tuple[str, ...]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)


def _ip_allowed(ip: str, cidrs: tuple[str, ...]) -> bool:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(addr in net for net in _networks(cidrs))


_ALLOWED: dict[tuple[tuple[str, ...], str], bool] = {}  # (patterns, model) -> verdict: globs matched once


def model_allowed(model: str, limits: Limits) -> bool:
    patterns = limits.models
    if patterns is None:
        return True
    verdict = _ALLOWED.get((patterns, model))
    if verdict is None:
        verdict = any(model_matches(p, model) for p in patterns)
        if len(_ALLOWED) < 16_384:  # bounded: clients choose the model names
            _ALLOWED[(patterns, model)] = verdict
    return verdict


def check_static(principal: Principal, facts: RequestFacts) -> None:
    """Every check that needs no counter; raises GatewayError."""
    if principal.expires_at is not None and time.time() >= principal.expires_at:
        raise GatewayError(ErrorKind.AUTHENTICATION, "This API key has expired.")
    if principal.user_disabled:
        raise GatewayError(ErrorKind.PERMISSION, "The user of this API key is disabled.")
    for who, limits in (("key", principal.key_limits), ("user", principal.user_limits), ("team", principal.team_limits)):
        if limits.allowed_ips is not None and not _ip_allowed(facts.client_ip, limits.allowed_ips):
            raise GatewayError(ErrorKind.PERMISSION, "Requests from this IP address are not allowed for this key.")
        # A verdict seen before is a dict lookup; model_allowed decides (and caches) the others.
        if limits.models is not None and not (_ALLOWED.get((limits.models, facts.model))
                                              or model_allowed(facts.model, limits)):
            raise GatewayError(ErrorKind.PERMISSION, f"This API key may not use model '{facts.model}'.")
        if limits.max_tokens is not None:
            problem = cap_problem(facts.output_ask, limits.max_tokens, who)
            if problem is not None:
                raise GatewayError(ErrorKind.INVALID_REQUEST, problem)


def output_cap(principal: Principal) -> int | None:
    """The lowest ``max_tokens`` limit of the key and its user (None: no cap)."""
    key, user = principal.key_limits.max_tokens, principal.user_limits.max_tokens
    if key is None:
        return user
    return key if user is None or key <= user else user


SettleLater = Callable[[Principal, RequestFacts, Reservation, int, int], None]


class Admitter:
    def __init__(self, limiter: Limiter) -> None:
        self.limiter = limiter
        # The handler's way to settle (``Limiter.settle_later``), bound once: no call of ours in between.
        self.settle_later: SettleLater = getattr(limiter, "settle_later", None) or self._settle_in_task
        self._settling: set[asyncio.Task[None]] = set()

    def admit(self, principal: Principal, facts: RequestFacts) -> Awaitable[Reservation]:
        """Raises GatewayError at once for a static refusal; else the limiter's reservation, to await."""
        check_static(principal, facts)
        return self.limiter.reserve(principal, facts)

    async def settle(
        self, principal: Principal, facts: RequestFacts, reservation: Reservation,
        tokens: int, cost_pico: int,
    ) -> None:
        await self.limiter.settle(principal, facts, reservation, tokens, cost_pico)

    def _settle_in_task(
        self, principal: Principal, facts: RequestFacts, reservation: Reservation,
        tokens: int, cost_pico: int,
    ) -> None:
        """For a limiter without ``settle_later`` (a test double): its ``settle`` in a task held until done."""
        task = asyncio.get_running_loop().create_task(self.settle(principal, facts, reservation, tokens, cost_pico))
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)
