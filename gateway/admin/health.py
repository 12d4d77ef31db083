"""GET /admin/health: what an operator's health page shows, from data the gateway already has.

- the readiness checks (Postgres, Redis, upstream circuits) of ``/readyz``;
- the metrics every worker shares (``/metrics``): live workers, requests in
  flight, degraded dependencies, circuit states, requests by status class;
- recent error rates: the usage ledger's last hour in 5-minute buckets
  (an index range scan on ``ts``).
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any

from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from gateway import keys
from gateway.admin.common import connect
from gateway.auth.guard import require_admin
from gateway.auth.responses import json_response

_RECENT = (
    "SELECT to_timestamp(floor(extract(epoch FROM ts) / 300) * 300) AS bucket, count(*) AS requests, "
    "count(*) FILTER (WHERE status >= 500) AS server_errors, "
    "count(*) FILTER (WHERE status >= 400 AND status < 500) AS client_errors, "
    "count(*) FILTER (WHERE partial) AS partial "
    "FROM usage_ledger WHERE ts >= now() - interval '1 hour' GROUP BY 1 ORDER BY 1"
)


def summarize_metrics(text: str) -> dict[str, Any]:
    """The few figures of a Prometheus scrape that the health page shows."""
    out: dict[str, Any] = {"workers": 0, "in_flight": 0, "degraded": {}, "circuits": {},
                           "requests_by_status": {}}
    circuits: dict[str, dict[str, float]] = defaultdict(dict)
    by_status: dict[str, float] = defaultdict(float)
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "gateway_workers":
                out["workers"] = int(s.value)
            elif s.name == "gateway_requests_in_flight":
                out["in_flight"] = int(s.value)
            elif s.name == "gateway_dependency_degraded":
                out["degraded"][s.labels["dependency"]] = int(s.value)
            elif s.name == "gateway_circuit_state":
                circuits[s.labels["upstream"]][s.labels["state"]] = s.value
            elif s.name == "gateway_requests_total":
                by_status[s.labels["status"][:1] + "xx"] += s.value
    out["circuits"] = {up: max(states, key=lambda k: states[k]) for up, states in circuits.items()}
    out["requests_by_status"] = {k: int(v) for k, v in sorted(by_status.items())}
    return out


async def health(request: web.Request) -> web.Response:
    await require_admin(request)
    app = request.app
    checks = await app[keys.READINESS].check(app)
    metrics = app[keys.METRICS]
    metrics.refresh(app)
    text = (await asyncio.get_running_loop().run_in_executor(None, metrics.render)).decode()
    recent: list[dict[str, Any]] = []
    if app.get(keys.PG) is not None and checks["postgres"]["status"] == "ok":
        async with connect(request) as conn:
            for r in await conn.fetch(_RECENT, timeout=5.0):
                n = int(r["requests"])
                recent.append({
                    "bucket": r["bucket"].isoformat(), "requests": n, "server_errors": r["server_errors"],
                    "client_errors": r["client_errors"], "partial": r["partial"],
                    "error_rate": r["server_errors"] / n if n else 0.0,
                })
    return json_response({
        "status": "draining" if app[keys.DRAINING][0] else
                  ("ready" if all(c["status"] != "down" for c in checks.values()) else "unready"),
        "checks": checks,
        "metrics": summarize_metrics(text),
        "recent": recent,
    })

