"""Provider adapters: mostly data (auth header, paths, error shape)."""

from __future__ import annotations

from gateway.providers.anthropic import ANTHROPIC_PROVIDER
from gateway.providers.base import Provider
from gateway.providers.openai import OPENAI_PROVIDER

PROVIDERS: dict[str, Provider] = {p.name: p for p in (ANTHROPIC_PROVIDER, OPENAI_PROVIDER)}

__all__ = ["ANTHROPIC_PROVIDER", "OPENAI_PROVIDER", "PROVIDERS", "Provider"]
