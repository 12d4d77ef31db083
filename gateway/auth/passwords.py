"""argon2id password hashing, off the event loop.

``verify`` of an unknown user checks the password against a dummy hash made
with the same parameters, so an unknown email costs the same time as a
wrong password.
"""

from __future__ import annotations

import asyncio
import secrets

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from gateway.config import AuthConfig

MIN_PASSWORD_LEN = 10
MAX_PASSWORD_LEN = 1024  # argon2 hashes any length; cap what we accept to bound the work


class Passwords:
    def __init__(self, cfg: AuthConfig) -> None:
        self.hasher = PasswordHasher(
            time_cost=cfg.argon2_time_cost, memory_cost=cfg.argon2_memory_kib, parallelism=cfg.argon2_parallelism,
        )
        self._dummy = ""  # made on first use: create_app stays cheap (standalone never needs it)

    async def hash(self, password: str) -> str:
        return await asyncio.get_running_loop().run_in_executor(None, self.hasher.hash, password)

    def _verify(self, stored: str | None, password: str) -> bool:
        if stored is None and not self._dummy:
            self._dummy = self.hasher.hash(secrets.token_urlsafe(16))
        try:
            return self.hasher.verify(stored or self._dummy, password) and stored is not None
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False

    async def verify(self, stored: str | None, password: str) -> bool:
        """True iff ``password`` matches ``stored``; None (no such user) costs the same and is False."""
        return await asyncio.get_running_loop().run_in_executor(None, self._verify, stored, password)

    def needs_rehash(self, stored: str) -> bool:
        try:
            return self.hasher.check_needs_rehash(stored)
        except InvalidHashError:
            return True
