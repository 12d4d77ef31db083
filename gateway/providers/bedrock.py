"""AWS Bedrock, Anthropic models: InvokeModel and InvokeModelWithResponseStream.

The client's Messages request becomes Bedrock's: the body loses ``model``
and ``stream`` (they pick the URL: ``/model/{id}/invoke`` or
``/model/{id}/invoke-with-response-stream``) and gains
``anthropic_version: "bedrock-2023-05-31"`` (and ``anthropic-beta`` as
``anthropic_beta``), the way Anthropic's own Bedrock client sends it; then
it is SigV4-signed over its final bytes.  The answer is the Anthropic JSON
as is, a binary event stream turned into Anthropic SSE (eventstream.py), or
an AWS error (``x-amzn-ErrorType`` + ``{"message"}``) turned into the
Anthropic error it corresponds to.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from urllib.parse import quote

import orjson
from botocore.credentials import ReadOnlyCredentials
from multidict import CIMultiDict
from yarl import URL

from gateway.config import UpstreamConfig
from gateway.providers.aws import aws_credentials, sigv4_headers
from gateway.providers.cloud import Reader, anthropic_error, betas_to_body, credential, json_doc, not_served
from gateway.providers.credentials import CredentialCache
from gateway.providers.eventstream import EventStreamToSSE, aws_error_message
from gateway.upstream.client import LeanResponse

ANTHROPIC_VERSION = "bedrock-2023-05-31"

# AWS error type -> (status the classifier sees, status and Anthropic type the client gets).
# Access errors are the gateway's credentials failing: a 401 to the classifier,
# which never relays it (the caller's key is not at fault) and fails over.
_AUTH = (401, 401, "authentication_error")
ERRORS: dict[str, tuple[int, int, str]] = {
    "ThrottlingException": (429, 429, "rate_limit_error"),
    "ModelNotReadyException": (429, 429, "rate_limit_error"),  # AWS: "retry"; no breaker trip
    "ServiceQuotaExceededException": (429, 429, "rate_limit_error"),
    "ValidationException": (400, 400, "invalid_request_error"),
    "ResourceNotFoundException": (404, 404, "not_found_error"),
    "ModelTimeoutException": (504, 504, "timeout_error"),
    "ModelErrorException": (502, 502, "api_error"),
    "InternalServerException": (500, 500, "api_error"),
    "ServiceUnavailableException": (503, 529, "overloaded_error"),
    "AccessDeniedException": _AUTH,
    "UnrecognizedClientException": _AUTH,
    "InvalidSignatureException": _AUTH,
    "SignatureDoesNotMatch": _AUTH,
    "ExpiredTokenException": _AUTH,
    "IncompleteSignature": _AUTH,
    "MissingAuthenticationTokenException": _AUTH,
}
_BY_STATUS = {400: "invalid_request_error", 403: "permission_error", 404: "not_found_error", 429: "rate_limit_error"}


_TOO_LONG = "too long"  # "Input is too long for requested model." / "prompt is too long: ..."


def error_type(headers: Mapping[str, str]) -> str:
    # "ThrottlingException:http://internal.amazon.com/coral/com.amazon.bedrock/"
    return headers.get("x-amzn-errortype", "").split(":", 1)[0]


class Bedrock:
    kind = "bedrock"

    def __init__(self, name: str, up: UpstreamConfig) -> None:
        self.name = name
        self.region = up.region
        self.base = up.base_url or f"https://bedrock-runtime.{up.region}.amazonaws.com"
        self.credential: CredentialCache[ReadOnlyCredentials] | None = aws_credentials(up.aws_profile)

    async def prepare(self, path_qs: str, body: bytes, headers: CIMultiDict[str]) -> tuple[URL, bytes]:
        if path_qs.split("?", 1)[0] != "/v1/messages":
            raise not_served(self.name, self.kind, path_qs.split("?", 1)[0])
        assert self.credential is not None
        creds = await credential(self.name, self.credential)
        doc = json_doc(body)
        model = str(doc.pop("model", ""))
        stream = doc.pop("stream", False) is True
        doc.setdefault("anthropic_version", ANTHROPIC_VERSION)
        betas_to_body(doc, headers)
        data = orjson.dumps(doc)
        url = f"{self.base}/model/{quote(model, safe='')}/{'invoke-with-response-stream' if stream else 'invoke'}"
        signed = {
            "content-type": "application/json",
            "accept": "application/vnd.amazon.eventstream" if stream else "application/json",
        }
        headers.update(signed)
        headers.update(sigv4_headers(creds, "bedrock", self.region, url, data, signed))
        return URL(url, encoded=True), data

    def upstream_status(self, status: int, headers: Mapping[str, str]) -> int:
        if status < 400:
            return status
        spec = ERRORS.get(error_type(headers))
        return spec[0] if spec else status

    def error_body(self, status: int, headers: Mapping[str, str], body: bytes) -> tuple[int, bytes]:
        code = error_type(headers)
        message = aws_error_message(body)
        spec = ERRORS.get(code)
        client_status, etype = (spec[1], spec[2]) if spec else (status, _BY_STATUS.get(status, "api_error"))
        text = f"Bedrock {code}: {message}" if code else (message or f"Bedrock answered {status}")
        if code == "ValidationException" and _TOO_LONG in message.lower():
            # Anthropic's own words, so that context_fallback_models applies as for the native API.
            text = f"prompt is too long ({text})"
        return anthropic_error(client_status, etype, text)

    def stream_reader(self, resp: LeanResponse) -> Reader | None:
        if not resp.headers.get("content-type", "").startswith("application/vnd.amazon.eventstream"):
            return None
        return functools.partial(EventStreamToSSE().read_from, resp.content.readany)
