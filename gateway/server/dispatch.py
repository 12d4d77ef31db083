"""The data plane's exact paths, dispatched without aiohttp's per-request routing.

For every request aiohttp resolves the route (two resolver calls, a new
match-info object, its app stack frozen), then runs the middleware chain,
which always ends in aiohttp's own ``_fix_request_current_app`` layer: about
twenty Python calls, and two more coroutine frames that every ``await`` of the
request resumes (each upstream read of a stream among them).

A data-plane request whose target is exactly one of its paths (no query
string, no ``/ak/{key}`` prefix, no ``Expect`` header) needs none of that: its
route is known from the request line.  It gets the route's match-info, built
once and frozen (nothing in it is per request: no path parameters), and goes
straight to the gateway's middleware.  Everything else (other paths, a query
string, ``Expect: 100-continue``, an unknown path, a wrong method) takes
aiohttp's own ``Application._handle``, unchanged.

The fast dispatch is only used when the gateway's middleware is the
application's only one: with tracing on, its middleware is outermost, and
every request takes aiohttp's path.

A request dispatched directly also runs in its connection's own task, not in
a task of its own (server/inline.py), where aiohttp's internals allow it:
the connection's loop asks ``direct_dispatch``'s function first.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import hdrs, web
from aiohttp.web_request import BaseRequest
from aiohttp.web_urldispatcher import PlainResource, UrlMappingMatchInfo

from gateway import keys

Dispatch = Callable[[BaseRequest], Awaitable[web.StreamResponse]]
Direct = Callable[[BaseRequest], Awaitable[web.StreamResponse] | None]


def direct_dispatch(app: web.Application) -> Direct | None:
    """The app's ``FAST_PATHS``: a request's coroutine, straight into the gateway's middleware, or None.

    None instead of a function when the fast dispatch is off (tracing on).
    """
    middleware = app.get(keys.MIDDLEWARE)
    if middleware is None or list(app.middlewares) != [middleware]:
        return None  # another middleware (tracing) must see every request
    wanted = app.get(keys.FAST_PATHS, frozenset())
    table: dict[str, tuple[str, UrlMappingMatchInfo, Any]] = {}  # path -> its one method, match-info, handler
    for resource in app.router.resources():
        if not isinstance(resource, PlainResource) or resource.canonical not in wanted:
            continue
        routes = list(resource)
        if len(routes) != 1:
            continue  # a path of several methods: aiohttp's to dispatch (the data plane has none)
        route = routes[0]
        info = UrlMappingMatchInfo({}, route)
        info.add_app(app)
        info.freeze()  # shared by every request of this route: nothing in it changes
        table[resource.canonical] = (route.method, info, route.handler)
    if not table:
        return None
    expect = hdrs.EXPECT

    def direct(request: BaseRequest) -> Awaitable[web.StreamResponse] | None:
        # Not a coroutine: the request's coroutine is the middleware's own (one frame fewer).
        message = request._message
        hit = table.get(message.path)  # the raw target: a query string makes it miss
        if hit is not None and hit[0] == message.method and expect not in message.headers:
            request._match_info = hit[1]  # type: ignore[attr-defined]  # a web.Request: the app made it
            return middleware(request, hit[2], True)  # type: ignore[no-any-return]
        return None

    return direct


def fast_dispatch(app: web.Application, direct: Direct | None) -> Dispatch:
    """The server's request handler: ``direct``'s requests dispatched directly, the rest by aiohttp.

    Under server/inline.py's loop it only sees the requests ``direct`` did not take.
    """
    slow: Dispatch = app._handle  # type: ignore[assignment]  # takes aiohttp's Request
    if direct is None:
        return slow

    def dispatch(request: BaseRequest) -> Awaitable[web.StreamResponse]:
        taken = direct(request)
        return slow(request) if taken is None else taken

    return dispatch
