"""The shipped systemd units: they verify, and their sandbox rates as hardened."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNITS = ("llm-gateway.service", "llm-gateway-migrate.service")
INSTALL_PREFIX = "/opt/llm-gateway/current"


@pytest.fixture
def installed_units(tmp_path: Path) -> Path:
    """The units as installed: the release prefix points at this checkout's virtualenv."""
    release = tmp_path / "release"
    release.mkdir()
    (release / ".venv").symlink_to(ROOT / ".venv")
    units = tmp_path / "units"
    units.mkdir()
    for name in UNITS:
        text = (ROOT / "systemd" / name).read_text()
        assert INSTALL_PREFIX in text
        (units / name).write_text(text.replace(INSTALL_PREFIX, str(release)))
    return units


def test_units_pass_systemd_analyze_verify(installed_units: Path) -> None:
    """systemd-analyze verify accepts both units with no warning about them."""
    assert shutil.which("systemd-analyze"), "scripts/setup.sh installs systemd for systemd-analyze"
    r = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *(str(installed_units / n) for n in UNITS)],
        capture_output=True, text=True, timeout=60,
    )
    ours = [line for line in (r.stdout + r.stderr).splitlines() if "llm-gateway" in line]
    assert 0 == r.returncode, r.stderr
    assert [] == ours


@pytest.mark.parametrize("unit", UNITS)
def test_units_sandbox_exposure_is_low(installed_units: Path, unit: str) -> None:
    """systemd-analyze security (offline) rates each unit's exposure at most 2.0 of 10."""
    r = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--no-pager", str(installed_units / unit)],
        capture_output=True, text=True, timeout=60,
    )
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", r.stdout)
    assert m is not None, r.stdout + r.stderr
    assert float(m.group(1)) <= 2.0, r.stdout


def test_service_stop_timeout_outlasts_the_drain() -> None:
    """TimeoutStopSec is longer than the default drain grace plus the supervisor's 10 s cleanup."""
    from gateway.config import ServerConfig

    text = (ROOT / "systemd" / "llm-gateway.service").read_text()
    m = re.search(r"^TimeoutStopSec=(\d+)$", text, re.M)
    assert m is not None
    assert int(m.group(1)) > ServerConfig().drain_seconds + 10
    assert re.search(r"^Type=notify$", text, re.M)
    assert re.search(r"^ExecReload=/bin/kill -HUP \$MAINPID$", text, re.M)


def test_env_example_names_every_secret_the_default_config_reads() -> None:
    """The environment-file example documents the database, Redis, admin, JWT and provider key variables."""
    from gateway.config import AuthConfig, DatabaseConfig, RedisConfig

    text = (ROOT / "systemd" / "llm-gateway.env.example").read_text()
    for name in (DatabaseConfig().url_env, RedisConfig().url_env, AuthConfig().bootstrap_admin_token_env,
                 AuthConfig().jwt_secret_env, "ANTHROPIC_API_KEY", "OPENAI_API_KEY"):
        assert re.search(rf"^{name}=", text, re.M), name
