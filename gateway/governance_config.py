"""Configuration sections of the governance features: [tags], [alerts], [oidc].

Kept apart from config.py (the loader and the core schema); config.py
embeds these dataclasses in ``Config`` and calls ``check`` with the others.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_LOCAL_HTTP = ("http://127.0.0.1", "http://localhost", "http://[::1]")
TAG_NAME = re.compile(r"^[a-z][a-z0-9_.-]{0,31}$")


@dataclass(frozen=True, slots=True)
class TagsConfig:
    # Tag names a request or key may use; empty: any name from the safe alphabet.
    allowed: tuple[str, ...] = ()
    max_per_request: int = 10
    # Read the OpenAI ``metadata`` object's entries named in ``allowed`` as tags
    # (and Anthropic's ``metadata.user_id`` as tag ``end_user`` if allowed).
    from_metadata: bool = True
    # Tag names exported as a metric label, each with its closed set of values
    # (any other value is counted as "other"): {env = ["prod", "staging"]}.
    metric_labels: dict[str, tuple[str, ...]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class AlertsConfig:
    enabled: bool = True  # the evaluator runs where a database is configured
    thresholds: tuple[int, ...] = (50, 80, 100)  # percent of a budget
    webhook_url: str = ""  # default target when an alert rule names none
    secret_env: str = "GATEWAY_ALERT_SECRET"  # HMAC-SHA256 signing secret
    evaluate_seconds: float = 15.0
    deliver_seconds: float = 2.0  # how often pending deliveries are attempted
    max_attempts: int = 8
    retry_base_seconds: float = 1.0  # backoff: base * 2^(attempt-1), capped
    retry_max_seconds: float = 300.0
    timeout_seconds: float = 5.0


@dataclass(frozen=True, slots=True)
class OidcConfig:
    enabled: bool = False
    issuer: str = ""  # https://idp.example.com (discovery at /.well-known/openid-configuration)
    client_id: str = ""
    client_secret_env: str = "GATEWAY_OIDC_CLIENT_SECRET"  # empty env: a public client (PKCE only)
    redirect_uri: str = ""  # https://gateway.example.com/auth/oidc/callback
    scopes: tuple[str, ...] = ("openid", "email", "profile")
    role_claim: str = "groups"  # claim whose values map to a role
    admin_values: tuple[str, ...] = ("llm-gateway-admins",)
    team_admin_values: tuple[str, ...] = ()
    team_claim: str = ""  # claim naming the user's team (by team name); empty: teams not mapped
    create_users: bool = True  # just-in-time creation of unknown users
    allowed_domains: tuple[str, ...] = ()  # email domains accepted; empty: any
    login_ttl_seconds: int = 600  # state/nonce/PKCE verifier lifetime
    clock_skew_seconds: int = 60
    jwks_cache_seconds: int = 300


def check(tags: TagsConfig, alerts: AlertsConfig, oidc: OidcConfig, errors: list[str]) -> None:
    for i, name in enumerate(tags.allowed):
        if not TAG_NAME.match(name):
            errors.append(f"tags.allowed[{i}]: {name!r} is not a tag name (a-z, 0-9, _ . -, at most 32)")
    if not 1 <= tags.max_per_request <= 10:
        errors.append("tags.max_per_request: must be 1..10")
    for name in tags.metric_labels:
        if tags.allowed and name not in tags.allowed:
            errors.append(f"tags.metric_labels.{name}: not among tags.allowed")
        elif not TAG_NAME.match(name):
            errors.append(f"tags.metric_labels.{name}: not a tag name")
    for i, t in enumerate(alerts.thresholds):
        if not 1 <= t <= 1000:
            errors.append(f"alerts.thresholds[{i}]: must be a percentage from 1 to 1000")
    if alerts.webhook_url and not alerts.webhook_url.startswith(("http://", "https://")):
        errors.append("alerts.webhook_url: must start with http:// or https://")
    for name in ("evaluate_seconds", "deliver_seconds", "max_attempts", "retry_base_seconds", "retry_max_seconds",
                 "timeout_seconds"):
        if getattr(alerts, name) <= 0:
            errors.append(f"alerts.{name}: must be positive")
    if oidc.enabled:
        for name in ("issuer", "client_id", "redirect_uri"):
            if not getattr(oidc, name):
                errors.append(f"oidc.{name}: required when oidc.enabled")
        if oidc.issuer and not oidc.issuer.startswith("https://") and not oidc.issuer.startswith(_LOCAL_HTTP):
            errors.append("oidc.issuer: must be an https URL (http only for localhost)")
        if "openid" not in oidc.scopes:
            errors.append("oidc.scopes: must include 'openid'")
