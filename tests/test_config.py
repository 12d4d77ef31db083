"""Configuration: every error at once with its path, unknown keys rejected, GATEWAY_* overrides,
the annotated example documenting every setting, and ``llm-gateway check-config``.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from gateway.config import Config, ConfigError, load, parse
from tests.conftest import CONFIG_DIR, ROOT

EXAMPLE = CONFIG_DIR / "gateway.example.toml"
DEFAULT = CONFIG_DIR / "gateway.toml"
UPSTREAM = '[upstreams.u]\nprovider = "openai"\nbase_url = "http://127.0.0.1:1"\n'


def errors_of(text: str, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(text, source="t.toml", environ=environ or {})
    return info.value.errors


def check_config(path: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", "--config", str(path)],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, **(env or {})}, timeout=60,
    )


# ------------------------------------------------------------------ the shipped files


def _fields(cls: typing.Any, seen: set[str]) -> None:
    for f in dataclasses.fields(cls):
        if f.name == "source":
            continue
        seen.add(f.name)
        hint = typing.get_type_hints(cls)[f.name]
        for tp in (hint, *typing.get_args(hint)):
            for inner in (tp, *typing.get_args(tp)):
                if dataclasses.is_dataclass(inner):
                    _fields(inner, seen)


def test_example_documents_every_setting():
    """Every field of every config dataclass appears in gateway.example.toml (set or commented)."""
    names: set[str] = set()
    _fields(Config, names)
    text = EXAMPLE.read_text()
    missing = sorted(n for n in names if not re.search(rf"^\s*(#\s*)?{n}\s*=|[{{,]\s*{n}\s*=|^\[+[\w.-]*\b{n}\b", text, re.M))
    assert [] == missing


def test_example_parses_and_sets_every_fixed_table_to_its_default():
    """The example is valid, and its [server] .. [accounting] values are the real defaults."""
    cfg = parse(EXAMPLE.read_text(), source=str(EXAMPLE), environ={})
    defaults = Config()
    for table in ("server", "log", "auth", "database", "redis", "mock_upstream", "pricing", "accounting"):
        assert getattr(defaults, table) == getattr(cfg, table), table
    assert {"anthropic", "openai", "openai-backup"} == set(cfg.upstreams)


def test_default_config_loads():
    cfg = load(DEFAULT)
    assert any(r.match == "demo-*" for r in cfg.routes)


# ------------------------------------------------------------------ errors


def test_every_error_is_reported_at_once_with_its_path():
    text = """
        [server]
        port = 70000
        workers = -1
        max_body_bytes = "big"

        [log]
        level = "loud"

        [upstreams.a]
        provider = "azure"
        base_url = "ftp://x/"
        idle_timeout = 0
        breaker = { failure_threshold = 0, half_open_probes = 0 }

        [upstreams.b]
        provider = "openai"

        [[routes]]
        match = ""
        deployments = [{ upstream = "nope", weight = 0 }]
        fallbacks = ["ghost"]

        [[keys]]
        name = "k"
        key_sha256 = "ABC"
        expires_at = "soon"
        limits = { rpm = 0, allowed_ips = ["not-an-ip"], budget_usd = -1 }

        [[keys]]
        name = "k"
        """
    errs = errors_of(text)
    expected = [
        "server.max_body_bytes: must be an integer, got 'big'",
        "log.level: must be one of 'debug', 'info', 'warning', 'error', got 'loud'",
        "upstreams.a.provider: must be one of 'anthropic', 'openai', 'azure-openai', 'bedrock', 'vertex', got 'azure'",
        "upstreams.b.base_url: required",
        "server.port: must be 0..65535",
        "server.workers: must be 0 (one per core) or more",
        "upstreams.a.base_url: must start with http:// or https://",
        "upstreams.a.base_url: must not end with '/'",
        "upstreams.a.idle_timeout: must be positive",
        "upstreams.a.breaker.failure_threshold: must be positive",
        "routes[0].match: must not be empty",
        "routes[0].deployments[0].upstream: unknown upstream 'nope'",
        "routes[0].deployments[0].weight: must be positive",
        "routes[0].fallbacks[0]: unknown upstream 'ghost'",
        "keys[0].key_sha256: must be 64 lowercase hex characters",
        "keys[0].limits.rpm: must be positive",
        "keys[0].limits.budget_usd: must not be negative",
        "keys[0].limits.allowed_ips[0]: not an IP network: 'not-an-ip'",
        "keys[1].name: duplicate key name 'k'",
        "keys[1]: set exactly one of key_env or key_sha256",
    ]
    for e in expected:
        assert e in errs
    assert any(e.startswith("upstreams.a.breaker.half_open_probes:") for e in errs)
    assert any(e.startswith("keys[0].expires_at:") for e in errs)


@pytest.mark.parametrize(
    ("text", "path"),
    [
        ("colour = 1\n", "colour"),
        ("[server]\nprot = 1\n", "server.prot"),
        (UPSTREAM + "retrys = 3\n", "upstreams.u.retrys"),
        (UPSTREAM + "breaker = { threshold = 3 }\n", "upstreams.u.breaker.threshold"),
        (UPSTREAM + '[[routes]]\nmatch = "m"\ndeployments = [{ upstream = "u", wieght = 2 }]\n',
         "routes[0].deployments[0].wieght"),
        (UPSTREAM + '[[routes]]\nmatch = "m"\ndeployments = [{ upstream = "u" }]\nfallback = []\n', "routes[0].fallback"),
        ('[[keys]]\nname = "k"\nkey_env = "X"\nlimit = {}\n', "keys[0].limit"),
        ('[[keys]]\nname = "k"\nkey_env = "X"\nlimits = { rpn = 1 }\n', "keys[0].limits.rpn"),
        ('[[users]]\nname = "u"\nlimits = { budget = 1 }\n', "users[0].limits.budget"),
        ('source = "x"\n', "source"),
    ],
)
def test_unknown_keys_are_rejected_at_every_level(text, path):
    assert [f"{path}: unknown key"] == errors_of(text)


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("server = 5\n", "server: must be a table"),
        ("upstreams = { a = 5 }\n", "upstreams.a: must be a table"),
        (UPSTREAM + "breaker = 5\n", "upstreams.u.breaker: must be a table"),
        ('[[keys]]\nname = "k"\nkey_env = "X"\nlimits = "none"\n', "keys[0].limits: must be a table"),
        ("routes = [5]\n", "routes[0]: must be a table"),
        ('[[keys]]\nname = "k"\nkey_env = "X"\nlimits = { models = "claude-*" }\n', "keys[0].limits.models: must be an array"),
        ("[server]\nworkers = true\n", "server.workers: must be an integer, got True"),
    ],
)
def test_wrong_types_are_errors_not_crashes(text, error):
    """A value of the wrong shape is reported with its path (and never crashes the later checks)."""
    assert error in errors_of(text)


def test_missing_required_fields_are_reported_not_crashed_on():
    errs = errors_of('[upstreams.u]\nprovider = "openai"\n[[routes]]\nmatch = "m"\n[[keys]]\nkey_env = "X"\n')
    assert "upstreams.u.base_url: required" in errs
    assert "routes[0].deployments: required" in errs
    assert "keys[0].name: required" in errs


def test_toml_syntax_error_names_the_file():
    errs = errors_of("[server\nport = 1\n")
    assert 1 == len(errs)
    assert errs[0].startswith("t.toml: TOML syntax:")


def test_unreadable_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError) as info:
        load(tmp_path / "missing.toml")
    assert "cannot read" in info.value.errors[0]


# ------------------------------------------------------------------ GATEWAY_* overrides


def test_env_overrides_every_level_with_toml_literals():
    env = {
        "GATEWAY_SERVER__PORT": "9000",
        "GATEWAY_SERVER__HOST": "0.0.0.0",
        "GATEWAY_SERVER__DRAIN_SECONDS": "2.5",
        "GATEWAY_LOG__ACCESS_LOG": "false",
        "GATEWAY_LOG__LEVEL": "debug",
        "GATEWAY_UPSTREAMS__U__IDLE_TIMEOUT": "7",
        "GATEWAY_UPSTREAMS__U__BREAKER__FAILURE_THRESHOLD": "2",
        "GATEWAY_REDIS__FAILURE_MODE": "closed",
        "GATEWAY_DATABASE_URL": "not an override (no double underscore)",
        "OTHER__SERVER__PORT": "1",
    }
    cfg = parse(UPSTREAM + "[server]\nport = 8000\n", environ=env)
    assert 9000 == cfg.server.port
    assert "0.0.0.0" == cfg.server.host
    assert 2.5 == cfg.server.drain_seconds
    assert cfg.log.access_log is False
    assert "debug" == cfg.log.level
    assert 7.0 == cfg.upstreams["u"].idle_timeout
    assert 2 == cfg.upstreams["u"].breaker.failure_threshold
    assert "closed" == cfg.redis.failure_mode


def test_env_override_can_add_a_whole_upstream():
    env = {"GATEWAY_UPSTREAMS__EXTRA__PROVIDER": "anthropic", "GATEWAY_UPSTREAMS__EXTRA__BASE_URL": "https://a.example"}
    cfg = parse("", environ=env)
    assert "https://a.example" == cfg.upstreams["extra"].base_url


def test_env_overrides_are_validated_like_the_file():
    errs = errors_of("", {"GATEWAY_SERVER__PORT": "99999", "GATEWAY_SERVER__WORKRES": "2", "GATEWAY_LOG__LEVEL": "7"})
    assert "server.port: must be 0..65535 (from GATEWAY_SERVER__PORT)" in errs
    assert "server.workres: unknown key (from GATEWAY_SERVER__WORKRES)" in errs
    assert any(e.startswith("log.level: must be one of") and e.endswith("(from GATEWAY_LOG__LEVEL)") for e in errs)


def test_env_override_into_a_scalar_is_an_error():
    errs = errors_of("[server]\nport = 1\n", {"GATEWAY_SERVER__PORT__X": "1"})
    assert ["GATEWAY_SERVER__PORT__X: server.port.x is not a table"] == errs


# ------------------------------------------------------------------ check-config


def test_check_config_ok_exits_0(tmp_path):
    r = check_config(EXAMPLE)
    assert 0 == r.returncode, r.stderr
    assert r.stdout.startswith(f"ok: {EXAMPLE}")


def test_check_config_lists_every_error_and_exits_1(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[server]\nport = -1\nbogus = 1\n[[routes]]\nmatch = "x"\ndeployments = [{ upstream = "nope" }]\n')
    r = check_config(bad, {"GATEWAY_LOG__LEVEL": "shout"})
    assert 1 == r.returncode
    lines = r.stderr.strip().splitlines()
    assert "4 error(s) in configuration:" == lines[0]
    assert {
        "server.bogus: unknown key",
        "log.level: must be one of 'debug', 'info', 'warning', 'error', got 'shout' (from GATEWAY_LOG__LEVEL)",
        "server.port: must be 0..65535",
        "routes[0].deployments[0].upstream: unknown upstream 'nope'",
    } == {line.strip() for line in lines[1:]}
    assert "" == r.stdout


def test_check_config_reports_a_bad_price_table(tmp_path):
    prices = tmp_path / "prices.toml"
    prices.write_text("[models.x]\ninput = 'free'\n")
    cfg = tmp_path / "gw.toml"
    cfg.write_text(f'[pricing]\nfile = "{prices}"\n')
    r = check_config(cfg)
    assert 1 == r.returncode
    assert "error(s) in configuration" in r.stderr


def test_serve_refuses_an_invalid_config(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[server]\nport = -1\n")
    r = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--config", str(bad)],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )
    assert 2 == r.returncode
    assert "server.port: must be 0..65535" in r.stderr
