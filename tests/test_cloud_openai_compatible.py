"""OpenAI-compatible servers (vLLM, Ollama, llama.cpp's server, Gemini's OpenAI endpoint) are plain
``provider = "openai"`` upstreams with their base_url: here the bundled mock plays a local vLLM that
needs no key, behind a public model name mapped to the server's own model id."""

from __future__ import annotations

from typing import Any

from tests.fixtures.clouds import cloud_toml

LOCAL_MODEL = "meta-llama/Llama-3.1-8B-Instruct"


async def test_a_keyless_local_openai_server_behind_a_public_name(sdk: Any, make_gateway: Any,
                                                                 mock_upstream: Any) -> None:
    ups = f"""
[upstreams.vllm]
provider = "openai"
base_url = "{mock_upstream.base_url}"
"""
    route = f"""
[[routes]]
match = "local-llama"
deployments = [{{ upstream = "vllm", model = "{LOCAL_MODEL}" }}]
"""
    gw = await make_gateway(cloud_toml(ups, route))
    client = sdk.gpt(gw)
    done = await client.chat.completions.create(model="local-llama", messages=[{"role": "user", "content": "hi"}])
    assert done.choices[0].message.content
    stream = await client.chat.completions.create(model="local-llama", messages=[{"role": "user", "content": "hi"}],
                                                  stream=True)
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text
    emb = await client.embeddings.create(model="local-llama", input="hi")
    assert emb.data
    seen = await mock_upstream.requests()
    assert ["/v1/chat/completions", "/v1/chat/completions", "/v1/embeddings"] == [s["path"] for s in seen]
    assert {LOCAL_MODEL} == {s["body"]["model"] for s in seen}
    assert all("authorization" not in s["headers"] for s in seen)  # no key configured, none sent (not the caller's)
