"""Access key -> principal (the key, its user and their limits).

The standalone resolver reads keys from the config file; the Postgres-backed
resolver (stores/) caches lookups in memory.  Both answer ``None`` for an
unknown key and raise GatewayError(UNAVAILABLE) when they cannot tell.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from hashlib import sha256
from typing import Protocol

from gateway.config import Config, Limits

KEY_PREFIX = "gwk_"
DISPLAY_PREFIX_LEN = 12


def hash_key(key: str) -> str:
    return sha256(key.encode()).hexdigest()


def display_prefix(key: str) -> str:
    return key[:DISPLAY_PREFIX_LEN]


@dataclass(frozen=True, slots=True)
class Principal:
    key_id: str
    key_prefix: str
    key_name: str
    user_id: str
    key_limits: Limits = field(default_factory=Limits)
    user_limits: Limits = field(default_factory=Limits)
    expires_at: float | None = None  # unix seconds
    user_disabled: bool = False
    tags: tuple[tuple[str, str], ...] = ()  # the key's default cost-attribution tags (hashable, like all fields)
    team_id: str | None = None  # the user's team (its counters share the team's hash tag)
    team_limits: Limits = field(default_factory=Limits)
    # The team's per-model budgets: (model name or glob, USD, period).
    team_model_budgets: tuple[tuple[str, float, str], ...] = ()


class PrincipalResolver(Protocol):
    async def resolve(self, key: str, client_ip: str = "") -> Principal | None: ...

    async def close(self) -> None: ...


def parse_expiry(text: str) -> float | None:
    if not text:
        return None
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


class StandaloneResolver:
    """Keys from the configuration file, looked up by SHA-256: no I/O."""

    def __init__(self, cfg: Config) -> None:
        users = {u.name: u.limits for u in cfg.users}
        self.by_digest: dict[str, Principal] = {}  # SHA-256 hex of the key -> its principal
        for k in cfg.keys:
            plaintext = cfg.env(k.key_env) if k.key_env else ""
            digest = hash_key(plaintext) if plaintext else k.key_sha256
            if not digest:
                continue  # env var unset: that key is simply not active
            self.by_digest[digest] = Principal(
                key_id=k.name,
                key_prefix=display_prefix(plaintext) if plaintext else k.name,
                key_name=k.name,
                user_id=k.user,
                key_limits=k.limits,
                user_limits=users.get(k.user, Limits()),
                expires_at=parse_expiry(k.expires_at),
            )

    async def resolve(self, key: str, client_ip: str = "") -> Principal | None:
        return self.by_digest.get(sha256(key.encode()).hexdigest())  # hash_key, written out

    async def close(self) -> None:
        return None
