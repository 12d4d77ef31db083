"""provider = "bedrock": the anthropic SDK -> gateway -> a Bedrock fake that verifies SigV4.

The fake recomputes every request's signature with botocore from the known
test credentials and refuses mismatches with 403, checks the Bedrock body
(no model, no stream, its anthropic_version) and streams real event-stream
frames with CRCs.  The client sees the Anthropic API: JSON, SSE events
byte for byte as Anthropic frames them, errors in Anthropic's shape.
"""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Any

import anthropic
import orjson
import pytest

from tests.conftest import TEST_KEY
from tests.fixtures.cloud_common import anthropic_events, sse
from tests.fixtures.clouds import AWS_KEY_ID, AWS_TOKEN, BEDROCK_MODEL, bedrock_upstream, cloud_toml

AV = {"x-api-key": TEST_KEY, "anthropic-version": "2023-06-01"}
MESSAGES: list[Any] = [{"role": "user", "content": "hi from the test"}]
ROUTE = """
[[routes]]
match = "*anthropic.claude-*"
deployments = [{ upstream = "bedrock" }]
"""


async def test_sdk_message_through_bedrock_is_signed_and_reshaped(sdk: Any, make_gateway: Any, bedrock: Any, aws_keys: None) -> None:
    """A Messages call arrives at Bedrock SigV4-signed (verified by the fake), body without model/stream."""
    fake, url = bedrock
    gw = await make_gateway(cloud_toml(bedrock_upstream("bedrock", url), ROUTE))
    msg = await sdk.claude(gw).messages.create(model=BEDROCK_MODEL, max_tokens=20, messages=MESSAGES,
                                           extra_headers={"anthropic-beta": "tools-2024-04-04"})
    assert "Hello from the cloud fake." == msg.content[0].text  # type: ignore[union-attr]
    assert BEDROCK_MODEL == msg.model
    assert [] == fake.refused
    [seen] = fake.seen
    assert f"/model/{BEDROCK_MODEL.replace(':', '%3A')}/invoke" == seen["path"]
    assert "bedrock-2023-05-31" == seen["body"]["anthropic_version"]
    assert ["tools-2024-04-04"] == seen["body"]["anthropic_beta"]
    assert "model" not in seen["body"] and "stream" not in seen["body"]
    assert seen["headers"]["authorization"].startswith(f"AWS4-HMAC-SHA256 Credential={AWS_KEY_ID}/")
    assert AWS_TOKEN == seen["headers"]["x-amz-security-token"]
    assert TEST_KEY not in str(seen["headers"])  # the gateway key never leaves


async def test_stream_is_relayed_as_anthropic_sse_byte_for_byte(sdk: Any, make_gateway: Any, bedrock: Any, aws_keys: None) -> None:
    """Event-stream frames become exactly the SSE the Anthropic API sends; the SDK assembles the message."""
    fake, url = bedrock
    gw = await make_gateway(cloud_toml(bedrock_upstream("bedrock", url), ROUTE))
    body = {"model": BEDROCK_MODEL, "max_tokens": 20, "messages": MESSAGES, "stream": True}
    r = await gw.post("/v1/messages", headers=AV, json=body)
    raw = await r.read()
    assert 200 == r.status
    assert r.headers["content-type"].startswith("text/event-stream")
    [seen] = fake.seen
    assert seen["path"].endswith("/invoke-with-response-stream")
    expected = b"".join(sse(e) for e in anthropic_events(seen["body"], BEDROCK_MODEL, "msg_bdrk_000001"))
    assert expected == raw  # invocation metrics removed, nothing added
    async with sdk.claude(gw).messages.stream(model=BEDROCK_MODEL, max_tokens=20, messages=MESSAGES) as stream:
        final = await stream.get_final_message()
    assert "Hello from the cloud fake." == final.content[0].text  # type: ignore[union-attr]
    assert 6 == final.usage.output_tokens


