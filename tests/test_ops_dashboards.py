"""The Grafana dashboard and the Prometheus alerting rules under config/ query only metrics (and label
values) that a real ``llm-gateway serve`` exposes on /metrics."""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path

import aiohttp
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import gateway_toml
from tests.fixtures.control_plane import ADMIN, ADMIN_TOKEN, JWT_SECRET, PASSWORD

CONFIG = Path(__file__).resolve().parents[1] / "config"
DASHBOARD = CONFIG / "grafana" / "llm-gateway-dashboard.json"
ALERTS = CONFIG / "prometheus" / "llm-gateway-alerts.yml"
REQUIRED_ALERTS = {"GatewayHighErrorRate", "GatewayAddedLatencyHigh", "GatewayCircuitOpen", "GatewayRedisDegraded",
                   "GatewayPostgresDegraded", "GatewayBudgetNearExhaustion", "GatewayWorkerRestarts"}

METRIC = re.compile(r"\b(gateway_[a-z0-9_]+)\b")
SELECTOR = re.compile(r"\b(gateway_[a-z0-9_]+)\{([^}]*)\}")
EQUALS = re.compile(r'([a-z_]+)\s*=\s*"([^"]*)"')


def dashboard_queries() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    out = [t["expr"] for p in doc["panels"] for t in p.get("targets", [])]
    out += [v["query"] for v in doc["templating"]["list"] if v["type"] == "query"]
    return out


def alert_queries() -> list[str]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [r["expr"] for g in doc["groups"] for r in g["rules"]]


def test_alert_rules_are_well_formed():
    """Every rule has a name, an expression, a severity and a summary; the issue's alerts are all there."""
    doc = yaml.safe_load(ALERTS.read_text())
    rules = [r for g in doc["groups"] for r in g["rules"]]
    assert REQUIRED_ALERTS <= {r["alert"] for r in rules}
    for r in rules:
        assert r["expr"].strip() and r["labels"]["severity"] in ("page", "warn", "info"), r["alert"]
        assert r["annotations"]["summary"], r["alert"]
    doc = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids)) and len(ids) >= 10


async def _scrape(base: str) -> dict[str, set[tuple[tuple[str, str], ...]]]:
    """Sample name -> the label sets it was seen with."""
    async with aiohttp.ClientSession() as s, s.get(base + "/metrics") as r:
        text = await r.text()
    out: dict[str, set[tuple[tuple[str, str], ...]]] = {}
    for fam in text_string_to_metric_families(text):
        for sample in fam.samples:
            out.setdefault(sample.name, set()).add(tuple(sorted(sample.labels.items())))
    return out


def _missing(scrape: dict[str, set[tuple[tuple[str, str], ...]]], queries: list[str]) -> list[str]:
    missing = []
    for q in queries:
        for name in METRIC.findall(q):
            if name not in scrape:
                missing.append(name)
        for name, matchers in SELECTOR.findall(q):
            for label, value in EQUALS.findall(matchers):
                if label == "instance" or name not in scrape:
                    continue
                if not any((label, value) in labels for labels in scrape[name]):
                    missing.append(f'{name}{{{label}="{value}"}}')
    return sorted(set(missing))


async def test_every_queried_metric_exists_in_a_real_scrape(serve, pg_env, redis_url, mock_upstream):
    """Run serve (database + Redis), send plain and streamed requests with a database key that has a
    budget, then scrape: every metric and label value the dashboard and the alerts use is there."""
    env = {"GATEWAY_DATABASE_URL": pg_env, "GATEWAY_REDIS_URL": redis_url, "GATEWAY_JWT_SECRET": JWT_SECRET,
           "GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN}
    proc = serve(gateway_toml(mock_upstream.base_url), workers=1, env=env)
    base = proc.base_url
    async with aiohttp.ClientSession(base_url=base) as http:
        r = await http.post("/admin/users", headers=ADMIN, json={"email": "m@example.com", "password": PASSWORD})
        user = await r.json()
        r = await http.post("/admin/keys", headers=ADMIN,
                            json={"user_id": user["id"], "limits": {"budget_usd": 5, "budget_period": "day"}})
        key = (await r.json())["key"]
        headers = {"x-api-key": key, "anthropic-version": "2023-06-01"}
        for stream in (False, True):
            body = {"model": "demo-claude", "max_tokens": 5, "stream": stream,
                    "messages": [{"role": "user", "content": "hi"}]}
            async with http.post("/v1/messages", headers=headers, json=body) as resp:
                assert 200 == resp.status
                await resp.read()
    queries = dashboard_queries() + alert_queries()
    deadline = time.monotonic() + 20
    while True:  # counters are flushed every second; the ledger writer commits in batches
        missing = _missing(await _scrape(base), queries)
        if not missing or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert [] == missing
