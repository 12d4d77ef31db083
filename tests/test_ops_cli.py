"""What a new user meets at the command line: clear errors, never a traceback, no secret echoed."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT, MockUpstream, gateway_toml
from tests.fixtures.servers import free_port


def cli(*args: str, env: dict[str, str] | None = None, stdin: int | None = subprocess.DEVNULL,
        text_in: str | None = None) -> subprocess.CompletedProcess[str]:
    """``llm-gateway ...`` as a user runs it: no terminal (stdin from /dev/null unless given)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    return subprocess.run([sys.executable, "-m", "gateway", *args], env={**base, **(env or {})}, cwd=ROOT,
                          capture_output=True, text=True, timeout=120,
                          **({"input": text_in} if text_in is not None else {"stdin": stdin}))


def test_top_level_help_lists_the_commands_without_argparse_leftovers() -> None:
    r = cli("--help")
    assert 0 == r.returncode
    assert "==SUPPRESS==" not in r.stdout
    for command in ("serve", "check-config", "migrate", "users", "keys"):
        assert command in r.stdout
    assert not re.search(r"^\s+worker\b", r.stdout, re.M)  # internal: the supervisor starts it


@pytest.mark.parametrize(("value", "problem"), [
    ("tooShortKey7", "holds 12 characters; a key needs 32 to 256 url-safe characters"),
    ("gwk_" + "x" * 30 + "!!", "not url-safe"),
    ("gwk_" + "y" * 300, "holds 304 characters"),
])
def test_a_weak_gateway_key_is_refused_by_check_config_and_serve(value: str, problem: str) -> None:
    """GATEWAY_KEY (the embedded default's own key) must be 32+ url-safe characters; it is never echoed."""
    r = cli("check-config", env={"GATEWAY_KEY": value})
    assert 1 == r.returncode
    assert "$GATEWAY_KEY" in r.stderr and problem in r.stderr, r.stderr
    assert value not in r.stdout + r.stderr
    r = cli("serve", "--workers", "1", "--port", str(free_port()), env={"GATEWAY_KEY": value})
    assert 2 == r.returncode
    assert problem in r.stderr and value not in r.stdout + r.stderr
    assert 0 == cli("check-config", env={"GATEWAY_KEY": "gwk_" + "k" * 40}).returncode


def test_users_create_without_a_terminal_says_how_to_give_the_password() -> None:
    env = {"GATEWAY_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none"}
    r = cli("users", "create", "--email", "a@example.com", env=env)
    assert 1 == r.returncode
    assert "Traceback" not in r.stderr
    assert "no terminal to ask for the password" in r.stderr and "--password-env" in r.stderr
    r = cli("users", "create", "--email", "a@example.com", "--password-env", "OPS_NO_SUCH_VARIABLE", env=env)
    assert 1 == r.returncode
    assert "OPS_NO_SUCH_VARIABLE: that environment variable is not set" in r.stderr, r.stderr
    r = cli("users", "create", "--email", "a@example.com", "--password-stdin", env=env, text_in="")
    assert 1 == r.returncode
    assert "standard input is empty" in r.stderr


def test_postgres_unreachable_names_where_and_why_never_the_password() -> None:
    port = free_port()
    r = cli("users", "list", env={"GATEWAY_DATABASE_URL": f"postgresql://bob:pw-s3cret-9@127.0.0.1:{port}/gw"})
    assert 1 == r.returncode
    assert f"cannot use Postgres at bob@127.0.0.1:{port}/gw" in r.stderr, r.stderr
    assert "Connect" in r.stderr or "refused" in r.stderr.lower()  # the cause, in its own words
    assert "pw-s3cret-9" not in r.stdout + r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_serve_with_postgres_unreachable_logs_where_and_why(serve, mock_upstream: MockUpstream) -> None:
    port = free_port()
    gw = serve(gateway_toml(mock_upstream.base_url), workers=1,
               env={"GATEWAY_DATABASE_URL": f"postgresql://bob:pw-s3cret-9@127.0.0.1:{port}/gw"})
    assert 0 == gw.stop()
    lines = [json.loads(line) for line in gw.log_text().splitlines() if line.startswith("{")]
    warned = [d for d in lines if d.get("event", "").startswith("postgres unreachable at start")]
    assert warned, gw.log_text()[-2000:]
    assert f"bob@127.0.0.1:{port}/gw" in warned[0]["reason"]
    assert "pw-s3cret-9" not in gw.log_text()


async def test_keys_list_shows_ids_prefixes_names_and_owners_never_keys(pg_env: str) -> None:
    env = {"GATEWAY_DATABASE_URL": pg_env, "OPS_PW": "a long enough password"}
    assert 0 == cli("users", "create", "--email", "lister@example.com", "--password-env", "OPS_PW", env=env).returncode
    made = []
    for name in ("ci", "laptop"):
        r = cli("keys", "create", "--user", "lister@example.com", "--name", name, env=env)
        assert 0 == r.returncode, r.stderr
        made.append(json.loads(r.stdout))
    assert 0 == cli("keys", "revoke", made[1]["id"], env=env).returncode

    r = cli("keys", "list", env=env)
    assert 0 == r.returncode, r.stderr
    rows = [line.split() for line in r.stdout.splitlines()[1:]]
    assert [[made[0]["id"], made[0]["prefix"], "active", "lister@example.com", "ci"]] == rows
    r = cli("keys", "list", "--all", "--user", "lister@example.com", env=env)
    rows = [line.split() for line in r.stdout.splitlines()[1:]]
    assert {(made[0]["id"], "active"), (made[1]["id"], "revoked")} == {(row[0], row[2]) for row in rows}
    for k in made:
        assert k["key"] not in r.stdout + r.stderr
    r = cli("keys", "list", "--user", "nobody@example.com", env=env)
    assert 1 == r.returncode and "no user nobody@example.com" in r.stderr
