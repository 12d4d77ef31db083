"""The console's login session: the access token stays in the page's memory, the
refresh token in an HttpOnly, SameSite=Strict cookie scoped to ``/auth``.

``POST /auth/session`` logs in (same checks, throttling and audit as
``/auth/login``) and answers the access token without the refresh token,
which goes into the cookie.  ``/auth/session/refresh`` rotates it and
``/auth/session/logout`` revokes it.  Cross-site request forgery: SameSite
keeps the cookie off other sites' requests; both cookie endpoints also need
the ``x-gateway-csrf`` header (a cross-origin page cannot send it without a
CORS preflight, which the gateway never grants) and, when the browser sends
an ``Origin``, one that names this host.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web
from yarl import URL

from gateway import keys
from gateway.auth import handlers as auth
from gateway.auth.responses import api_error, json_response
from gateway.console.headers import SECURITY_HEADERS

COOKIE = "gw_refresh"
COOKIE_PATH = "/auth"
CSRF_HEADER = "x-gateway-csrf"


def _same_origin(request: web.Request) -> None:
    if not request.headers.get(CSRF_HEADER):
        raise api_error(403, "forbidden", f"The console's session endpoints need the {CSRF_HEADER} header.")
    origin = request.headers.get("origin")
    if origin is None:
        return
    try:
        host = URL(origin).authority
    except ValueError:
        host = ""
    if not host or host != request.host:
        raise api_error(403, "forbidden", "Cross-origin request refused.")


def _with_cookie(request: web.Request, resp: web.Response, *, keep: bool) -> web.Response:
    """The token answer without the refresh token, which goes to the cookie instead (``keep``),
    or the logout answer clearing the cookie."""
    out: web.Response
    if not keep:
        out = resp
        out.del_cookie(COOKIE, path=COOKIE_PATH)
    else:
        doc: dict[str, Any] = orjson.loads(resp.body)  # type: ignore[arg-type]
        refresh = doc.pop("refresh_token")
        out = json_response(doc)
        out.set_cookie(
            COOKIE, refresh, path=COOKIE_PATH, httponly=True, samesite="Strict",
            secure=request.app[keys.CONFIG].console.secure_cookie,
            max_age=request.app[keys.AUTH].cfg.refresh_token_seconds,
        )
    out.headers.update(SECURITY_HEADERS)
    out.headers["Cache-Control"] = "no-store"
    return out


async def login(request: web.Request) -> web.Response:
    _same_origin(request)
    resp = await auth.login(request)
    return _with_cookie(request, resp, keep=True)


async def refresh(request: web.Request) -> web.Response:
    _same_origin(request)
    token = request.cookies.get(COOKIE)
    if not token:
        raise api_error(401, "invalid_refresh_token", "No console session: log in.")
    try:
        resp = await auth.refresh_with(request, token)
    except web.HTTPUnauthorized as exc:
        exc.del_cookie(COOKIE, path=COOKIE_PATH)  # a dead token: forget it
        exc.headers.update(SECURITY_HEADERS)
        raise
    return _with_cookie(request, resp, keep=True)


async def logout(request: web.Request) -> web.Response:
    _same_origin(request)
    token = request.cookies.get(COOKIE)
    resp = await auth.logout_with(request, token, check_bearer=False) if token else web.Response(status=204)
    return _with_cookie(request, resp, keep=False)


def setup(app: web.Application) -> None:
    app.router.add_post("/auth/session", login)
    app.router.add_post("/auth/session/refresh", refresh)
    app.router.add_post("/auth/session/logout", logout)
