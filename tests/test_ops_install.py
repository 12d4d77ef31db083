"""A release as it is installed: `pip install .` (not editable) into a fresh virtualenv.

It must carry its SQL migrations, default configuration and prices (they live
at the top of the repository, so a wheel has to ship copies), migrate a real
Postgres and check its default configuration from anywhere; and `migrate`
must fail loudly, never say "up to date", when it finds no migrations.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import asyncpg
import pytest

ROOT = Path(__file__).resolve().parent.parent
MIGRATIONS = sorted(p.name for p in (ROOT / "migrations").glob("*.sql"))


def _sources(dest: Path) -> Path:
    """The files a release is built from (tracked or new, not ignored): no .venv, no build leftovers."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True, timeout=60).stdout.split()
    for rel in listed:
        src = ROOT / rel
        if src.is_file() and not rel.startswith(("tests/", "loadtests/")):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`pip install --no-deps .` into a new virtualenv; run-time dependencies come from this checkout's .venv
    (a .pth line: that directory's own .pth files, such as the editable install's, are not read)."""
    base = tmp_path_factory.mktemp("release")
    src = _sources(base / "src")
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = Path(subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               capture_output=True, text=True, check=True, timeout=60).stdout.strip())
    (site / "deps-from-dev-venv.pth").write_text(sysconfig.get_path("purelib") + "\n")
    # As a release is built: `pip install .` with build isolation (setuptools from the configured index).
    r = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", str(src)],
                       capture_output=True, text=True, timeout=600, cwd=base)
    assert 0 == r.returncode, r.stdout + r.stderr
    shutil.rmtree(src)  # nothing of the source tree is left to lean on
    return venv


def _run(venv: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {"PATH": "/usr/bin:/bin", "HOME": str(venv), **(env or {})}
    return subprocess.run([str(venv / "bin" / "llm-gateway"), *args], capture_output=True, text=True,
                          timeout=120, cwd=venv, env=clean)


@pytest.mark.slow
def test_installed_release_ships_its_default_config_and_prices(release: Path) -> None:
    """check-config on the installed default (what ExecStartPre runs) passes, from the package's own copy."""
    r = _run(release, "check-config")
    assert 0 == r.returncode, r.stdout + r.stderr
    m = re.match(r"ok: (\S+) ", r.stdout)
    assert m is not None, r.stdout
    installed = Path(m.group(1))
    assert installed.is_relative_to(release), f"the default config must come from the install, not {installed}"
    assert (installed.parent / "prices.toml").is_file()


@pytest.mark.slow
async def test_installed_release_migrates_a_database_printing_each_migration_once(release: Path, pg_dsn: str) -> None:
    r = _run(release, "migrate", env={"GATEWAY_DATABASE_URL": pg_dsn})
    assert 0 == r.returncode, r.stdout + r.stderr
    out = r.stdout + r.stderr
    for name in MIGRATIONS:
        assert 1 == out.count(name), f"{name} must be reported exactly once:\n{out}"
    assert f"schema up to date ({len(MIGRATIONS)} applied)" in r.stdout
    conn = await asyncpg.connect(pg_dsn)
    try:
        applied = {row["name"] for row in await conn.fetch("SELECT name FROM schema_migrations")}
    finally:
        await conn.close()
    assert set(MIGRATIONS) == applied
    again = _run(release, "migrate", env={"GATEWAY_DATABASE_URL": pg_dsn})
    assert 0 == again.returncode and "(0 applied)" in again.stdout


@pytest.mark.slow
async def test_migrate_with_no_migrations_fails_loudly(release: Path, pg_dsn: str, tmp_path: Path) -> None:
    """An empty migrations directory is an incomplete install: exit 1 with the reason, nothing applied."""
    empty = tmp_path / "empty"
    empty.mkdir()
    r = _run(release, "migrate", "--dir", str(empty), env={"GATEWAY_DATABASE_URL": pg_dsn})
    assert 1 == r.returncode, r.stdout + r.stderr
    assert "no migrations found in" in r.stderr and str(empty) in r.stderr
    assert "up to date" not in r.stdout
    assert "Traceback" not in r.stderr
    conn = await asyncpg.connect(pg_dsn)
    try:
        assert await conn.fetchval("SELECT to_regclass('users') IS NULL")
    finally:
        await conn.close()


def test_journal_defaults_to_the_state_directory_under_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    """systemd sets $STATE_DIRECTORY (StateDirectory=); the unit's /tmp is private and wiped (PrivateTmp)."""
    from gateway.config import parse

    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/llm-gateway")
    assert "/var/lib/llm-gateway/journal" == parse("").accounting.journal_dir
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/a:/var/lib/b")
    assert "/var/lib/a/journal" == parse("").accounting.journal_dir
    monkeypatch.delenv("STATE_DIRECTORY")
    assert parse("").accounting.journal_dir.startswith("/tmp/")
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/llm-gateway")
    assert "/srv/j" == parse('[accounting]\njournal_dir = "/srv/j"\n').accounting.journal_dir


def test_the_readme_systemd_install_gives_a_config_that_passes_exec_start_pre(tmp_path: Path) -> None:
    """Follow the README's `install ... /etc/llm-gateway/...` lines into a scratch /etc, then run the
    unit's ExecStartPre (check-config) on the result: every file the config refers to must be there."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Install under systemd"):]
    section = section[: section.index("\n### ", 5)]
    etc = tmp_path / "etc-llm-gateway"
    etc.mkdir()
    copies = re.findall(r"^install -m \d+ (config/\S+) /etc/llm-gateway/(\S+)", section, re.M)
    assert copies, "the README's install copies the configuration into /etc/llm-gateway"
    for src, name in copies:
        shutil.copy2(ROOT / src, etc / name)
    unit = (ROOT / "systemd" / "llm-gateway.service").read_text()
    config = re.search(r"^Environment=GATEWAY_CONFIG=(\S+)$", unit, re.M)
    assert config is not None and config.group(1).startswith("/etc/llm-gateway/")
    assert re.search(r"^ExecStartPre=\S+/llm-gateway check-config$", unit, re.M)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env["GATEWAY_CONFIG"] = str(etc / Path(config.group(1)).name)
    r = subprocess.run([sys.executable, "-m", "gateway", "check-config"], capture_output=True, text=True,
                       env=env, cwd=tmp_path, timeout=60)
    assert 0 == r.returncode, r.stdout + r.stderr
