"""/ui: the console's pages and assets, with the security headers on every answer (404s included)."""

from __future__ import annotations

from aiohttp import web

from gateway.console import assets, session
from gateway.console.headers import SECURITY_HEADERS

ASSETS: web.AppKey[dict[str, assets.Asset]] = web.AppKey("console_assets")
_INDEX = "index.html"


def _secured(resp: web.Response, cache: str) -> web.Response:
    resp.headers.update(SECURITY_HEADERS)
    resp.headers["Cache-Control"] = cache
    return resp


def _not_found() -> web.Response:
    return _secured(web.Response(status=404, text="Not found.\n", content_type="text/plain"), "no-store")


def _serve(request: web.Request, name: str, cache: str) -> web.Response:
    asset = request.app[ASSETS].get(name)
    if asset is None:
        return _not_found()
    if request.headers.get("if-none-match") == asset.etag:
        return _secured(web.Response(status=304, headers={"ETag": asset.etag}), cache)
    resp = web.Response(body=asset.body, headers={"Content-Type": asset.content_type, "ETag": asset.etag})
    return _secured(resp, cache)


async def index(request: web.Request) -> web.Response:
    """The single page: every view is rendered by the ES modules it loads."""
    return _serve(request, _INDEX, "no-cache")


async def redirect(request: web.Request) -> web.Response:
    return _secured(web.Response(status=308, headers={"Location": "/ui/"}), "no-store")


async def static(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if ".." in name or name.startswith("/"):
        return _not_found()
    return _serve(request, name, "no-cache")


async def other(request: web.Request) -> web.Response:
    return _not_found()


def setup(app: web.Application, *, enabled: bool) -> None:
    """Mount the console and its cookie session endpoints (nothing when disabled)."""
    if not enabled:
        return
    app[ASSETS] = assets.load()
    session.setup(app)
    r = app.router
    r.add_get("/ui", redirect)
    r.add_get("/ui/", index)
    r.add_get("/ui/static/{name:.+}", static)
    r.add_route("*", "/ui/{tail:.*}", other)  # anything else under /ui: a 404 with the same headers
