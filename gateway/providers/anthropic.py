"""Anthropic Messages API."""

from gateway.providers.base import Provider

ANTHROPIC_PROVIDER = Provider(
    name="anthropic",
    auth_header="x-api-key",
    auth_prefix="",
    request_id_header="request-id",
)

DEFAULT_VERSION = "2023-06-01"
