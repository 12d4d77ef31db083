"""The cloud kinds in a real ``llm-gateway serve`` (2 workers, debug logging): the official SDKs get
JSON, streams and errors from each, usage is recorded and priced by the served model, and no
credential -- AWS secret or session token, Azure key, Google access token or private key -- appears
in its logs, its error bodies or /metrics, also when requests fail."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import orjson
import pytest

from tests.conftest import TEST_KEY
from tests.fixtures.clouds import AWS_SECRET, AWS_TOKEN, BEDROCK_MODEL, cloud_toml

pytestmark = pytest.mark.slow

AV = {"x-api-key": TEST_KEY, "anthropic-version": "2023-06-01"}
OAI = {"authorization": f"Bearer {TEST_KEY}"}
MESSAGES: list[Any] = [{"role": "user", "content": "hello clouds"}]


async def test_no_credential_in_logs_errors_or_metrics(serve: Any, bedrock: Any, azure: Any, vertex: Any,
                                                       aws_keys: None, tmp_path: Path) -> None:
    bfake, burl = bedrock
    afake, aurl = azure
    vfake, vurl, creds = vertex
    ups = f"""
[upstreams.bedrock]
provider = "bedrock"
region = "us-east-1"
base_url = "{burl}"
retries = 0

[upstreams.azure]
provider = "azure-openai"
base_url = "{aurl}"
deployment = "gpt-4o-prod"
api_version = "2024-10-21"
api_key_env = "AZURE_TEST_KEY"
retries = 0

[upstreams.vertex]
provider = "vertex"
project = "test-project"
region = "us-east5"
base_url = "{vurl}"
credentials_file = "{creds}"
retries = 0
"""
    routes = f"""
[[routes]]
match = "claude-bedrock"
deployments = [{{ upstream = "bedrock", model = "{BEDROCK_MODEL}" }}]

[[routes]]
match = "claude-vertex"
deployments = [{{ upstream = "vertex", model = "claude-sonnet-4-5@20250929" }}]

[[routes]]
match = "gpt-azure"
deployments = [{{ upstream = "azure", model = "gpt-4o" }}]
"""
    toml = cloud_toml(ups, routes, extra='\n[log]\nlevel = "debug"\n').replace("workers = 1", "workers = 2")
    gw = await asyncio.to_thread(serve, toml, 2)
    async with anthropic.AsyncAnthropic(base_url=gw.base_url, api_key=TEST_KEY, max_retries=0) as claude, \
            openai.AsyncOpenAI(base_url=gw.base_url + "/v1", api_key=TEST_KEY, max_retries=0) as gpt:
        for model in ("claude-bedrock", "claude-vertex"):
            msg = await claude.messages.create(model=model, max_tokens=5, messages=MESSAGES)
            assert "Hello from the cloud fake." == msg.content[0].text  # type: ignore[union-attr]
            async with claude.messages.stream(model=model, max_tokens=5, messages=MESSAGES) as stream:
                assert "Hello from the cloud fake." == "".join([t async for t in stream.text_stream])
        done = await gpt.chat.completions.create(model="gpt-azure", messages=MESSAGES)
        assert "Hello from Azure." == done.choices[0].message.content
        chunks = await gpt.chat.completions.create(model="gpt-azure", messages=MESSAGES, stream=True)
        assert "Hello from Azure." == "".join([c.choices[0].delta.content or "" async for c in chunks if c.choices])
        with pytest.raises(openai.BadRequestError):
            await gpt.chat.completions.create(model="gpt-azure", messages=[{"role": "user", "content": "FILTER-ME"}])
        bfake.faults[:] = ["ValidationException"]
        with pytest.raises(anthropic.BadRequestError):
            await claude.messages.create(model="claude-bedrock", max_tokens=5, messages=MESSAGES)
        vfake.faults[:] = [(429, "RESOURCE_EXHAUSTED")]
        with pytest.raises(anthropic.RateLimitError):
            await claude.messages.create(model="claude-vertex", max_tokens=5, messages=MESSAGES)
    statuses = []
    async with aiohttp.ClientSession() as s:
        calls = [
            ("/v1/messages", AV, {"model": "claude-bedrock", "max_tokens": 5, "messages": MESSAGES}),
            ("/v1/messages", AV, {"model": "claude-bedrock", "max_tokens": 5, "messages": MESSAGES, "stream": True}),
            ("/v1/messages", AV, {"model": "claude-vertex", "max_tokens": 5, "messages": MESSAGES}),
            ("/v1/messages", AV, {"model": "claude-vertex", "max_tokens": 5, "messages": MESSAGES, "stream": True}),
            ("/v1/chat/completions", OAI, {"model": "gpt-azure", "messages": MESSAGES}),
            ("/v1/chat/completions", OAI, {"model": "gpt-azure", "messages": MESSAGES, "stream": True}),
            ("/v1/chat/completions", OAI, {"model": "gpt-azure", "messages": [{"role": "user", "content": "FILTER-ME"}]}),
        ]
        for path, headers, body in calls:
            async with s.post(gw.base_url + path, headers=headers, json=body) as r:
                statuses.append(r.status)
                await r.read()
        # Failures: AWS refuses the signature (the fake no longer knows the key), Vertex the token.
        bfake.credentials.clear()
        vfake.tokens.clear()
        texts = []
        for path, headers, body in (calls[0], calls[2]):
            async with s.post(gw.base_url + path, headers=headers, json=body) as r:
                statuses.append(r.status)
                texts.append(await r.text())
        async with s.get(gw.base_url + "/metrics") as r:
            texts.append(await r.text())
        async with s.get(gw.base_url + "/readyz") as r:
            texts.append(await r.text())
    assert [200, 200, 200, 200, 200, 200, 400, 502, 502] == statuses
    deadline = time.monotonic() + 10
    # One line per request; in standalone mode it carries the usage record ("usage": true).
    while gw.log_text().count('"usage":true') < 9 and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    log = gw.log_text()
    assert 9 <= log.count('"usage":true')
    usage = [orjson.loads(line) for line in log.splitlines() if line.startswith("{") and '"usage":true' in line]
    served = {(u["model"], u["served_model"], u["streamed"]) for u in usage if u["status"] == 200}
    assert {("claude-bedrock", BEDROCK_MODEL, False), ("claude-bedrock", BEDROCK_MODEL, True),
            ("claude-vertex", "claude-sonnet-4-5@20250929", False), ("claude-vertex", "claude-sonnet-4-5@20250929", True),
            ("gpt-azure", "gpt-4o", False), ("gpt-azure", "gpt-4o", True)} <= served
    for u in usage:
        if u["status"] == 200:
            assert u["priced"] and u["cost_pico"] > 0 and u["output_tokens"] > 0, u
    secrets = [AWS_SECRET, AWS_TOKEN, afake.api_key, *vfake.issued_tokens]
    private_key = Path(creds).read_text()
    secrets += private_key.split("\\n")[1:4]  # lines of the PEM body
    assert secrets and all(len(x) > 10 for x in secrets)
    for secret in secrets:
        assert secret not in log
        for text in texts:
            assert secret not in text
