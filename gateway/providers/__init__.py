"""Provider adapters: mostly data (auth header, paths, error shape).

``PROVIDERS`` maps an upstream's ``provider`` kind to its data; ``name`` is
the dialect it speaks.  Cloud kinds also get an adapter (``make_cloud``,
cloud.py) for what is not data: URLs, credentials, signing, stream framing.
"""

from __future__ import annotations

from gateway.config import UpstreamConfig
from gateway.providers.anthropic import ANTHROPIC_PROVIDER
from gateway.providers.azure import AZURE_PROVIDER, AzureOpenAI
from gateway.providers.base import Provider
from gateway.providers.bedrock import Bedrock
from gateway.providers.cloud import CloudAdapter
from gateway.providers.openai import OPENAI_PROVIDER
from gateway.providers.vertex import Vertex

BEDROCK_PROVIDER = Provider(name="anthropic", auth_header="", auth_prefix="", request_id_header="x-amzn-requestid")
VERTEX_PROVIDER = Provider(name="anthropic", auth_header="", auth_prefix="", request_id_header="x-request-id")

PROVIDERS: dict[str, Provider] = {
    "anthropic": ANTHROPIC_PROVIDER,
    "openai": OPENAI_PROVIDER,
    "azure-openai": AZURE_PROVIDER,
    "bedrock": BEDROCK_PROVIDER,
    "vertex": VERTEX_PROVIDER,
}


def make_cloud(name: str, up: UpstreamConfig) -> CloudAdapter | None:
    """The adapter of a cloud kind (None for the native ones)."""
    if up.provider == "azure-openai":
        return AzureOpenAI(name, up)
    if up.provider == "bedrock":
        return Bedrock(name, up)
    if up.provider == "vertex":
        return Vertex(name, up)
    return None


__all__ = ["ANTHROPIC_PROVIDER", "OPENAI_PROVIDER", "PROVIDERS", "CloudAdapter", "Provider", "make_cloud"]
