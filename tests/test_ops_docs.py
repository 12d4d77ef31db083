"""The README and docs/ tell the truth: every endpoint is listed, every SDK line works, links resolve."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest

from gateway.app import create_app
from gateway.config import parse
from tests.conftest import CONFIG_DIR, TEST_KEY

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _routes(monkeypatch: pytest.MonkeyPatch) -> set[tuple[str, str]]:
    """(method, path) of every route the gateway serves in database mode (the larger set), HEAD aside."""
    monkeypatch.setenv("GATEWAY_DATABASE_URL", "postgresql://docs@127.0.0.1:1/docs")  # never connected: routes only
    cfg = parse((CONFIG_DIR / "gateway.toml").read_text(), source=str(CONFIG_DIR / "gateway.toml"))
    return {(r.method, r.resource.canonical) for r in create_app(cfg).router.routes() if r.method != "HEAD"}


def _listed(text: str) -> set[tuple[str, str]]:
    """`GET/PATCH /admin/users/{id}` style entries -> {(GET, path), (PATCH, path)}."""
    out = set()
    for methods, path in re.findall(r"`((?:GET|POST|PATCH|PUT|DELETE|\*)(?:/(?:GET|POST|PATCH|PUT|DELETE))*) (/[^`\s]*)", text):
        for m in methods.split("/"):
            out.add((m, path))
    return out


def _section(text: str, title: str) -> str:
    part = text[text.index(title):]
    nxt = part.find("\n## ", 3)
    return part if nxt < 0 else part[:nxt]


@pytest.mark.parametrize("where", ["README.md#Endpoints", "docs/api.md"])
def test_every_endpoint_the_gateway_serves_is_documented(where: str, monkeypatch: pytest.MonkeyPatch) -> None:
    text = _section(README, "## Endpoints") if where.startswith("README") else (ROOT / where).read_text()
    listed = _listed(text)
    missing = []
    for method, path in sorted(_routes(monkeypatch)):
        if path.startswith("/ak/{access_key}"):
            covered = (method, path.removeprefix("/ak/{access_key}")) in listed and "/ak/{key}/" in text
        else:
            covered = (method, path) in listed
        if not covered:
            missing.append(f"{method} {path}")
    assert [] == missing, f"{where} does not list these endpoints"


def test_readme_points_to_docs_that_exist_and_not_outside_the_repository() -> None:
    assert "shared/DESIGN.md" not in README
    for text, base in ((README, ROOT), *((p.read_text(), p.parent) for p in (ROOT / "docs").glob("*.md"))):
        for link in re.findall(r"\]\(([^)#\s]+\.md)\)", text):
            assert (base / link).is_file(), link
    for page in ("api.md", "errors.md", "policy.md", "operations.md"):
        assert f"docs/{page}" in README


def test_readme_and_example_config_agree_with_the_code_on_unknown_model_refuse() -> None:
    """unknown_model = "refuse" answers 404 (tests/test_ledger_gateway.py checks the code): both documents say so."""
    example = (CONFIG_DIR / "gateway.example.toml").read_text()
    comment = example[example.index("# A model missing from the table"):example.index("unknown_model =")]
    assert '"refuse" does not serve it' in comment and "404" in comment
    assert "records it at zero" not in comment
    readme = README[README.index('`pricing.unknown_model = "default"`'):]
    assert '`"refuse"` answers 404' in readme[:600]


async def test_every_sdk_line_in_the_readme_works(gateway: Any) -> None:
    """The README's SDK constructors, pointed at a live gateway, each complete a request."""
    block = README[README.index("With the SDKs:"):]
    block = block[block.index("```python") + 9: block.index("```", block.index("```python") + 9)]
    lines = [line for line in block.splitlines() if "(base_url=" in line]
    assert len(lines) == 4, lines
    assert any("openai.OpenAI(" in line and "/ak/{KEY}/v1" in line for line in lines)
    base = str(gateway.make_url("")).rstrip("/")
    for line in lines:
        code = (line.replace("http://localhost:8000", base).replace("anthropic.Anthropic(", "anthropic.AsyncAnthropic(")
                .replace("openai.OpenAI(", "openai.AsyncOpenAI("))
        client = eval(code, {"anthropic": anthropic, "openai": openai, "KEY": TEST_KEY})  # noqa: S307 - our README
        async with client:
            if isinstance(client, anthropic.AsyncAnthropic):
                msg = await client.messages.create(model="demo-claude", max_tokens=8,
                                                   messages=[{"role": "user", "content": "hi"}])
                assert "message" == msg.type, line
            else:
                chat = await client.chat.completions.create(model="demo-gpt",
                                                            messages=[{"role": "user", "content": "hi"}])
                assert "chat.completion" == chat.object, line
