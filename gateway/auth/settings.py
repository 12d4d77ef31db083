"""Control-plane secrets, read once from the environment at start."""

from __future__ import annotations

from dataclasses import dataclass

import structlog

from gateway.config import AuthConfig, Config

MIN_SECRET_LEN = 32
MIN_BOOTSTRAP_LEN = 24

log = structlog.get_logger("auth")


@dataclass(frozen=True, slots=True)
class AuthSettings:
    cfg: AuthConfig
    jwt_secret: bytes  # empty: login disabled
    bootstrap_token: str  # empty: no bootstrap token

    @classmethod
    def from_config(cls, cfg: Config) -> AuthSettings:
        a = cfg.auth
        secret = cfg.env(a.jwt_secret_env)
        if secret and len(secret) < MIN_SECRET_LEN:
            log.warning("jwt secret too short; login disabled", env=a.jwt_secret_env, min_len=MIN_SECRET_LEN)
            secret = ""
        token = cfg.env(a.bootstrap_admin_token_env)
        if token and len(token) < MIN_BOOTSTRAP_LEN:
            log.warning("bootstrap admin token too short; ignored", env=a.bootstrap_admin_token_env,
                        min_len=MIN_BOOTSTRAP_LEN)
            token = ""
        return cls(cfg=a, jwt_secret=secret.encode(), bootstrap_token=token)
