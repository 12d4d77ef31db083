"""provider = "azure-openai": the openai SDK -> gateway -> an Azure OpenAI fake.

The fake checks Azure's URL shape, api-version and api-key (or an Entra ID
bearer token), and refuses a prompt with a content-filter 400.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import jwt
import openai
import pytest

from tests.conftest import TEST_KEY
from tests.fixtures.clouds import cloud_toml

OAI = {"authorization": f"Bearer {TEST_KEY}"}
MESSAGES: list[Any] = [{"role": "user", "content": "hi from the azure test"}]
ROUTES = """
[[routes]]
match = "gpt-4o"
deployments = [{ upstream = "azure" }]

[[routes]]
match = "embed-prod"
deployments = [{ upstream = "azure-by-model" }]
"""


def azure_upstream(url: str, name: str = "azure", **fields: str) -> str:
    auth = fields.pop("auth", 'api_key_env = "AZURE_TEST_KEY"')
    extra = "".join(f'{k} = "{v}"\n' for k, v in fields.items())
    return f"""
[upstreams.{name}]
provider = "azure-openai"
base_url = "{url}"
api_version = "2024-10-21"
{auth}
retries = 0
first_byte_timeout = 5
idle_timeout = 2
{extra}"""


def two_upstreams(url: str) -> str:
    return azure_upstream(url, deployment="gpt-4o-prod") + azure_upstream(url, name="azure-by-model")


async def test_chat_completion_goes_to_the_deployment_url_with_api_key(sdk: Any, make_gateway: Any, azure: Any) -> None:
    fake, url = azure
    gw = await make_gateway(cloud_toml(two_upstreams(url), ROUTES))
    done = await sdk.gpt(gw).chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert "Hello from Azure." == done.choices[0].message.content
    assert 4 == done.usage.completion_tokens  # type: ignore[union-attr]
    [seen] = fake.seen
    assert ("/openai/deployments/gpt-4o-prod/chat/completions", {"api-version": "2024-10-21"}, "api-key") == (
        seen["path"], seen["query"], seen["auth"])


async def test_embeddings_use_the_model_as_deployment_when_none_is_set(sdk: Any, make_gateway: Any, azure: Any) -> None:
    fake, url = azure
    gw = await make_gateway(cloud_toml(two_upstreams(url), ROUTES))
    got = await sdk.gpt(gw).embeddings.create(model="embed-prod", input=["a", "b"])
    assert 2 == len(got.data)
    assert "/openai/deployments/embed-prod/embeddings" == fake.seen[0]["path"]


async def test_stream_is_relayed_and_the_usage_chunk_removed(sdk: Any, make_gateway: Any, azure: Any) -> None:
    """The gateway asks Azure for usage (include_usage) and strips the usage chunk the client did not ask for."""
    fake, url = azure
    gw = await make_gateway(cloud_toml(two_upstreams(url), ROUTES))
    r = await gw.post("/v1/chat/completions", headers=OAI, json={"model": "gpt-4o", "messages": MESSAGES, "stream": True})
    raw = await r.read()
    assert 200 == r.status
    assert raw.endswith(b"data: [DONE]\n\n")
    assert b'"usage"' not in raw
    assert fake.seen[0]["body"]["stream_options"] == {"include_usage": True}
    stream = await sdk.gpt(gw).chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert "Hello from Azure." == text


async def test_content_filter_is_relayed_as_the_400_it_is(sdk: Any, make_gateway: Any, azure: Any) -> None:
    """Azure's content-filter refusal reaches the SDK as BadRequestError code content_filter, not retried
    and not failed over."""
    fake, url = azure
    ups = two_upstreams(url) + azure_upstream(url, name="azure-2", deployment="gpt-4o-prod")
    route = ROUTES.replace('deployments = [{ upstream = "azure" }]', 'deployments = [{ upstream = "azure" }]\nfallbacks = ["azure-2"]')
    gw = await make_gateway(cloud_toml(ups, route))
    with pytest.raises(openai.BadRequestError) as err:
        await sdk.gpt(gw, retries=2).chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "FILTER-ME please"}])
    assert 400 == err.value.status_code
    assert "content_filter" == err.value.code
    assert "ResponsibleAIPolicyViolation" == err.value.body["innererror"]["code"]  # type: ignore[index]
    assert 1 == len(fake.seen)


async def test_a_wrong_key_is_the_gateways_502_and_never_relayed(make_gateway: Any, azure: Any,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    fake, url = azure
    monkeypatch.setenv("AZURE_TEST_KEY", "wrong-azure-key")
    gw = await make_gateway(cloud_toml(two_upstreams(url), ROUTES))
    r = await gw.post("/v1/chat/completions", headers=OAI, json={"model": "gpt-4o", "messages": MESSAGES})
    body = await r.json()
    assert 502 == r.status
    assert "upstream_error" == body["error"]["code"]
    assert "wrong-azure-key" not in str(body)


async def test_throttled_azure_fails_over(make_gateway: Any, azure: Any) -> None:
    fake, url = azure
    fake.faults[:] = [429]
    ups = two_upstreams(url) + azure_upstream(url, name="azure-2", deployment="gpt-4o-prod")
    route = ROUTES.replace('deployments = [{ upstream = "azure" }]', 'deployments = [{ upstream = "azure" }]\nfallbacks = ["azure-2"]')
    gw = await make_gateway(cloud_toml(ups, route))
    r = await gw.post("/v1/chat/completions", headers=OAI, json={"model": "gpt-4o", "messages": MESSAGES})
    assert 200 == r.status
    assert 2 == len(fake.seen)


TOKEN_SCRIPT = """
import jwt, pathlib, sys, time
counter = pathlib.Path(sys.argv[1])
n = int(counter.read_text()) + 1 if counter.exists() else 1
counter.write_text(str(n))
life = int(sys.argv[2]) if n == 1 else 3600
print(jwt.encode({"aud": "https://cognitiveservices.azure.com", "exp": int(time.time()) + life, "n": n}, "k" * 32))
"""


async def test_entra_token_command_is_used_and_refreshed_before_expiry(sdk: Any, make_gateway: Any, azure: Any,
                                                                        tmp_path: Path) -> None:
    """token_command prints a JWT living 302 s: renewed 5 min before its exp (2 s later) in the background."""
    fake, url = azure
    script, counter = tmp_path / "entra_token_cmd.py", tmp_path / "count"
    script.write_text(TOKEN_SCRIPT)
    auth = f'token_command = "{sys.executable} {script} {counter} 302"'
    ups = azure_upstream(url, deployment="gpt-4o-prod", auth=auth) + azure_upstream(url, name="azure-by-model")

    class Accept(set[str]):
        def __contains__(self, token: object) -> bool:  # any token the command printed (its n claim)
            try:
                return isinstance(token, str) and jwt.decode(token, "k" * 32, algorithms=["HS256"],
                                                               audience="https://cognitiveservices.azure.com")["n"] >= 1
            except jwt.PyJWTError:
                return False

    fake.tokens = Accept()
    gw = await make_gateway(cloud_toml(ups, ROUTES))
    await sdk.gpt(gw).chat.completions.create(model="gpt-4o", messages=MESSAGES)
    first = fake.seen[-1]["auth"]
    assert first.startswith("bearer:")
    assert 1 == jwt.decode(first[7:], options={"verify_signature": False})["n"]
    deadline = time.monotonic() + 30
    while (not counter.exists() or counter.read_text() != "2") and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    deadline = time.monotonic() + 10
    while True:
        await sdk.gpt(gw).chat.completions.create(model="gpt-4o", messages=MESSAGES)
        n = jwt.decode(fake.seen[-1]["auth"][7:], options={"verify_signature": False})["n"]
        if n == 2 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    assert 2 == n


async def test_a_failing_token_command_fails_readiness_and_answers_502(make_gateway: Any, azure: Any) -> None:
    fake, url = azure
    auth = f'token_command = "{sys.executable} -c \'import sys; print(\\"secret-ish output\\"); sys.exit(3)\'"'
    gw = await make_gateway(cloud_toml(azure_upstream(url, deployment="gpt-4o-prod", auth=auth), ROUTES.split("[[routes]]\nmatch = \"embed-prod\"")[0]))
    r = await gw.get("/readyz")
    assert 503 == r.status
    state = (await r.json())["checks"]["credentials"]["upstreams"]["azure"]
    assert {"status": "down", "error": "Entra ID token: token_command exited with status 3"} == state
    r = await gw.post("/v1/chat/completions", headers=OAI, json={"model": "gpt-4o", "messages": MESSAGES})
    body = await r.json()
    assert 502 == r.status
    assert "secret-ish" not in str(body)
    assert [] == fake.seen


async def test_entra_token_file_is_read_and_reread_when_it_nears_expiry(sdk: Any, make_gateway: Any, azure: Any,
                                                                        tmp_path: Path) -> None:
    """token_file: a sidecar keeps it fresh; the gateway re-reads it 5 min before the token's exp."""
    fake, url = azure
    path = tmp_path / "entra-token"
    first = jwt.encode({"exp": int(time.time()) + 302, "n": 1}, "k" * 32)
    second = jwt.encode({"exp": int(time.time()) + 3600, "n": 2}, "k" * 32)
    path.write_text(first + "\n")
    fake.tokens.update({first, second})
    ups = azure_upstream(url, deployment="gpt-4o-prod", auth=f'token_file = "{path}"') + azure_upstream(url, name="azure-by-model")
    gw = await make_gateway(cloud_toml(ups, ROUTES))
    await sdk.gpt(gw).chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert "bearer:" + first == fake.seen[-1]["auth"]
    path.write_text(second)  # the sidecar's renewal
    deadline = time.monotonic() + 30
    while True:
        await sdk.gpt(gw).chat.completions.create(model="gpt-4o", messages=MESSAGES)
        if fake.seen[-1]["auth"] == "bearer:" + second or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert "bearer:" + second == fake.seen[-1]["auth"]
