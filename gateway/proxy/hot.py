"""What every proxied request uses, looked up once after start-up.

``request.app`` and each ``app[key]`` are a Python call apiece; a request
used about fifteen of them.  The bundle is bound by the last start-up hook
(after every cleanup context, tracing's wrapped admitter included) and read
with one lookup per request.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web

from gateway import keys

if TYPE_CHECKING:
    from gateway.accounting.pricing import PriceTable
    from gateway.accounting.sink import UsageSink
    from gateway.accounting.tags import TagPolicy
    from gateway.policy.admit import Admitter
    from gateway.policy.principals import PrincipalResolver
    from gateway.proxy.fairshare import FairShare
    from gateway.proxy.headers import HeaderPolicy
    from gateway.proxy.routing import Router


@dataclass(slots=True)
class Hot:
    resolver: PrincipalResolver
    router: Router
    prices: PriceTable
    admitter: Admitter
    client: Any  # the upstream client session
    header_policy: HeaderPolicy
    fair_share: FairShare
    tags: TagPolicy
    usage: UsageSink
    usage_on_line: bool  # the usage record is written on the request's log line (standalone)
    max_body_bytes: int


HOT: web.AppKey[Hot] = web.AppKey("hot")


async def bind(app: web.Application) -> None:
    """The last on_startup hook: every service exists by now."""
    usage = app[keys.USAGE]
    app[HOT] = Hot(
        resolver=app[keys.RESOLVER],
        router=app[keys.ROUTER],
        prices=app[keys.PRICES],
        admitter=app[keys.ADMITTER],
        client=app[keys.CLIENT],
        header_policy=app[keys.HEADER_POLICY],
        fair_share=app[keys.FAIR_SHARE],
        tags=app[keys.TAGS],
        usage=usage,
        usage_on_line=bool(getattr(usage, "on_request_line", False)),
        max_body_bytes=app[keys.CONFIG].server.max_body_bytes,
    )
