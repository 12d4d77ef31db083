"""Upstream errors in the client's dialect, so that each SDK raises the right exception.

Status: the same, except "overloaded" (Anthropic 529 <-> OpenAI 503), which
each SDK knows under its own number.  The error type follows the status
(an OpenAI-compatible server's ``type`` strings vary); the message is kept.
"""

from __future__ import annotations

from typing import Any

import orjson

_ANTHROPIC_TYPE_OF_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}

# Anthropic error type -> OpenAI (type, code)
_OPENAI_OF_ANTHROPIC = {
    "invalid_request_error": ("invalid_request_error", "invalid_request"),
    "authentication_error": ("invalid_request_error", "invalid_api_key"),
    "permission_error": ("invalid_request_error", "permission_denied"),
    "not_found_error": ("invalid_request_error", "not_found"),
    "request_too_large": ("invalid_request_error", "request_too_large"),
    "rate_limit_error": ("rate_limit_error", "rate_limit_exceeded"),
    "api_error": ("server_error", "upstream_error"),
    "overloaded_error": ("server_error", "service_unavailable"),
    "timeout_error": ("server_error", "upstream_timeout"),
}


def anthropic_status(status: int) -> int:
    """The status an Anthropic client gets for an OpenAI upstream's status."""
    return 529 if status == 503 else status


def openai_status(status: int) -> int:
    """The status an OpenAI client gets for an Anthropic upstream's status."""
    return 503 if status == 529 else status


def _loads(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return None


def openai_error_of_anthropic(doc: Any, status: int = 0) -> dict[str, Any]:
    err = doc.get("error") if isinstance(doc, dict) else None
    etype = err.get("type") if isinstance(err, dict) else None
    if not isinstance(etype, str):
        etype = _ANTHROPIC_TYPE_OF_STATUS.get(status, "api_error")
    message = err.get("message") if isinstance(err, dict) else None
    otype, code = _OPENAI_OF_ANTHROPIC.get(etype, ("server_error", "upstream_error"))
    if isinstance(message, str) and message.startswith("prompt is too long"):
        code = "context_length_exceeded"
    return {"error": {"message": message if isinstance(message, str) else f"upstream error {status}", "type": otype, "param": None, "code": code}}


def anthropic_error_of_openai(doc: Any, status: int) -> dict[str, Any]:
    err = doc.get("error") if isinstance(doc, dict) else None
    message = err.get("message") if isinstance(err, dict) else None
    if not isinstance(message, str):
        message = f"upstream error {status}"
    if isinstance(err, dict) and err.get("code") == "context_length_exceeded" and not message.startswith("prompt is too long"):
        message = "prompt is too long: " + message
    etype = _ANTHROPIC_TYPE_OF_STATUS.get(status) or ("api_error" if status >= 500 or not status else "invalid_request_error")
    if not status and isinstance(err, dict) and err.get("type") == "rate_limit_error":
        etype = "rate_limit_error"
    return {"type": "error", "error": {"type": etype, "message": message}}


def error_body_for_openai(status: int, body: bytes) -> tuple[int, bytes]:
    """An Anthropic upstream's error answer, for an OpenAI client."""
    return openai_status(status), orjson.dumps(openai_error_of_anthropic(_loads(body), status))


def error_body_for_anthropic(status: int, body: bytes) -> tuple[int, bytes]:
    """An OpenAI upstream's error answer, for an Anthropic client."""
    return anthropic_status(status), orjson.dumps(anthropic_error_of_openai(_loads(body), status))
