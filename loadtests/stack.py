#!/usr/bin/env python3
"""The load-test runner: start a local stack, run k6 scripts against it, stop everything.

    loadtests/run.sh gateway-smoke.js [more scripts...] [-- extra k6 args]
    make loadtest SCRIPT=gateway-load.js

What it starts, all on 127.0.0.1 on free ports, all stopped at the end (also
on failure or Ctrl-C):
  * a throwaway Postgres cluster and Redis (tests/fixtures/servers.py), the
    migrations applied;
  * ``llm-gateway serve`` with every worker (one per core unless WORKERS is
    set) and its bundled mock upstream with a realistic latency;
  * the test user and key, created through the admin API
    (setup_test_user.py), or a config-file key when there is no admin API.

Then, for each script: ``k6 run`` with BASE_URL, API_KEY, ACCESS_KEY and
DURATION_SCALE, and afterwards a /metrics snapshot.  Everything lands in
``loadtests/results/<UTC time>-<script>/``: summary.txt (k6's end-of-test
summary), summary.json, k6.json.gz (every data point), gateway.log,
metrics.txt and stack.json; ``loadtests/results/latest`` points at the last one.

Environment knobs: DURATION_SCALE (1), WORKERS (0 = per core),
MOCK_LATENCY_MS (100: non-streamed answer time), MOCK_TTFT_MS (100),
MOCK_CHUNK_GAP_MS (5), MOCK_CHUNKS (20), LOADTEST_LOG_LEVEL (info),
K6_JSON (1: write k6.json.gz), RESULTS_DIR (loadtests/results).
Exit status: 0 when every script passed its thresholds, else the first failure's.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import signal
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from setup_test_user import EMAIL as LOADTEST_EMAIL  # noqa: E402
from setup_test_user import AdminApiMissing, create_key  # noqa: E402

from tests.fixtures.servers import PostgresServer, RedisServer, free_port, wait_port  # noqa: E402

VENV_BIN = Path(sys.executable).parent
GATEWAY = str(VENV_BIN / "llm-gateway")
K6 = str(VENV_BIN / "k6")


def log(msg: str) -> None:
    print(f"[loadtest] {msg}", flush=True)


def _show(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def env_num(name: str, default: float) -> float:
    raw = os.environ.get(name, "")
    return float(raw) if raw else default


def gateway_config(port: int, mock_port: int, workers: int, journal: Path, fallback_key: str) -> str:
    prices = ROOT / "config" / "prices.toml"
    mock = f"http://127.0.0.1:{mock_port}"
    return textwrap.dedent(f"""\
        # Written by loadtests/stack.py for one load-test run.
        [server]
        host = "127.0.0.1"
        port = {port}
        workers = {workers}
        drain_seconds = 10
        forward_headers = ["x-mock-*"]  # MOCK_LATENCY_MS / MOCK_TTFT_MS reach the mock as headers

        [log]
        level = "{os.environ.get('LOADTEST_LOG_LEVEL', 'info')}"

        [pricing]
        file = "{prices}"

        [accounting]
        journal_dir = "{journal}"

        [mock_upstream]
        enabled = true
        host = "127.0.0.1"
        port = {mock_port}
        latency_ms = {env_num('MOCK_LATENCY_MS', 100)}
        ttft_ms = {env_num('MOCK_TTFT_MS', 100)}
        chunk_gap_ms = {env_num('MOCK_CHUNK_GAP_MS', 5)}
        chunks = {int(env_num('MOCK_CHUNKS', 20))}

        [upstreams.mock-anthropic]
        provider = "anthropic"
        base_url = "{mock}"
        max_connections = 1024

        [upstreams.mock-openai]
        provider = "openai"
        base_url = "{mock}"
        max_connections = 1024

        [[routes]]
        match = "demo-*"
        deployments = [{{ upstream = "mock-anthropic" }}, {{ upstream = "mock-openai" }}]

        # Used only when the gateway has no admin API (standalone mode).
        [[keys]]
        name = "loadtest"
        user = "loadtest"
        key_sha256 = "{hashlib.sha256(fallback_key.encode()).hexdigest()}"
        limits = {{ models = ["demo-claude*", "demo-gpt*", "demo-embed*"] }}
        """)


def _get(url: str, timeout: float = 10.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def _post_json(url: str, body: dict[str, Any], headers: dict[str, str]) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"content-type": "application/json", **headers})
    try:
        with urllib.request.urlopen(req, timeout=15) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


class Stack:
    def __init__(self, out: Path) -> None:
        self.out = out
        self.pg: PostgresServer | None = None
        self.redis: RedisServer | None = None
        self.gateway: subprocess.Popen[bytes] | None = None
        self._gateway_log: Any = None
        self.base_url = ""
        self.api_key = ""
        self.admin_token = ""
        self.password = ""
        self.key_source = ""
        self.info: dict[str, Any] = {}

    def start(self) -> None:
        t0 = time.monotonic()
        self.pg = PostgresServer()
        self.pg.start()
        dsn = self.pg.create_database("llm_gateway")
        self.redis = RedisServer()
        self.redis.start()
        admin_token = secrets.token_urlsafe(32)
        fallback_key = "gwk_loadtest_" + secrets.token_urlsafe(32)
        env = {
            **os.environ,
            "GATEWAY_DATABASE_URL": dsn,
            "GATEWAY_REDIS_URL": self.redis.url,
            "GATEWAY_ADMIN_TOKEN": admin_token,
            "GATEWAY_JWT_SECRET": secrets.token_urlsafe(48),
        }
        env.pop("GATEWAY_CONFIG", None)
        self._migrate(env)

        port, mock_port = free_port(), free_port()
        workers = int(env_num("WORKERS", 0))
        cfg_path = self.out / "gateway.toml"
        cfg_path.write_text(gateway_config(port, mock_port, workers, self.out / "journal", fallback_key))
        env["GATEWAY_CONFIG"] = str(cfg_path)
        self._gateway_log = open(self.out / "gateway.log", "wb")  # noqa: SIM115
        self.gateway = subprocess.Popen(
            [GATEWAY, "serve", "--config", str(cfg_path)],
            stdout=self._gateway_log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
            start_new_session=True,  # Ctrl-C reaches the runner only; it stops the gateway in order
        )
        self.base_url = f"http://127.0.0.1:{port}"
        self._wait_serving()
        wait_port(mock_port)

        self.admin_token = admin_token
        try:
            self.password = secrets.token_urlsafe(18)
            self.api_key = create_key(self.base_url, admin_token, email=LOADTEST_EMAIL, password=self.password)
            self.key_source = "admin-api"
        except AdminApiMissing as exc:
            log(f"no admin API ({exc}): using the config-file key")
            self.api_key, self.key_source, self.password = fallback_key, "config", ""
        self._check_key()
        self.info = {
            "base_url": self.base_url, "postgres_port": self.pg.port, "redis_port": self.redis.port,
            "mock_port": mock_port, "gateway_pid": self.gateway.pid, "workers": workers or os.cpu_count(),
            "key_source": self.key_source, "started_in_s": round(time.monotonic() - t0, 2),
        }
        (self.out / "stack.json").write_text(json.dumps(self.info, indent=2) + "\n")
        log(f"stack up in {self.info['started_in_s']} s: gateway {self.base_url} "
            f"({self.info['workers']} workers), key from {self.key_source}")

    def _migrate(self, env: dict[str, str]) -> None:
        help_text = subprocess.run([GATEWAY, "--help"], capture_output=True, text=True, env=env).stdout
        if "migrate" not in help_text:
            log("no 'llm-gateway migrate' command yet: skipping migrations")
            return
        r = subprocess.run([GATEWAY, "migrate"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"llm-gateway migrate failed:\n{r.stdout}{r.stderr}")
        log("migrations applied")

    def _wait_serving(self, timeout: float = 60.0) -> None:
        assert self.gateway is not None
        path = self.out / "gateway.log"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.gateway.poll() is not None:
                raise RuntimeError(f"llm-gateway serve exited {self.gateway.returncode}; see {path}")
            if b'"gateway serving"' in path.read_bytes():
                return
            time.sleep(0.1)
        raise RuntimeError(f"llm-gateway serve not ready after {timeout} s; see {path}")

    def _check_key(self) -> None:
        status, body = _post_json(
            self.base_url + "/v1/messages",
            {"model": "demo-claude", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]},
            {"x-api-key": self.api_key, "anthropic-version": "2023-06-01"},
        )
        if status != 200:
            raise RuntimeError(f"the test key does not work: {status} {body[:300]!r}")

    def snapshot(self, dest: Path) -> None:
        with contextlib.suppress(OSError):
            status, body = _get(self.base_url + "/metrics")
            if status == 200:
                (dest / "metrics.txt").write_bytes(body)
            status, body = _get(self.base_url + "/readyz")
            (dest / "readyz.json").write_bytes(body)

    def stop(self) -> None:
        if self.gateway is not None and self.gateway.poll() is None:
            self.gateway.send_signal(signal.SIGTERM)
            try:
                self.gateway.wait(timeout=40)
            except subprocess.TimeoutExpired:
                log("gateway did not stop in 40 s: killing it")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.gateway.pid, signal.SIGKILL)
                self.gateway.wait()
        if self._gateway_log is not None:
            self._gateway_log.close()
        if self.redis is not None:
            self.redis.destroy()
        if self.pg is not None:
            self.pg.destroy()


def run_k6(stack: Stack, script: Path, out: Path, k6_args: list[str]) -> int:
    scale = os.environ.get("DURATION_SCALE", "1")
    cmd = [
        K6, "run", "--no-color", "--quiet",
        "-e", f"BASE_URL={stack.base_url}", "-e", f"API_KEY={stack.api_key}", "-e", f"ACCESS_KEY={stack.api_key}",
        "-e", f"DURATION_SCALE={scale}", "-e", f"LATENCY_GATES={os.environ.get('LATENCY_GATES', '1')}",
        "--summary-export", str(out / "summary.json"),
        "--summary-trend-stats", "avg,min,med,max,p(90),p(95),p(99)",
    ]
    if os.environ.get("K6_JSON", "1") != "0":
        cmd += ["--out", f"json={out / 'k6.json.gz'}"]
    if stack.key_source == "admin-api":  # the control-plane scenarios (/auth/login, /admin/*)
        cmd += ["-e", f"ADMIN_TOKEN={stack.admin_token}", "-e", f"LOADTEST_EMAIL={LOADTEST_EMAIL}",
                "-e", f"LOADTEST_PASSWORD={stack.password}"]
    cmd += [*k6_args, str(script)]
    log(f"k6 run {script.relative_to(HERE)} (DURATION_SCALE={scale}) -> {_show(out)}")
    env = {**os.environ, "K6_NO_USAGE_REPORT": "true"}
    with open(out / "summary.txt", "wb") as summary:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=HERE)
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                # The API key is in k6's arguments, never in its output; keep it that way in the files.
                for secret in (stack.api_key, stack.admin_token, stack.password):
                    if secret:
                        line = line.replace(secret.encode(), b"***")
                sys.stdout.buffer.write(line)
                sys.stdout.flush()
                summary.write(line)
            code = proc.wait()
        finally:
            if proc.poll() is None:  # interrupted: k6 stops and writes what it has
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    log(f"k6 exited {code}" + (" (thresholds failed)" if code == 99 else ""))
    return code


def main(argv: list[str]) -> int:
    if "--" in argv:
        i = argv.index("--")
        scripts, k6_args = argv[:i], argv[i + 1:]
    else:
        scripts, k6_args = argv, []
    if not scripts or any(s in ("-h", "--help") for s in scripts):
        print(__doc__)
        return 2
    paths = []
    for s in scripts:
        p = (HERE / s) if not Path(s).is_absolute() else Path(s)
        if not p.exists() and (Path.cwd() / s).exists():
            p = (Path.cwd() / s).resolve()
        if not p.exists():
            print(f"error: no such script: {s}", file=sys.stderr)
            return 2
        paths.append(p.resolve())

    results = Path(os.environ.get("RESULTS_DIR", HERE / "results")).resolve()
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    run_dir = results / f"{stamp}-{'+'.join(p.stem for p in paths)}"
    run_dir.mkdir(parents=True, exist_ok=True)
    latest = results / "latest"
    with contextlib.suppress(OSError):
        if latest.is_symlink() or latest.exists():
            latest.unlink()
        latest.symlink_to(run_dir.name)

    def _terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)
    stack = Stack(run_dir)
    first_failure = 0
    try:
        stack.start()
        for p in paths:
            out = run_dir if len(paths) == 1 else run_dir / p.stem
            out.mkdir(exist_ok=True)
            code = run_k6(stack, p, out, k6_args)
            stack.snapshot(out)
            if code and not first_failure:
                first_failure = code
    except KeyboardInterrupt:
        log("interrupted: stopping the stack")
        first_failure = first_failure or 130
    except Exception as exc:
        log(f"error: {exc}")
        gw_log = run_dir / "gateway.log"
        if gw_log.exists():
            tail = gw_log.read_text(errors="replace").splitlines()[-20:]
            log("last lines of gateway.log:\n" + "\n".join(tail))
        first_failure = first_failure or 1
    finally:
        stack.stop()
        log(f"stack stopped; results in {_show(run_dir)}")
    return first_failure


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
