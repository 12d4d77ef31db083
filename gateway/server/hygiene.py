"""Headers every answer gets (or loses) on its way out.

- No ``Server`` header anywhere: it names the exact aiohttp and Python
  versions, which helps nobody but a scanner.
- Control-plane answers (``/auth``, ``/admin``, ``/me``) carry tokens, keys
  shown once, user data: ``Cache-Control: no-store`` keeps them out of every
  cache, ``X-Content-Type-Options: nosniff`` keeps a browser from reading
  JSON as anything else.
"""

from __future__ import annotations

from aiohttp import web
from aiohttp.web_request import BaseRequest
from multidict import CIMultiDict

SECRET_PREFIXES = ("/auth/", "/admin/", "/me/")
SECRET_EXACT = frozenset({"/admin", "/me"})
NO_STORE = "no-store"
NOSNIFF = "nosniff"


# Applied by the application's one on_response_prepare hook (gateway/app.py): aiohttp
# sets its ``Server`` default before that signal runs, so it can be removed there.


def carries_secrets(path: str) -> bool:
    return path.startswith(SECRET_PREFIXES) or path in SECRET_EXACT


class PrepareHook:
    """The application's one ``on_response_prepare`` hook (a signal handler is a call per answer):
    hygiene's headers, and a draining worker answers ``Connection: close`` so that no client reuses a
    connection it is closing.  gateway/server/response.py applies it inline (``apply``)."""

    __slots__ = ("draining",)

    def __init__(self, draining: list[bool]) -> None:
        self.draining = draining  # set by the worker when it drains

    async def __call__(self, request: BaseRequest, response: web.StreamResponse) -> None:
        response.headers.popall("Server", None)
        self.apply(request.path, response.headers, response)

    def apply(self, path: str, h: CIMultiDict[str], response: web.StreamResponse) -> bool:
        """Set the answer's headers for ``path`` (decoded, no query); True when the worker is draining."""
        if path.startswith(SECRET_PREFIXES) or path in SECRET_EXACT:  # carries_secrets, inlined
            h["Cache-Control"] = NO_STORE
            h["X-Content-Type-Options"] = NOSNIFF
        if self.draining[0]:
            response.force_close()
            h["Connection"] = "close"
            return True
        return False


class BareResponse(web.Response):
    """A response made outside the application (the protocol's own error answers):
    no app signal runs for it, so it drops the ``Server`` default itself."""

    async def _prepare_headers(self) -> None:
        await super()._prepare_headers()
        self.headers.popall("Server", None)
        self.headers["X-Content-Type-Options"] = NOSNIFF
        self.headers["Cache-Control"] = NO_STORE
