"""Control-plane JSON: one error body shape, raised as aiohttp HTTP exceptions.

Every control-plane error is ``{"error": {"code": C, "message": M}}`` (plus
``"field"`` when one input field is at fault).  Raising web.HTTPException
subclasses lets any handler (also the usage endpoints) use them unchanged.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from gateway.errors import retry_headers
from gateway.server import body as body_codec

_CLASSES: dict[int, type[web.HTTPException]] = {
    400: web.HTTPBadRequest,
    401: web.HTTPUnauthorized,
    403: web.HTTPForbidden,
    404: web.HTTPNotFound,
    409: web.HTTPConflict,
    413: web.HTTPRequestEntityTooLarge,
    415: web.HTTPUnsupportedMediaType,
    429: web.HTTPTooManyRequests,
    503: web.HTTPServiceUnavailable,
}

MAX_BODY = 64 * 1024


def error_body(code: str, message: str, field: str | None = None) -> bytes:
    """The control plane's error shape (also used for its unknown paths and methods)."""
    err: dict[str, Any] = {"code": code, "message": message}
    if field is not None:
        err["field"] = field
    return orjson.dumps({"error": err})


def api_error(status: int, code: str, message: str, *, field: str | None = None,
              headers: dict[str, str] | None = None, retry_after_s: float | None = None) -> web.HTTPException:
    hdrs = dict(headers or {})
    if retry_after_s is not None:
        hdrs.update(retry_headers(retry_after_s))
    text = error_body(code, message, field).decode()
    cls = _CLASSES[status]
    if cls is web.HTTPRequestEntityTooLarge:
        return web.HTTPRequestEntityTooLarge(MAX_BODY, 0, text=text, content_type="application/json", headers=hdrs)
    return cls(text=text, content_type="application/json", headers=hdrs)


def bad_request(message: str, field: str | None = None, code: str = "invalid_request") -> web.HTTPException:
    return api_error(400, code, message, field=field)


def not_found(what: str) -> web.HTTPException:
    return api_error(404, "not_found", f"{what} not found.")


def unavailable(message: str = "The database is unavailable; retry shortly.") -> web.HTTPException:
    return api_error(503, "unavailable", message, retry_after_s=1.0)


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(data), content_type="application/json")


async def read_json_object(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object, or a clear 400/413/415."""
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise api_error(413, "request_too_large", f"Request body is larger than {MAX_BODY} bytes.")
    ctype = request.content_type
    if ctype not in ("application/json", "application/octet-stream", ""):
        raise api_error(415, "unsupported_media_type", "Send a JSON body (content-type: application/json).")
    try:
        raw = body_codec.decode(
            await body_codec.read_limited(request.content, MAX_BODY), request.headers.get("content-encoding"), MAX_BODY
        )
    except body_codec.TooLarge:
        raise api_error(413, "request_too_large", f"Request body is larger than {MAX_BODY} bytes.") from None
    except body_codec.UnsupportedEncoding as exc:
        raise api_error(415, "unsupported_content_encoding", str(exc)) from None
    except body_codec.BodyError as exc:
        raise bad_request(str(exc)) from None
    try:
        doc = orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        raise bad_request("Request body is not valid JSON.") from None
    if not isinstance(doc, dict):
        raise bad_request("Request body must be a JSON object.")
    if b"\\u0000" in raw and _has_nul(doc):
        # Postgres text cannot hold NUL: refused here, once for every control-plane field.
        raise bad_request("Text must not contain NUL (\\u0000) characters.")
    return doc


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    return False


def query_error(query_string: str) -> web.HTTPException | None:
    """A control-plane query string that no parameter can use: NUL or other control characters."""
    if any(c < " " or c == "\x7f" for c in query_string):
        return bad_request("The query string must not contain control characters (such as %00).")
    return None
