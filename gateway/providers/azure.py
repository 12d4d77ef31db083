"""Azure OpenAI: OpenAI's format at Azure's deployment URLs.

``/v1/chat/completions`` -> ``{base_url}/openai/deployments/{deployment}/chat/completions?api-version=...``
(likewise embeddings and completions).  The deployment is the upstream's
``deployment`` or else the model the request sends upstream.  The body goes
as received (Azure ignores ``model``); answers, streams and errors are
OpenAI's shape already, content-filter refusals included (a 400 with
``code: "content_filter"``, relayed as the caller's error it is).  Auth is the
``api-key`` header (the Provider data, a static key) or an Entra ID bearer
token (entra.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import quote

from multidict import CIMultiDict
from yarl import URL

from gateway.config import UpstreamConfig
from gateway.providers.base import Provider
from gateway.providers.cloud import Reader, credential, json_doc, not_served
from gateway.providers.credentials import CredentialCache
from gateway.providers.entra import entra_token
from gateway.upstream.client import LeanResponse

AZURE_PROVIDER = Provider(
    name="openai",  # the dialect it speaks
    auth_header="api-key",
    auth_prefix="",
    request_id_header="x-request-id",
)

# The client's path -> the operation under Azure's deployment.
OPERATIONS = {
    "/v1/chat/completions": "chat/completions",
    "/v1/embeddings": "embeddings",
    "/v1/completions": "completions",
}


class AzureOpenAI:
    kind = "azure-openai"

    def __init__(self, name: str, up: UpstreamConfig) -> None:
        self.name = name
        self.base = up.base_url
        self.deployment = up.deployment
        self.query = "?api-version=" + quote(up.api_version, safe="")
        self.credential: CredentialCache[str] | None = (
            entra_token(up.token_command, up.token_file, up.token_refresh_seconds)
            if up.token_command or up.token_file
            else None
        )
        self._urls: dict[tuple[str, str], URL] = {}

    async def prepare(self, path_qs: str, body: bytes, headers: CIMultiDict[str]) -> tuple[URL, bytes]:
        path = path_qs.split("?", 1)[0]
        op = OPERATIONS.get(path)
        if op is None:
            raise not_served(self.name, self.kind, path)
        deployment = self.deployment or str(json_doc(body).get("model", ""))
        url = self._urls.get((deployment, op))
        if url is None:
            url = URL(f"{self.base}/openai/deployments/{quote(deployment, safe='')}/{op}{self.query}", encoded=True)
            if len(self._urls) < 256:
                self._urls[(deployment, op)] = url
        if self.credential is not None:
            headers["authorization"] = "Bearer " + await credential(self.name, self.credential)
        return url, body

    def upstream_status(self, status: int, headers: Mapping[str, str]) -> int:
        return status

    def error_body(self, status: int, headers: Mapping[str, str], body: bytes) -> tuple[int, bytes]:
        return status, body  # OpenAI's shape already

    def stream_reader(self, resp: LeanResponse) -> Reader | None:
        return None

