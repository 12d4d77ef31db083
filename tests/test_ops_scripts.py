"""The README's two commands, from a fresh copy of the repository.

`./scripts/run.sh` installs only what running needs (no test tools), saying
what it does, and serves the README's first request; the test command is the
one CI runs.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import aiohttp
import pytest

from tests.fixtures.servers import free_port

ROOT = Path(__file__).resolve().parent.parent
DEV_TOOLS = ("pytest", "ruff", "mypy", "k6")


def fresh_copy(dest: Path) -> Path:
    """What a clone has: tracked (and new, not ignored) files; no .venv."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True, timeout=60).stdout.split()
    for rel in listed:
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def readme_block(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index(title):]
    return section[section.index("```sh") + 5: section.index("```", section.index("```sh") + 5)]


def test_ci_runs_the_readmes_test_command() -> None:
    """.ci/run ends in exactly the README's test command, which installs the dev tools."""
    commands = re.findall(r"^(\./scripts/\S+)", readme_block("## The two commands"), re.M)
    assert ["./scripts/run.sh", "./scripts/test.sh"] == commands
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^exec \./scripts/test\.sh\b", ci, re.M)
    test_sh = (ROOT / "scripts" / "test.sh").read_text()
    assert "./scripts/setup.sh dev" in test_sh
    run_sh = (ROOT / "scripts" / "run.sh").read_text()
    assert "./scripts/setup.sh run" in run_sh


@pytest.mark.slow
async def test_run_sh_installs_only_what_running_needs_and_serves_the_first_request(tmp_path: Path) -> None:
    repo = fresh_copy(tmp_path / "clone")
    venv = tmp_path / "venv"
    port, mock_port = free_port(), free_port()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "VIRTUAL_ENV"))},
           "VENV": str(venv), "GATEWAY_MOCK_UPSTREAM__PORT": str(mock_port),
           "GATEWAY_UPSTREAMS__MOCK-ANTHROPIC__BASE_URL": f"http://127.0.0.1:{mock_port}",
           "GATEWAY_UPSTREAMS__MOCK-OPENAI__BASE_URL": f"http://127.0.0.1:{mock_port}"}
    log = (tmp_path / "run.log").open("wb")
    proc = subprocess.Popen([str(repo / "scripts" / "run.sh"), "--port", str(port), "--workers", "1"],
                            cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        curl = readme_block("Then, from another terminal")
        key = re.search(r"x-api-key: (\S+)'", curl).group(1)
        body = re.search(r"-d '(\{.*\})'", curl).group(1)
        deadline = asyncio.get_running_loop().time() + 600
        async with aiohttp.ClientSession() as s:
            while True:
                assert proc.poll() is None, (tmp_path / "run.log").read_text()[-3000:]
                assert asyncio.get_running_loop().time() < deadline, (tmp_path / "run.log").read_text()[-3000:]
                try:
                    async with s.post(f"http://127.0.0.1:{port}/v1/messages", data=body, headers={
                            "x-api-key": key, "anthropic-version": "2023-06-01",
                            "content-type": "application/json"}) as r:
                        assert 200 == r.status, await r.text()
                        assert "message" == (await r.json())["type"]
                        break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)
        log.close()
    out = (tmp_path / "run.log").read_text()
    assert "setup: creating the virtualenv" in out
    assert "installing llm-gateway and its run-time dependencies" in out
    assert "run: starting llm-gateway serve" in out
    for tool in DEV_TOOLS:
        assert not (venv / "bin" / tool).exists(), f"run.sh installed the dev tool {tool}"
    again = subprocess.run([str(repo / "scripts" / "setup.sh"), "run"], cwd=repo, env=env, capture_output=True,
                           text=True, timeout=120)
    assert 0 == again.returncode and "is up to date (run)" in again.stdout

