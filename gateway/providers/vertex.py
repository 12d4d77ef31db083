"""Google Vertex AI, Anthropic models: rawPredict and streamRawPredict.

The Messages request goes to
``/v1/projects/{project}/locations/{region}/publishers/anthropic/models/{model}:rawPredict``
(``:streamRawPredict`` when ``stream`` is true); the body loses ``model``,
keeps ``stream`` and gains ``anthropic_version: "vertex-2023-10-16"``, as
Anthropic's Vertex client sends it.  count_tokens goes to the
``count-tokens:rawPredict`` model with ``model`` kept.  Streams are already
Anthropic SSE.  Errors come either in Anthropic's shape (from the model:
relayed as they are) or in Google's (``{"error": {"code", "message",
"status"}}``: turned into the Anthropic error they mean).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

import orjson
from multidict import CIMultiDict
from yarl import URL

from gateway.config import UpstreamConfig
from gateway.providers.cloud import Reader, anthropic_error, betas_to_body, credential, json_doc, not_served
from gateway.providers.credentials import CredentialCache
from gateway.providers.google import google_token
from gateway.upstream.client import LeanResponse

ANTHROPIC_VERSION = "vertex-2023-10-16"

# Google's canonical status -> (client status, Anthropic type)
STATUSES: dict[str, tuple[int, str]] = {
    "RESOURCE_EXHAUSTED": (429, "rate_limit_error"),
    "UNAVAILABLE": (529, "overloaded_error"),
    "INVALID_ARGUMENT": (400, "invalid_request_error"),
    "FAILED_PRECONDITION": (400, "invalid_request_error"),
    "OUT_OF_RANGE": (400, "invalid_request_error"),
    "NOT_FOUND": (404, "not_found_error"),
    "DEADLINE_EXCEEDED": (504, "timeout_error"),
    "INTERNAL": (500, "api_error"),
    "UNAUTHENTICATED": (401, "authentication_error"),
    "PERMISSION_DENIED": (401, "authentication_error"),
}
_BY_STATUS = {400: "invalid_request_error", 404: "not_found_error", 413: "request_too_large",
              429: "rate_limit_error", 503: "overloaded_error", 529: "overloaded_error", 504: "timeout_error"}


def base_url(up: UpstreamConfig) -> str:
    if up.base_url:
        return up.base_url
    if up.region == "global":
        return "https://aiplatform.googleapis.com"
    if up.region in ("us", "eu"):  # multi-region endpoints
        return f"https://aiplatform.{up.region}.rep.googleapis.com"
    return f"https://{up.region}-aiplatform.googleapis.com"


class Vertex:
    kind = "vertex"

    def __init__(self, name: str, up: UpstreamConfig) -> None:
        self.name = name
        self.models = f"{base_url(up)}/v1/projects/{quote(up.project, safe='')}/locations/{up.region}/publishers/anthropic/models/"
        self.credential: CredentialCache[str] | None = google_token(up.credentials_file)

    async def prepare(self, path_qs: str, body: bytes, headers: CIMultiDict[str]) -> tuple[URL, bytes]:
        path = path_qs.split("?", 1)[0]
        if path not in ("/v1/messages", "/v1/messages/count_tokens"):
            raise not_served(self.name, self.kind, path)
        assert self.credential is not None
        token = await credential(self.name, self.credential)
        doc = json_doc(body)
        doc.setdefault("anthropic_version", ANTHROPIC_VERSION)
        betas_to_body(doc, headers)
        if path == "/v1/messages/count_tokens":
            url = self.models + "count-tokens:rawPredict"
        else:
            model = str(doc.pop("model", ""))
            method = "streamRawPredict" if doc.get("stream") is True else "rawPredict"
            url = f"{self.models}{quote(model, safe='@')}:{method}"
        headers["authorization"] = "Bearer " + token
        headers["content-type"] = "application/json"
        return URL(url, encoded=True), orjson.dumps(doc)

    def upstream_status(self, status: int, headers: Mapping[str, str]) -> int:
        # Google refusing the gateway's service account is the gateway's credential failing.
        return 401 if status == 403 else status

    def error_body(self, status: int, headers: Mapping[str, str], body: bytes) -> tuple[int, bytes]:
        try:
            doc: Any = orjson.loads(body)
        except orjson.JSONDecodeError:
            doc = None
        if isinstance(doc, list) and doc:  # Google sometimes wraps the error in a list
            doc = doc[0]
        if isinstance(doc, dict) and doc.get("type") == "error":
            return status, body  # the model's own Anthropic error
        err = doc.get("error") if isinstance(doc, dict) else None
        if not isinstance(err, dict):
            return anthropic_error(status, _BY_STATUS.get(status, "api_error"), f"Vertex AI answered {status}")
        gstatus = str(err.get("status") or "")
        client_status, etype = STATUSES.get(gstatus, (status, _BY_STATUS.get(status, "api_error")))
        message = str(err.get("message") or "")
        return anthropic_error(client_status, etype, f"Vertex AI {gstatus}: {message}" if gstatus else message)

    def stream_reader(self, resp: LeanResponse) -> Reader | None:
        return None  # already Anthropic SSE
