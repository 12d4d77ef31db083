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

SECRET_PREFIXES = ("/auth/", "/admin/", "/me/")
SECRET_EXACT = frozenset({"/admin", "/me"})
NO_STORE = "no-store"
NOSNIFF = "nosniff"


# Applied by the application's one on_response_prepare hook (gateway/app.py): aiohttp
# sets its ``Server`` default before that signal runs, so it can be removed there.


def carries_secrets(path: str) -> bool:
    return path.startswith(SECRET_PREFIXES) or path in SECRET_EXACT


class BareResponse(web.Response):
    """A response made outside the application (the protocol's own error answers):
    no app signal runs for it, so it drops the ``Server`` default itself."""

    async def _prepare_headers(self) -> None:
        await super()._prepare_headers()
        self.headers.popall("Server", None)
        self.headers["X-Content-Type-Options"] = NOSNIFF
        self.headers["Cache-Control"] = NO_STORE
