"""The closed vocabulary of errors the gateway itself produces.

One place maps each kind to its HTTP status, its Anthropic and OpenAI
envelope, its extra headers and its metric label (DESIGN.md's error table).
Kinds are grouped by who failed: the caller, policy, the provider, the gateway.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import orjson
from aiohttp import web
from multidict import CIMultiDict

from gateway.server.response import WholeResponse

Dialect = str  # "anthropic" | "openai"
ANTHROPIC = "anthropic"
OPENAI = "openai"
RESPONSES = "responses"  # OpenAI's Responses API: OpenAI's envelope, its own stream error event


@dataclass(frozen=True, slots=True)
class _Spec:
    status: int
    anthropic_type: str
    openai_type: str
    openai_code: str
    owner: str  # caller | policy | provider | gateway
    no_retry: bool = False
    retry_after: bool = False


class ErrorKind(enum.Enum):
    AUTHENTICATION = _Spec(401, "authentication_error", "invalid_request_error", "invalid_api_key", "caller", no_retry=True)
    PERMISSION = _Spec(403, "permission_error", "invalid_request_error", "permission_denied", "policy", no_retry=True)
    INVALID_REQUEST = _Spec(400, "invalid_request_error", "invalid_request_error", "invalid_request", "caller")
    TOO_LARGE = _Spec(413, "request_too_large", "invalid_request_error", "request_too_large", "caller")
    NOT_FOUND = _Spec(404, "not_found_error", "invalid_request_error", "model_not_found", "caller")
    RATE_LIMITED = _Spec(429, "rate_limit_error", "rate_limit_error", "rate_limit_exceeded", "policy", retry_after=True)
    BUDGET_EXCEEDED = _Spec(429, "rate_limit_error", "insufficient_quota", "budget_exceeded", "policy", no_retry=True)
    UPSTREAM_ERROR = _Spec(502, "api_error", "server_error", "upstream_error", "provider")
    UNAVAILABLE = _Spec(503, "overloaded_error", "server_error", "service_unavailable", "gateway", retry_after=True)
    UPSTREAM_TIMEOUT = _Spec(504, "timeout_error", "server_error", "upstream_timeout", "provider")
    # Not in DESIGN.md's table: a path or method the gateway does not serve
    # (answered in the path's dialect instead of aiohttp's plain text) ...
    UNKNOWN_PATH = _Spec(404, "not_found_error", "invalid_request_error", "not_found", "caller")
    METHOD_NOT_ALLOWED = _Spec(405, "invalid_request_error", "invalid_request_error", "method_not_allowed", "caller")
    # A request body in a content-encoding other than gzip, deflate or identity (415, RFC 9110 15.5.16).
    UNSUPPORTED_ENCODING = _Spec(
        415, "invalid_request_error", "invalid_request_error", "unsupported_content_encoding", "caller"
    )
    # ... and a bug of ours, still answered in the dialect's shape.
    INTERNAL = _Spec(500, "api_error", "server_error", "internal_error", "gateway")

    @property
    def spec(self) -> _Spec:
        return self.value  # type: ignore[no-any-return]

    @property
    def label(self) -> str:
        """The metric label: stable, lowercase, never user input."""
        return self.name.lower()

    def status_for(self, dialect: Dialect) -> int:
        # Anthropic speaks 529 for "overloaded"; OpenAI SDKs expect 503.
        if self is ErrorKind.UNAVAILABLE and dialect == ANTHROPIC:
            return 529
        return self.spec.status


class GatewayError(Exception):
    """Raised anywhere on the request path; rendered once by ``render``."""

    def __init__(
        self,
        kind: ErrorKind,
        message: str,
        *,
        retry_after_s: float | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.retry_after_s = retry_after_s
        self.headers = headers or {}


def envelope(kind: ErrorKind, message: str, dialect: Dialect) -> bytes:
    spec = kind.spec
    if dialect == ANTHROPIC:
        return orjson.dumps({"type": "error", "error": {"type": spec.anthropic_type, "message": message}})
    return orjson.dumps(
        {"error": {"message": message, "type": spec.openai_type, "param": None, "code": spec.openai_code}}
    )


def retry_headers(seconds: float) -> dict[str, str]:
    """``retry-after`` in whole seconds (1..60) and ``retry-after-ms``, capped alike.

    The SDKs ignore hints above 60 s and fall back to their own backoff, so a
    longer wait is advertised as 60 s: they come back then and ask again.
    """
    seconds = min(60.0, max(0.0, seconds))
    whole = max(1, math.ceil(seconds))
    return {"retry-after": str(whole), "retry-after-ms": str(max(1, round(seconds * 1000)))}


def render(err: GatewayError, dialect: Dialect) -> web.Response:
    spec = err.kind.spec
    headers: dict[str, str] = {"content-type": "application/json"}
    if spec.no_retry:
        headers["x-should-retry"] = "false"
    if spec.retry_after:
        headers.update(retry_headers(err.retry_after_s if err.retry_after_s is not None else 1.0))
    headers.update(err.headers)
    # A refusal can come in floods (a client past its limit): written like a relayed answer, in one go.
    return WholeResponse(err.kind.status_for(dialect), envelope(err.kind, err.message, dialect), CIMultiDict(headers))


def stream_error_event(kind: ErrorKind, message: str, dialect: Dialect) -> bytes:
    """The dialect's in-stream error: never a terminal success event."""
    body = envelope(kind, message, dialect)
    if dialect == ANTHROPIC:
        return b"event: error\ndata: " + body + b"\n\n"
    if dialect == RESPONSES:
        # The Responses API's error event (type, code, message), with OpenAI's envelope
        # alongside so that the openai SDK raises its APIError as for chat.
        spec = kind.spec
        doc = {"type": "error", "code": spec.openai_code, "message": message, "param": None,
               "error": {"message": message, "type": spec.openai_type, "param": None, "code": spec.openai_code}}
        return b"event: error\ndata: " + orjson.dumps(doc) + b"\n\n"
    return b"data: " + body + b"\n\n"