async def test_wrong_secret_is_refused_by_the_fake_and_answered_502(make_gateway: Any, bedrock: Any, aws_keys: None,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The fake really verifies: a request signed with another secret gets AWS's 403, the client a 502."""
    fake, url = bedrock
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    gw = await make_gateway(cloud_toml(bedrock_upstream("bedrock", url), ROUTE))
    r = await gw.post("/v1/messages", headers=AV, json={"model": BEDROCK_MODEL, "max_tokens": 5, "messages": MESSAGES})
    body = await r.json()
    assert 502 == r.status
    assert "api_error" == body["error"]["type"]
    assert ["InvalidSignatureException: The request signature we calculated does not match the signature you provided."] == fake.refused
    assert "not-the-secret" not in str(body)


@pytest.mark.parametrize(
    ("fault", "status", "etype"),
    [
        ("ValidationException", 400, "invalid_request_error"),
        ("ResourceNotFoundException", 404, "not_found_error"),
        ("ModelTimeoutException", 504, "timeout_error"),
    ],
)
async def test_bedrock_errors_reach_the_client_as_anthropic_errors(make_gateway: Any, bedrock: Any, aws_keys: None,
                                                                   fault: str, status: int, etype: str) -> None:
    fake, url = bedrock
    fake.faults[:] = [fault]
    gw = await make_gateway(cloud_toml(bedrock_upstream("bedrock", url), ROUTE))
    r = await gw.post("/v1/messages", headers=AV, json={"model": BEDROCK_MODEL, "max_tokens": 5, "messages": MESSAGES})
    body = await r.json()
    assert status == r.status
    assert {"type": "error", "error": {"type": etype, "message": f"Bedrock {fault}: fake {fault}"}} == body


async def test_throttling_is_a_429_the_sdk_retries(sdk: Any, make_gateway: Any, bedrock: Any, aws_keys: None) -> None:
    """ThrottlingException answers 429 rate_limit_error when nothing is left to try: the SDK raises
    RateLimitError, and its own retry then succeeds."""
    fake, url = bedrock
    fake.faults[:] = ["ThrottlingException"]
    gw = await make_gateway(cloud_toml(bedrock_upstream("bedrock", url), ROUTE))
    with pytest.raises(anthropic.RateLimitError):
        await sdk.claude(gw).messages.create(model=BEDROCK_MODEL, max_tokens=5, messages=MESSAGES)
    fake.faults[:] = ["ThrottlingException"]
    msg = await sdk.claude(gw, retries=1).messages.create(model=BEDROCK_MODEL, max_tokens=5, messages=MESSAGES)
    assert msg.content


@pytest.mark.parametrize("fault", ["ThrottlingException", "ServiceUnavailableException", "InternalServerException"])
async def test_the_gateway_retries_bedrock_per_routing_rules(sdk: Any, make_gateway: Any, bedrock: Any,
                                                             aws_keys: None, fault: str) -> None:
    """retries = 2: throttling (429), 503 and 500 from Bedrock are retried on the same upstream, invisibly."""
    fake, url = bedrock
    fake.faults[:] = [fault, fault]
    gw = await make_gateway(cloud_toml(bedrock_upstream("bedrock", url, retries=2, retry_base_ms=1), ROUTE))
    r = await gw.post("/v1/messages", headers=AV, json={"model": BEDROCK_MODEL, "max_tokens": 5, "messages": MESSAGES})
    await r.read()
    assert 200 == r.status
    assert "3" == r.headers["x-gateway-attempts"]
    assert 3 == len(fake.seen)


async def test_model_not_ready_and_validation_are_not_retried(make_gateway: Any, bedrock: Any, aws_keys: None) -> None:
    """A ValidationException is the caller's: relayed at once, never retried or failed over."""
    fake, url = bedrock
    fake.faults[:] = ["ValidationException"]
    gw = await make_gateway(cloud_toml(bedrock_upstream("bedrock", url, retries=2, retry_base_ms=1), ROUTE))
    r = await gw.post("/v1/messages", headers=AV, json={"model": BEDROCK_MODEL, "max_tokens": 5, "messages": MESSAGES})
    assert 400 == r.status
    assert 1 == len(fake.seen)


async def test_throttled_bedrock_fails_over_to_the_next_deployment(make_gateway: Any, bedrock: Any,
                                                                   aws_keys: None, mock_upstream: Any) -> None:
    """A 429 from Bedrock is the failure classifier's THROTTLED: the next deployment answers."""
    fake, url = bedrock
    fake.faults[:] = ["ThrottlingException", "ServiceUnavailableException"]  # retries = 0: fail over at once
    ups = bedrock_upstream("bedrock", url) + bedrock_upstream("bedrock-2", url) + f"""
[upstreams.native]
provider = "anthropic"
base_url = "{mock_upstream.base_url}"
api_key_env = "TEST_ANTHROPIC_KEY"
"""
    route = """
[[routes]]
match = "*anthropic.claude-*"
deployments = [{ upstream = "bedrock" }]
fallbacks = ["bedrock-2", "native"]
"""
    gw = await make_gateway(cloud_toml(ups, route))
    r = await gw.post("/v1/messages", headers=AV, json={"model": BEDROCK_MODEL, "max_tokens": 5, "messages": MESSAGES})
    await r.read()
    assert 200 == r.status
    assert 2 == len(fake.seen)  # throttled on bedrock, 503 on bedrock-2, then the native upstream
    assert 1 == len(await mock_upstream.requests())


async def test_mid_stream_throttling_ends_with_an_error_event(sdk: Any, make_gateway: Any, bedrock: Any, aws_keys: None) -> None:
    """An exception frame mid-stream becomes Anthropic's error event; no message_stop follows."""
    fake, url = bedrock
    fake.stream_fault = "throttle"
    gw = await make_gateway(cloud_toml(bedrock_upstream("bedrock", url), ROUTE))
    r = await gw.post("/v1/messages", headers=AV,
                      json={"model": BEDROCK_MODEL, "max_tokens": 20, "messages": MESSAGES, "stream": True})
    raw = await r.read()
    assert 200 == r.status
    assert raw.endswith(b'event: error\ndata: {"type":"error","error":{"type":"rate_limit_error","message":'
                        b'"Bedrock throttlingException: Too many tokens, please wait before trying again."}}\n\n')
    assert b"message_stop" not in raw
    with pytest.raises(anthropic.APIStatusError):
        async with sdk.claude(gw).messages.stream(model=BEDROCK_MODEL, max_tokens=20, messages=MESSAGES) as stream:
            await stream.get_final_message()


async def test_corrupt_frame_is_a_cut_stream(make_gateway: Any, bedrock: Any, aws_keys: None) -> None:
    """A frame whose CRC does not match (botocore's decoder checks it) after content has started: the
    good frames before it are relayed, then the answer ends with an error event, never message_stop."""
    fake, url = bedrock
    fake.stream_fault = "crc"
    gw = await make_gateway(cloud_toml(bedrock_upstream("bedrock", url), ROUTE))
    r = await gw.post("/v1/messages", headers=AV,
                      json={"model": BEDROCK_MODEL, "max_tokens": 20, "messages": MESSAGES, "stream": True})
    raw = await r.read()
    assert 200 == r.status
    assert b'"text":"Hello"' in raw  # the first delta, before the corrupt frame
    assert raw.endswith(b'event: error\ndata: {"type":"error","error":{"type":"api_error","message":'
                        b'"The upstream connection failed mid-stream; the answer is incomplete."}}\n\n')
    assert b"message_stop" not in raw


async def test_count_tokens_is_not_sent_to_bedrock(make_gateway: Any, bedrock: Any, aws_keys: None) -> None:
    fake, url = bedrock
    gw = await make_gateway(cloud_toml(bedrock_upstream("bedrock", url), ROUTE))
    r = await gw.post("/v1/messages/count_tokens", headers=AV, json={"model": BEDROCK_MODEL, "messages": MESSAGES})
    body = await r.json()
    assert 404 == r.status
    assert "not_found_error" == body["error"]["type"]
    assert [] == fake.seen


async def test_instance_role_credentials_via_imdsv2(sdk: Any, make_gateway: Any, bedrock: Any, aws_env: None, imds: Any,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """No keys in the environment: botocore's chain reaches the instance role through IMDSv2 (token first)."""
    fake, url = bedrock
    meta, meta_url = imds
    monkeypatch.delenv("AWS_EC2_METADATA_DISABLED")
    monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", meta_url)
    gw = await make_gateway(cloud_toml(bedrock_upstream("bedrock", url), ROUTE))
    [issued] = meta.issued
    fake.credentials[issued["AccessKeyId"]] = (issued["SecretAccessKey"], issued["Token"])
    msg = await sdk.claude(gw).messages.create(model=BEDROCK_MODEL, max_tokens=5, messages=MESSAGES)
    assert msg.content
    assert [] == fake.refused
    assert issued["Token"] == fake.seen[0]["headers"]["x-amz-security-token"]
    assert 0 == meta.gets_without_token


PROCESS = """
import json, datetime, pathlib, sys
counter = pathlib.Path(sys.argv[1])
n = int(counter.read_text() or 0) + 1 if counter.exists() else 1
counter.write_text(str(n))
life = 15 * 60 + 2 if n == 1 else 6 * 3600
exp = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=life)
print(json.dumps({"Version": 1, "AccessKeyId": f"ASIAPROC{n:08d}", "SecretAccessKey": f"proc-secret-{n}",
                  "SessionToken": f"proc-token-{n}", "Expiration": exp.strftime("%Y-%m-%dT%H:%M:%SZ")}))
"""


async def test_profile_credentials_are_refreshed_before_they_expire(sdk: Any, make_gateway: Any, bedrock: Any,
                                                                    aws_env: None, tmp_path: Any,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A shared-config profile (aws_profile) with a credential_process whose first credentials last
    15 min: the background loop renews them once botocore's advisory window opens, before they
    expire, and requests sign with the new ones -- no request waits for it."""
    import sys

    fake, url = bedrock
    script, counter = tmp_path / "creds.py", tmp_path / "count"
    script.write_text(PROCESS)
    (tmp_path / "aws-config").write_text(f"[profile gw]\ncredential_process = {sys.executable} {script} {counter}\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "aws-config"))
    for n in (1, 2, 3):
        fake.credentials[f"ASIAPROC{n:08d}"] = (f"proc-secret-{n}", f"proc-token-{n}")
    gw = await make_gateway(cloud_toml(bedrock_upstream("bedrock", url, aws_profile="gw"), ROUTE))
    msg = await sdk.claude(gw).messages.create(model=BEDROCK_MODEL, max_tokens=5, messages=MESSAGES)
    assert msg.content
    assert "proc-token-1" == fake.seen[-1]["headers"]["x-amz-security-token"]
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:
        await (await gw.post("/v1/messages", headers=AV,
                             json={"model": BEDROCK_MODEL, "max_tokens": 5, "messages": MESSAGES})).read()
        if fake.seen[-1]["headers"]["x-amz-security-token"] == "proc-token-2":
            break
        await asyncio.sleep(0.2)
    assert "proc-token-2" == fake.seen[-1]["headers"]["x-amz-security-token"]
    assert "2" == counter.read_text()  # renewed once, by the background loop
    assert [] == fake.refused


async def test_rotated_keys_are_picked_up_after_aws_refuses_the_old_ones(make_gateway: Any, bedrock: Any,
                                                                         aws_keys: None,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The keys in the environment were rotated and AWS refuses the old ones: that request is the
    gateway's 502, the chain is resolved again in the background, the next requests sign with the new keys."""
    fake, url = bedrock
    gw = await make_gateway(cloud_toml(bedrock_upstream("bedrock", url), ROUTE))
    fake.credentials = {"AKIDROTATED000002": ("rotated-secret-" + "r" * 20, None)}
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDROTATED000002")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "rotated-secret-" + "r" * 20)
    monkeypatch.delenv("AWS_SESSION_TOKEN")
    body = {"model": BEDROCK_MODEL, "max_tokens": 5, "messages": MESSAGES}
    r = await gw.post("/v1/messages", headers=AV, json=body)
    assert 502 == r.status
    deadline = time.monotonic() + 10
    while True:
        r = await gw.post("/v1/messages", headers=AV, json=body)
        await r.read()
        if r.status == 200 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    assert 200 == r.status
    assert fake.seen[-1]["headers"]["authorization"].startswith("AWS4-HMAC-SHA256 Credential=AKIDROTATED000002/")


async def test_missing_credentials_fail_readiness_and_answer_502_at_once(make_gateway: Any, bedrock: Any,
                                                                         aws_env: None) -> None:
    """No AWS credentials anywhere: /readyz says so (503), a request gets the gateway's 502, no hang."""
    fake, url = bedrock
    gw = await make_gateway(cloud_toml(bedrock_upstream("bedrock", url), ROUTE))
    r = await gw.get("/readyz")
    ready = await r.json()
    assert 503 == r.status
    creds = ready["checks"]["credentials"]
    assert "down" == creds["status"]
    assert creds["upstreams"]["bedrock"]["error"].startswith("AWS credentials: none found")
    t0 = time.monotonic()
    r = await gw.post("/v1/messages", headers=AV, json={"model": BEDROCK_MODEL, "max_tokens": 5, "messages": MESSAGES})
    body = await r.json()
    assert 502 == r.status
    assert time.monotonic() - t0 < 5  # generous: it is answered from the cached failure
    assert "api_error" == body["error"]["type"]
    assert "Upstream 'bedrock' has no usable credentials (AWS credentials: none found" in body["error"]["message"]
    assert [] == fake.seen


def test_event_stream_payloads_are_base64_json_events() -> None:
    """The fake's frames carry what Bedrock's do: {"bytes": base64(event JSON)} (decoded by botocore)."""
    from botocore.eventstream import EventStreamBuffer

    from tests.fixtures.cloud_common import chunk_frame

    buf = EventStreamBuffer()
    buf.add_data(chunk_frame(b'{"type":"ping"}'))
    [msg] = list(buf)
    assert "chunk" == msg.headers[":event-type"]
    assert b'{"type":"ping"}' == base64.b64decode(orjson.loads(msg.payload)["bytes"])
