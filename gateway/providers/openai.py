"""OpenAI Chat Completions and Embeddings APIs."""

from gateway.providers.base import Provider

OPENAI_PROVIDER = Provider(
    name="openai",
    auth_header="authorization",
    auth_prefix="Bearer ",
    request_id_header="x-request-id",
)
