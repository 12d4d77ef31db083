#!/usr/bin/env python3
"""Deterministic cost per request: Python calls and syscalls, not only time.

Time on these shared 2-core machines varies 2-7x from one day to the next; the
work a request costs does not.  This bench counts it, for three targets served
from the same nginx mock in the same run:

  * ``passthrough``: loadtests/passthrough.py, a minimal aiohttp + uvloop
    pass-through with no policy (the reference every ratio is taken against);
  * ``standalone``: ``llm-gateway serve --workers 1``, key from the config
    file, usage to the log (the embedded default's shape);
  * ``governed``: the same in database mode, as users run it: a key created
    through the admin API and cached from Postgres, limits and a budget in
    Redis (one script call), usage through the journal into the Postgres ledger.

For each target and kind it reports, per request:
  * calls: Python function calls plus calls of C functions, as cProfile counts them (cProfile in the serving process, enabled
    from a ``sitecustomize`` shim; a snapshot is taken on SIGUSR1 between
    batches, so start-up and warm-up cancel out: (after N2) - (after N1) over N2);
  * syscalls (``strace -f -c`` attached for a batch of N1 and one of N2;
    (S2 - S1) / (N2 - N1));
  * CPU-us (utime+stime from /proc over an unprofiled batch);
and per stream event: (paced - json) / events in the stream, since a paced
stream arrives as separate reads like a real provider's.

A gateway target may name its worker count (``standalone/2``): every count is
then summed over its workers, and the report projects the N-worker throughput
ratio from the instructions (N x one worker's per request / N workers' per
request; what N free cores would give, as long as the load spreads: each
worker's share of the batch is printed).  It cannot be timed on a 2-core
machine that also runs the load generator and the mock.

Usage: .venv/bin/python loadtests/bench_counts.py [--targets passthrough,standalone,standalone/2,governed]
           [--kinds openai-json,anthropic-json,openai-paced,anthropic-paced] [--n1 200 --n2 600]
           [--no-strace] [--gateway-src DIR] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench
import setup_test_user
from bench import ALL_KINDS, HOST, LONG_EXTRA, ROOT, Kind, children
from setup_test_user import create_key

from tests.fixtures.servers import PostgresServer, RedisServer, free_port, wait_port

CLK_TCK = os.sysconf("SC_CLK_TCK")

SHIM = '''
import os, signal, sys
if os.environ.get("BENCH_DROP_EDITABLE"):
    # Another checkout's gateway (PYTHONPATH): the editable install's finder would win over it.
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__module__.lower()]
_dir = os.environ.get("BENCH_COUNTS_DIR")
_who = os.environ.get("BENCH_COUNTS_ARGV", "")
if _dir and _who and _who in sys.argv:
    import cProfile
    _prof = cProfile.Profile()

    def _snapshot(signum, frame):
        _prof.disable()
        _prof.create_stats()
        py = c = 0
        for (filename, _line, _name), (_cc, nc, _tt, _ct, _callers) in _prof.stats.items():
            if filename == "~":
                c += nc
            else:
                py += nc
        tmp = os.path.join(_dir, f"{os.getpid()}.tmp")
        import gc
        gens = " ".join(str(g["collections"]) for g in gc.get_stats())
        with open(tmp, "w") as f:
            f.write(f"{py} {c} {gens}\\n")
        if os.environ.get("BENCH_COUNTS_DUMP"):
            import marshal
            flat = {f"{fn}:{line}({name})": v[1] for (fn, line, name), v in _prof.stats.items()}
            with open(os.path.join(_dir, f"{os.getpid()}.stats"), "wb") as f:
                marshal.dump(flat, f)
            _prof.dump_stats(os.path.join(_dir, f"{os.getpid()}.pstats"))
        os.replace(tmp, os.path.join(_dir, f"{os.getpid()}.calls"))
        _prof.enable()

    if os.environ.get("BENCH_COUNTS_OPCODES"):
        # --opcodes: Python bytecode instructions executed per function (sys.settrace with
        # f_trace_opcodes), reported through the same snapshot files as the calls.
        import collections
        import threading
        _ops = collections.Counter()

        _lines_of = os.environ.get("BENCH_COUNTS_LINES", "")  # --lines NAME: by line, in functions NAME

        def _local(frame, event, arg):
            if event == "opcode":
                code = frame.f_code
                _ops[code] += 1
                if _lines_of and code.co_name == _lines_of:
                    _ops[(code.co_filename, frame.f_lineno, code.co_name)] += 1
            return _local

        def _global(frame, event, arg):
            frame.f_trace_opcodes = True
            return _local

        def _snapshot(signum, frame):
            sys.settrace(None)
            import gc
            gens = " ".join(str(g["collections"]) for g in gc.get_stats())
            tmp = os.path.join(_dir, f"{os.getpid()}.tmp")
            with open(tmp, "w") as f:
                f.write(f"{sum(v for k, v in _ops.items() if not isinstance(k, tuple))} 0 {gens}\\n")
            if os.environ.get("BENCH_COUNTS_DUMP"):
                import marshal
                flat = {}
                for code, n in _ops.items():
                    if isinstance(code, tuple):  # (file, line, name) of --lines
                        k = f"{code[0]}:{code[1]}(line of {code[2]})"
                    else:
                        k = f"{code.co_filename}:{code.co_firstlineno}({code.co_name})"
                    flat[k] = flat.get(k, 0) + n
                with open(os.path.join(_dir, f"{os.getpid()}.stats"), "wb") as f:
                    marshal.dump(flat, f)
            os.replace(tmp, os.path.join(_dir, f"{os.getpid()}.calls"))
            sys.settrace(_global)

        _prof.enable = lambda: (sys.settrace(_global), threading.settrace(_global))

    signal.signal(signal.SIGUSR1, _snapshot)
    _prof.enable()

_lag_dir = os.environ.get("BENCH_LAG_DIR")
if _lag_dir and _who and _who in sys.argv:
    # --lag: how late the event loop runs a 1 ms timer, and why: the process waited for a CPU
    # (its run_delay in /proc/self/schedstat grew), a garbage collection ran, or the loop was busy
    # with our own work.  Cumulative, written every second to <dir>/<pid>.lag (JSON).
    import asyncio, gc, json, time
    import uvloop
    _run = uvloop.run
    _st = {"ticks": 0, "late_ms": [0] * 8, "class_n": {"runqueue": 0, "gc": 0, "busy": 0},
           "class_ms": {"runqueue": 0.0, "gc": 0.0, "busy": 0.0}, "worst": [], "gc_ms": 0.0, "gc_max_ms": 0.0}
    _BOUNDS = (0.5, 1, 2, 3, 5, 10, 20)  # ms: late_ms[i] counts ticks late by less than _BOUNDS[i]
    _gc = {"t": 0.0, "in_window": 0.0}

    def _gc_cb(phase, info):
        if phase == "start":
            _gc["t"] = time.perf_counter()
        else:
            d = (time.perf_counter() - _gc["t"]) * 1000
            _gc["in_window"] += d
            _st["gc_ms"] += d
            _st["gc_max_ms"] = max(_st["gc_max_ms"], d)

    gc.callbacks.append(_gc_cb)
    _sched = os.open("/proc/self/schedstat", os.O_RDONLY)

    def _run_delay():
        return int(os.pread(_sched, 100, 0).split()[1]) / 1e6  # ms

    def _monitor(loop):
        state = {"due": loop.time() + 0.001, "rd": _run_delay(), "written": time.monotonic()}

        def tick():
            now = loop.time()
            late = (now - state["due"]) * 1000
            rd = _run_delay()
            _st["ticks"] += 1
            i = 0
            while i < len(_BOUNDS) and late >= _BOUNDS[i]:
                i += 1
            _st["late_ms"][i] += 1
            if late >= 2:
                waited, collected = rd - state["rd"], _gc["in_window"]
                why = "runqueue" if waited >= late / 2 else "gc" if collected >= late / 2 else "busy"
                _st["class_n"][why] += 1
                _st["class_ms"][why] += late
                _st["worst"] = sorted([*_st["worst"], [round(late, 2), why, round(waited, 2), round(collected, 2)]],
                                      reverse=True)[:10]
            state["rd"] = rd
            _gc["in_window"] = 0.0
            state["due"] = loop.time() + 0.001
            if time.monotonic() - state["written"] >= 1.0:
                state["written"] = time.monotonic()
                tmp = os.path.join(_lag_dir, f"{os.getpid()}.tmp")
                with open(tmp, "w") as f:
                    json.dump(_st, f)
                os.replace(tmp, os.path.join(_lag_dir, f"{os.getpid()}.lag"))
            loop.call_at(state["due"], tick)

        loop.call_at(state["due"], tick)

    def _run_with_monitor(main, **kw):
        async def wrapped():
            _monitor(asyncio.get_running_loop())
            return await main
        return _run(wrapped(), **kw)

    uvloop.run = _run_with_monitor
'''



@dataclass
class Target:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    key: str
    serving_pids: list[int] = field(default_factory=list)

    def url(self, kind: Kind) -> str:
        if self.name == "passthrough":
            return f"http://{HOST}:{self.port}{kind.mock_path}"
        return f"http://{HOST}:{self.port}{kind.path}"


class Bench:
    def __init__(self, tmp: Path, gateway_src: str) -> None:
        self.tmp = tmp
        self.stack = bench.Stack(tmp=tmp, gateway_src=gateway_src)
        self.counts_dir = tmp / "counts"
        self.counts_dir.mkdir()
        self.shim_dir = tmp / "shim"
        self.shim_dir.mkdir()
        (self.shim_dir / "sitecustomize.py").write_text(SHIM)
        self.default_src = gateway_src
        self.cg_dir = tmp / "callgrind"
        self.cg_dir.mkdir()
        self.lag_dir = tmp / "lag"
        self.lag_dir.mkdir()
        self.pg: PostgresServer | None = None
        self.redis: RedisServer | None = None
        self.extra: list[subprocess.Popen[bytes]] = []

    def _env(self, argv_marker: str, profile: bool, src: str = "") -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        paths = [str(self.shim_dir)]
        src = src or self.default_src
        if src:
            paths.insert(0, src)
            env["BENCH_DROP_EDITABLE"] = "1"
        env["PYTHONPATH"] = ":".join(paths)
        if LAG and not profile:
            env["BENCH_LAG_DIR"] = str(self.lag_dir)
            env["BENCH_COUNTS_ARGV"] = argv_marker
        if profile:
            env["BENCH_COUNTS_DIR"] = str(self.counts_dir)
            if TOP:
                env["BENCH_COUNTS_DUMP"] = "1"
            env["BENCH_COUNTS_ARGV"] = argv_marker
            if OPCODES:
                env["BENCH_COUNTS_OPCODES"] = "1"
                if LINES:
                    env["BENCH_COUNTS_LINES"] = LINES
        return env

    def start_mock(self) -> None:
        self.stack.mock_port = free_port()
        self.stack.mock = self.stack._start_nginx("mock", bench.LOADGEN_CPU, self.stack.mock_port)

    def start_passthrough(self, profile: bool) -> Target:
        port = free_port()
        script = ROOT / "loadtests" / "passthrough.py"
        cmd = ["taskset", "-c", bench.GATEWAY_CPU, *self.stack.cmd_prefix, sys.executable, str(script), str(port),
               f"http://{HOST}:{self.stack.mock_port}"]
        proc = subprocess.Popen(cmd, env=self._env(str(script), profile), stdout=subprocess.DEVNULL,
                                stderr=open(self.tmp / "passthrough.err", "ab"), start_new_session=True)  # noqa: SIM115
        self.extra.append(proc)
        wait_port(port, timeout=300 if self.stack.cmd_prefix else 30)
        return Target("passthrough", proc, port, "", [proc.pid])

    def _ensure_stores(self) -> dict[str, str]:
        if self.pg is None:
            self.pg = PostgresServer()
            self.pg.start()
            self.redis = RedisServer()
            self.redis.start()
            if STORES_CPU:
                # --stores-cpu: Postgres (every process of the cluster) and Redis on these CPUs, instead of
                # the load generator's (which they inherit from this process).
                assert self.redis.proc is not None
                pids = [self.redis.proc.pid]
                pids += [int(p) for p in subprocess.run(["pgrep", "-f", str(self.pg.datadir)], capture_output=True,
                                                        text=True).stdout.split()]
                for pid in pids:
                    subprocess.run(["taskset", "-a", "-p", "-c", STORES_CPU, str(pid)], check=True,
                                   capture_output=True)
        assert self.redis is not None
        dsn = self.pg.create_database("bench_" + secrets.token_hex(4))
        return {
            "GATEWAY_DATABASE_URL": dsn,
            "GATEWAY_REDIS_URL": self.redis.url,
            "GATEWAY_ADMIN_TOKEN": secrets.token_urlsafe(32),
            "GATEWAY_JWT_SECRET": secrets.token_urlsafe(48),
            "GATEWAY_ACCOUNTING__JOURNAL_DIR": str(self.tmp / f"journal-{secrets.token_hex(3)}"),
        }

    def start_gateway(self, governed: bool, profile: bool, src: str = "", label: str = "") -> Target:
        st = self.stack
        st.gw_port = free_port()
        st.overrides = {}
        if governed:
            st.overrides.update(self._ensure_stores())
            # The target's own migrations: another checkout (NAME@DIR) runs its schema, from DIR/migrations
            # (`git archive REV gateway migrations config | tar -x -C DIR`).
            env = {**self._env("migrate", False, src), **st.overrides}
            subprocess.run([sys.executable, "-m", "gateway", "migrate"], env=env, check=True,
                           capture_output=True, cwd=src or self.default_src or self.tmp)
        if st.cmd_prefix:
            # A worker under valgrind is ~50x slower: to start, and to answer the supervisor's pings.
            st.overrides["GATEWAY_SERVER__WORKER_PING_SECONDS"] = "600"
            if governed and TIMERS_X != 1:
                # Timed work (the ledger batch, the last-used flush) lands on ~50x fewer requests under
                # valgrind than at full speed: --cg-timers-x stretches its intervals by that much, so that
                # each batch covers as many requests as it would (both trees of a before/after alike).
                st.overrides["GATEWAY_ACCOUNTING__FLUSH_MS"] = str(int(200 * TIMERS_X))
                st.overrides["GATEWAY_DATABASE__LAST_USED_FLUSH_SECONDS"] = str(10.0 * TIMERS_X)
            config_py = Path(src or self.default_src or ROOT) / "gateway" / "config.py"
            if "worker_start_seconds" in config_py.read_text():  # an older checkout has a fixed 30 s
                st.overrides["GATEWAY_SERVER__WORKER_START_SECONDS"] = "900"
        env = self._env("worker", profile, src)
        st.overrides.update({k: v for k, v in env.items() if k == "PYTHONPATH" or k.startswith("BENCH_")})
        saved_src, st.gateway_src = st.gateway_src, ""  # our PYTHONPATH already carries it
        try:
            proc = st._start_gateway()
        finally:
            st.gateway_src = saved_src
        key = st.key
        if governed:
            setup_test_user.CALL_TIMEOUT = 900.0 if st.cmd_prefix else 15.0
            key = create_key(f"http://{HOST}:{st.gw_port}", st.overrides["GATEWAY_ADMIN_TOKEN"],
                             email=f"bench-{secrets.token_hex(3)}@example.com", models=["bench-*"])
            self._set_budget(st.overrides["GATEWAY_DATABASE_URL"])
        workers: list[int] = []
        deadline = time.monotonic() + 30
        while len(workers) < st.workers and time.monotonic() < deadline:
            workers = children(proc.pid)
            time.sleep(0.05)
        return Target(label or ("governed" if governed else "standalone"), proc, st.gw_port, key, workers)

    def _set_budget(self, dsn: str) -> None:
        """Give the governed key real limits, so every request runs the whole policy script."""
        import asyncpg

        async def go() -> None:
            conn = await asyncpg.connect(dsn)
            try:
                await conn.execute(
                    "UPDATE access_keys SET limits = limits || $1::jsonb",
                    json.dumps({"rpm": 10_000_000, "tpm": 10_000_000_000, "max_concurrency": 10_000,
                                "budget_usd": 1_000_000, "budget_period": "month"}),
                )
            finally:
                await conn.close()

        asyncio.run(go())

    def stop_target(self, t: Target) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(t.proc.pid, signal.SIGTERM)
        try:
            t.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(t.proc.pid, signal.SIGKILL)
            t.proc.wait()

    def stop(self) -> None:
        for p in self.extra:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
        self.stack.stop()
        if self.pg is not None:
            self.pg.destroy()
        if self.redis is not None:
            self.redis.destroy()

    # -- measurements
    def snapshot_stats(self, pid: int) -> dict[str, int]:
        """The per-function call counts of the last snapshot (with --top)."""
        import marshal

        path = self.counts_dir / f"{pid}.stats"
        if not path.exists():
            return {}
        with path.open("rb") as f:
            data: dict[str, int] = marshal.load(f)
        return data

    def snapshot_calls(self, pid: int) -> tuple[int, ...]:
        """Python calls, C calls, then the garbage collections of each generation so far."""
        out = self.counts_dir / f"{pid}.calls"
        out.unlink(missing_ok=True)
        os.kill(pid, signal.SIGUSR1)
        deadline = time.monotonic() + 30
        while not out.exists():
            if time.monotonic() > deadline:
                raise SystemExit(f"bench_counts: no call snapshot from pid {pid}")
            time.sleep(0.01)
        return tuple(int(v) for v in out.read_text().split())

    def snapshot_all(self, pids: list[int]) -> tuple[int, ...]:
        """``snapshot_calls`` summed over several workers."""
        snaps = [self.snapshot_calls(pid) for pid in pids]
        return tuple(sum(col) for col in zip(*snaps, strict=True))


async def _drive(url: str, kind: Kind, key: str, n: int, conc: int) -> None:
    body = kind.body()
    headers = kind.headers(key)
    done = 0
    failures: list[str] = []

    async def one(session: aiohttp.ClientSession) -> None:
        nonlocal done
        while done < n:
            done += 1
            async with session.post(url, data=body, headers=headers) as r:
                data = await r.read()
                if r.status != 200:
                    failures.append(f"{r.status} {data[:200]!r}")

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=conc)) as session:
        await asyncio.gather(*(one(session) for _ in range(conc)))
    if failures:
        raise SystemExit(f"bench_counts: {len(failures)} of {n} requests failed: {failures[0]}")


def drive(t: Target, kind: Kind, n: int, conc: int = 8) -> None:
    asyncio.run(_drive(t.url(kind), kind, t.key, n, conc))


def _file_safe(name: str) -> str:
    """A target's name (``standalone@/tmp/s1``, ``standalone/2``) as part of a file name."""
    return name.replace("@", "-at").replace("/", "_")


def count_calls(b: Bench, t: Target, kind: Kind, n1: int, n2: int) -> dict[str, float]:
    pid = t.serving_pids[0]  # its cProfile stats (--top); the counts are summed over every worker
    drive(t, kind, 50)  # warm-up: caches, pools, first-use imports
    s0 = b.snapshot_all(t.serving_pids)
    drive(t, kind, n1)
    s1 = b.snapshot_all(t.serving_pids)
    f1 = b.snapshot_stats(pid)
    keep = b.counts_dir / f"{pid}.pstats"
    if keep.exists() and KEEP:
        shutil.copy(keep, Path(KEEP) / f"{_file_safe(t.name)}-{kind.name}.before.pstats")
    drive(t, kind, n2)
    s2 = b.snapshot_all(t.serving_pids)
    f2 = b.snapshot_stats(pid)
    if f2 and TOP:
        print_top(t.name, kind.name, f1, f2, n2)
        if keep.exists() and KEEP:
            shutil.copy(keep, Path(KEEP) / f"{_file_safe(t.name)}-{kind.name}.pstats")
    return {
        "py_calls": (s2[0] - s1[0]) / n2,
        "c_calls": (s2[1] - s1[1]) / n2,
        "py_calls_check": (s1[0] - s0[0]) / n1,  # the same from the shorter batch: should agree
        # Garbage collections per 1,000 requests, youngest generation first (cProfile's own records
        # are not objects the collector tracks: the same collections as without it).
        "gc_per_1k": [round((b2 - b1) * 1000 / n2, 1) for b1, b2 in zip(s1[2:], s2[2:], strict=True)],
    }


TOP = 0
STORES_CPU = ""  # --stores-cpu: where Postgres and Redis run (default: the load generator's CPU)
LAG = False  # --lag: the serving processes monitor their event loop's lateness (with --rate)
LINES = ""  # --lines NAME (with --opcodes): also by line in the functions called NAME
OPCODES = False  # --opcodes: the "Python calls" columns count bytecode instructions instead
KEEP = ""
TIMERS_X = 1.0


def _short(key: str) -> str:
    for marker in ("site-packages/", "/gateway/", "/lib/python3"):
        i = key.find(marker)
        if i >= 0:
            return key[i + len(marker) if marker != "/gateway/" else i + 1:]
    return key


def print_top(target: str, kind: str, f1: dict[str, int], f2: dict[str, int], n: int) -> None:
    """Marginal calls per request by function and by package (``--top N``)."""
    diff = {k: (v - f1.get(k, 0)) / n for k, v in f2.items() if v - f1.get(k, 0) > 0}
    by_pkg: dict[str, float] = {}
    for k, v in diff.items():
        short = _short(k)
        pkg = "C builtins" if k.startswith("~") else short.split("/")[0].split(".py")[0]
        if pkg == "gateway":
            pkg = "/".join(short.split("/")[:2])
        by_pkg[pkg] = by_pkg.get(pkg, 0) + v
    print(f"\n== {target} {kind}: calls per request by package", file=sys.stderr)
    for pkg, v in sorted(by_pkg.items(), key=lambda kv: -kv[1]):
        if v >= 0.5:
            print(f"  {v:7.1f}  {pkg}", file=sys.stderr)
    print(f"== {target} {kind}: top {TOP} functions", file=sys.stderr)
    for k, v in sorted(diff.items(), key=lambda kv: -kv[1])[:TOP]:
        print(f"  {v:7.1f}  {_short(k)}", file=sys.stderr)


def _by_name(text: str) -> dict[str, int]:
    """strace -c's table: calls per syscall name."""
    out: dict[str, int] = {}
    for m in re.finditer(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?([a-z_0-9]+)$", text, re.M):
        if m.group(2) != "total":
            out[m.group(2)] = out.get(m.group(2), 0) + int(m.group(1))
    return out


def count_syscalls(b: Bench, t: Target, kind: Kind, n1: int, n2: int) -> dict[str, Any]:
    """Syscalls per request (marginal over two batch lengths), in all and by name."""
    pid = t.serving_pids[0]
    drive(t, kind, 50)
    totals = []
    names: list[dict[str, int]] = []
    attach = [arg for p in t.serving_pids for arg in ("-p", str(p))]
    for n in (n1, n2):
        out = b.tmp / f"strace-{pid}-{n}.txt"
        st = subprocess.Popen(["strace", "-f", "-c", "-o", str(out), *attach],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        assert st.stderr is not None
        # strace reports each attached thread on stderr: wait for the first.
        line = st.stderr.readline()
        if b"attached" not in line:
            raise SystemExit(f"bench_counts: strace did not attach: {line!r}")
        drive(t, kind, n)
        st.send_signal(signal.SIGINT)
        st.wait(timeout=30)
        text = out.read_text()
        names.append(_by_name(text))
        m = re.search(r"^-+.*\n\s*100\.00\s+\S+\s+\S+\s+(\d+)", text, re.M)
        total = re.findall(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?total$", text, re.M)
        if total:
            totals.append(int(total[-1]))
        elif m:
            totals.append(int(m.group(1)))
        else:
            raise SystemExit(f"bench_counts: cannot read strace summary:\n{text[-500:]}")
    by_name = {k: round((v - names[0].get(k, 0)) / (n2 - n1), 2) for k, v in names[1].items()}
    return {"syscalls": (totals[1] - totals[0]) / (n2 - n1),
            "syscalls_by_name": {k: v for k, v in sorted(by_name.items(), key=lambda kv: -kv[1]) if v >= 0.05}}


def _sys_ticks(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        stat = Path(f"/proc/{pid}/stat").read_text()
        total += int(stat[stat.rindex(")") + 2 :].split()[12])  # stime (field 15)
    return total


def _on_cpu_ns(pids: list[int]) -> int:
    """Time on a CPU (user + kernel), in nanoseconds, summed over every thread of the processes:
    /proc/<pid>/task/<tid>/schedstat's first field (the scheduler's own clock, not 10 ms ticks)."""
    total = 0
    for pid in pids:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(FileNotFoundError):
                total += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
    return total


def cpu_per_request(t: Target, kind: Kind, n: int) -> tuple[float, float]:
    """CPU-us per request over an unprofiled batch: user + system (scheduler clock, ns), and the
    system (kernel) part (from clock ticks: coarser)."""
    drive(t, kind, 50)
    pids = t.serving_pids
    c0, s0 = _on_cpu_ns(pids), _sys_ticks(pids)
    drive(t, kind, n, conc=16)
    c1, s1 = _on_cpu_ns(pids), _sys_ticks(pids)
    return (c1 - c0) / 1e3 / n, (s1 - s0) * 1e6 / CLK_TCK / n


def _k6(b: Bench, url: str, kind: Kind, key: str, rate: int, seconds: float) -> dict[str, float]:
    drive_url = url
    r = bench.run_k6(b.tmp, drive_url, kind, key, rate, seconds)
    return {f"rate_{k}": float(v) for k, v in r.items()}


def _lag(b: Bench, pids: list[int]) -> dict[str, Any]:
    """The serving processes' lag monitors (--lag), summed."""
    out: dict[str, Any] = {"ticks": 0, "late_ms": [0] * 8, "class_n": {}, "class_ms": {}}
    for pid in pids:
        path = b.lag_dir / f"{pid}.lag"
        if not path.exists():
            continue
        st = json.loads(path.read_text())
        out["ticks"] += st["ticks"]
        out["late_ms"] = [a + c for a, c in zip(out["late_ms"], st["late_ms"], strict=True)]
        for k in ("class_n", "class_ms"):
            for why, v in st[k].items():
                out[k][why] = out[k].get(why, 0) + v
        out["worst"] = st["worst"]
    return out


def fixed_rate(b: Bench, t: Target, kind: Kind, rate: int, seconds: float) -> dict[str, Any]:
    """k6 at a constant arrival rate (mock answering at once): latency percentiles and dropped requests;
    with --lag, how late the target's event loop ran its 1 ms timer meanwhile, and why."""
    drive(t, kind, 50)
    before = _lag(b, t.serving_pids) if LAG else None
    row: dict[str, Any] = dict(_k6(b, t.url(kind), kind, t.key, rate, seconds))
    if before is not None:
        time.sleep(1.2)  # the monitors write every second
        after = _lag(b, t.serving_pids)
        row["lag"] = {
            "ticks": after["ticks"] - before["ticks"],
            "late_ms_buckets": "<0.5 <1 <2 <3 <5 <10 <20 >=20",
            "late_ms": [a - c for a, c in zip(after["late_ms"], before["late_ms"], strict=True)],
            "late_2ms_n": {k: v - before["class_n"].get(k, 0) for k, v in after["class_n"].items()},
            "late_2ms_total_ms": {k: round(v - before["class_ms"].get(k, 0), 1) for k, v in after["class_ms"].items()},
            "worst_since_start": after.get("worst", []),
        }
    return row


def callgrind_dump(b: Bench, pid: int) -> int:
    """Dump (and zero) callgrind's counters of ``pid``: the instructions since the last dump."""
    before = set(b.cg_dir.glob(f"cg.{pid}.*"))
    subprocess.run(["callgrind_control", "-d", str(pid)], check=True, capture_output=True, timeout=300)
    deadline = time.monotonic() + 120
    while True:
        new = sorted(set(b.cg_dir.glob(f"cg.{pid}.*")) - before)
        if new:
            text = new[-1].read_text(errors="replace")
            m = re.search(r"^(?:summary|totals):\s+(\d+)", text, re.M)
            if m:
                return int(m.group(1))
        if time.monotonic() > deadline:
            raise SystemExit(f"bench_counts: no callgrind dump from pid {pid}")
        time.sleep(0.2)


def count_instructions(b: Bench, t: Target, kind: Kind, n1: int, n2: int) -> float:
    """Instructions per request under callgrind: deterministic, whatever else the machine does.

    (I(N2) - I(N1)) / (N2 - N1): the fixed costs between dumps (timers, the
    metrics flush) cancel out as far as they do not grow with the batch.
    """
    pids = t.serving_pids  # several workers: their instructions summed, each worker's share kept
    drive(t, kind, 30)
    for pid in pids:
        callgrind_dump(b, pid)
    drive(t, kind, n1)
    i1 = [callgrind_dump(b, pid) for pid in pids]
    drive(t, kind, n2)
    i2 = [callgrind_dump(b, pid) for pid in pids]
    if len(pids) > 1:
        print(f"{t.name:12s} {kind.name:16s} instructions per worker, batch of {n2}: {i2}", file=sys.stderr)
    return (sum(i2) - sum(i1)) / (n2 - n1)


def stream_events(kind: Kind) -> int:
    extra = LONG_EXTRA if kind.shape == "long" else 0
    body = bench.anthropic_sse_body(19 + extra) if kind.dialect == "anthropic" else bench.openai_sse_body(21 + extra)
    return body.count(b"\n\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", default="passthrough,standalone,governed",
                    help="NAME or NAME@DIR (DIR: another checkout's gateway package, e.g. "
                         "`git archive REV gateway | tar -x -C DIR`), so before/after run side by side")
    ap.add_argument("--kinds", default="openai-json,anthropic-json,openai-paced,anthropic-paced")
    ap.add_argument("--n1", type=int, default=200)
    ap.add_argument("--n2", type=int, default=600)
    ap.add_argument("--cpu-n", type=int, default=3000, help="requests of the unprofiled CPU batch (0: skip)")
    ap.add_argument("--no-strace", action="store_true")
    ap.add_argument("--gateway-src", default="")
    ap.add_argument("--out", default=None)
    ap.add_argument("--opcodes", action="store_true",
                    help="count Python bytecode instructions (sys.settrace) instead of calls: the py_calls "
                         "figures and --top then show opcodes per request, by function")
    ap.add_argument("--stores-cpu", default="",
                    help="pin Postgres and Redis to these CPUs (taskset list); by default they share the load "
                         "generator's CPU")
    ap.add_argument("--lag", action="store_true",
                    help="with --rate: each target's event loop times a 1 ms timer; reports how late it ran "
                         "and why (waiting for a CPU, a garbage collection, or busy)")
    ap.add_argument("--lines", default="",
                    help="with --opcodes and --top: also count by source line in the functions of this name")
    ap.add_argument("--callgrind", action="store_true",
                    help="also count instructions per request under valgrind's callgrind (deterministic CPU work)")
    ap.add_argument("--cg-n1", type=int, default=40)
    ap.add_argument("--cg-n2", type=int, default=120)
    ap.add_argument("--cg-timers-x", type=float, default=1.0,
                    help="under callgrind, stretch governed's ledger flush (200 ms) and last-used flush (10 s) "
                         "by this factor (~50: valgrind's slowdown) so that timed work weighs per request as at "
                         "full speed")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the run's directory (logs) for a post-mortem")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved CPU batches per target (the least is kept)")
    ap.add_argument("--rate", type=int, default=0,
                    help="also run k6 at this constant arrival rate (req/s) against each target and the mock")
    ap.add_argument("--rate-seconds", type=float, default=20.0)
    ap.add_argument("--keep-pstats", default="", help="directory to copy each target's cProfile stats to (with --top)")
    ap.add_argument("--top", type=int, default=0, help="print the N functions with most calls per request")
    args = ap.parse_args(argv)
    global TOP, KEEP, TIMERS_X, OPCODES, LINES, LAG, STORES_CPU
    TOP = args.top
    STORES_CPU = args.stores_cpu
    LAG = args.lag
    OPCODES = args.opcodes
    LINES = args.lines
    TIMERS_X = args.cg_timers_x
    KEEP = args.keep_pstats
    if KEEP:
        Path(KEEP).mkdir(parents=True, exist_ok=True)
    bench.ensure_tools()
    if not args.no_strace and shutil.which("strace") is None:
        raise SystemExit("bench_counts: strace is required (apt-get install strace), or pass --no-strace")
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, {int(bench.LOADGEN_CPU)})
    kinds = [ALL_KINDS[k] for k in args.kinds.split(",")]
    targets = args.targets.split(",")
    results: dict[str, dict[str, dict[str, float]]] = {}
    keep = contextlib.nullcontext(tempfile.mkdtemp(prefix="gw-counts-")) if args.keep_tmp else None
    with keep or tempfile.TemporaryDirectory(prefix="gw-counts-") as tmp_s:
        Path(tmp_s).chmod(0o755)  # nginx workers drop to an unprivileged user and read the bodies here
        b = Bench(Path(tmp_s), args.gateway_src)
        try:
            b.start_mock()
            if args.rate:
                direct = {k.name: _k6(b, f"http://{HOST}:{b.stack.mock_port}{k.mock_path}", k, "", args.rate,
                                      args.rate_seconds) for k in kinds}
                results["direct"] = direct
                for k, row in direct.items():
                    print(f"{'direct':12s} {k:16s} {json.dumps(row)}", file=sys.stderr)
            def start(spec: str, profile: bool) -> Target:
                name, _, src = spec.partition("@")
                name, _, workers = name.partition("/")  # standalone/2: two workers
                if name == "passthrough":
                    return b.start_passthrough(profile)
                b.stack.workers = int(workers or 1)
                try:
                    return b.start_gateway(name == "governed", profile, src, label=spec)
                finally:
                    b.stack.workers = 1

            # Counted (cProfile) runs: one target at a time.
            for spec in targets:
                results[spec] = {}
                t = start(spec, True)
                try:
                    for kind in kinds:
                        row = results[spec].setdefault(kind.name, {})
                        row.update(count_calls(b, t, kind, args.n1, args.n2))
                        print(f"{spec:12s} {kind.name:16s} {json.dumps(row)}", file=sys.stderr)
                finally:
                    b.stop_target(t)
            if args.callgrind:
                # Instructions per request (valgrind's callgrind): one target at a time, no cProfile.
                b.stack.cmd_prefix = ["valgrind", "--tool=callgrind", "--trace-children=yes",
                                      f"--callgrind-out-file={b.cg_dir}/cg.%p"]
                try:
                    for spec in targets:
                        t = start(spec, False)
                        try:
                            for kind in kinds:
                                row = results[spec][kind.name]
                                row["instructions"] = count_instructions(b, t, kind, args.cg_n1, args.cg_n2)
                                print(f"{spec:12s} {kind.name:16s} {json.dumps(row)}", file=sys.stderr)
                        finally:
                            b.stop_target(t)
                finally:
                    b.stack.cmd_prefix = []
            # Unprofiled runs: every target up at once, CPU batches interleaved round by round
            # (before/after in the same minutes of a shared machine; the least of the rounds kept).
            live = [start(spec, False) for spec in targets]
            try:
                for kind in kinds:
                    for t in live:
                        row = results[t.name][kind.name]
                        if not args.no_strace:
                            row.update(count_syscalls(b, t, kind, args.n1, args.n2))
                    if args.cpu_n:
                        rounds: dict[str, list[tuple[float, float]]] = {t.name: [] for t in live}
                        for _ in range(args.rounds):
                            for t in live:
                                rounds[t.name].append(cpu_per_request(t, kind, args.cpu_n))
                        for t in live:
                            row = results[t.name][kind.name]
                            least = min(rounds[t.name])
                            row["cpu_us"] = least[0]
                            row["cpu_us_sys"] = least[1]  # the kernel's part of that round
                            row["cpu_us_rounds"] = [r[0] for r in rounds[t.name]]  # type: ignore[assignment]
                    if args.rate:
                        for t in live:
                            results[t.name][kind.name].update(fixed_rate(b, t, kind, args.rate, args.rate_seconds))
                    for t in live:
                        print(f"{t.name:12s} {kind.name:16s} {json.dumps(results[t.name][kind.name])}", file=sys.stderr)
            finally:
                for t in live:
                    b.stop_target(t)
        finally:
            b.stop()
    report = {"host": os.uname().nodename, "python": sys.version.split()[0], "args": vars(args),
              "results": results, "events": {k.name: stream_events(k) for k in kinds if k.stream}}
    print_report(report)
    out = Path(args.out) if args.out else bench.RESULTS / f"counts-{time.strftime('%Y-%m-%dT%H%M%SZ', time.gmtime())}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwritten: {out}")
    return 0


def print_report(report: dict[str, Any]) -> None:
    res = report["results"]
    ref = res.get("passthrough", {})
    print(f"\n{'target':24s} {'kind':16s} {'calls':>7s} {'(Python':>8s} {'+ C)':>6s} {'syscalls':>9s} {'CPU-us':>7s} {'(kernel)':>8s} {'x pass':>7s} {'instr/req':>10s}")
    for name, rows in res.items():
        if name == "direct":
            continue
        for kind, row in rows.items():
            base = ref.get(kind, {}).get("cpu_us")
            ratio = f"{row['cpu_us'] / base:.2f}" if base and "cpu_us" in row else "-"
            calls = row.get("py_calls", 0) + row.get("c_calls", 0)
            print(f"{name:24s} {kind:16s} {calls:7.0f} {row.get('py_calls', 0):8.0f} {row.get('c_calls', 0):6.0f} "
                  f"{row.get('syscalls', float('nan')):9.1f} {row.get('cpu_us', float('nan')):7.0f} "
                  f"{row.get('cpu_us_sys', float('nan')):8.0f} {ratio:>7s} "
                  f"{row.get('instructions', float('nan')):10.0f}")
    direct = res.get("direct", {})
    if direct:
        print(f"\nat {report['args']['rate']} req/s (k6 constant arrival rate; added = target - direct, same run):")
        for name, rows in res.items():
            for kind, row in rows.items():
                if "rate_p99_ms" not in row:
                    continue
                d = direct.get(kind, {})
                print(f"  {name:12s} {kind:16s} p50 {row['rate_p50_ms']:7.2f} ms  p99 {row['rate_p99_ms']:7.2f} ms"
                      f"  added p50 {row['rate_p50_ms'] - d.get('rate_p50_ms', 0):6.2f}  p99 "
                      f"{row['rate_p99_ms'] - d.get('rate_p99_ms', 0):6.2f} ms  dropped {row['rate_dropped']:.0f}"
                      f"  failed {row['rate_failed_rate']:.3f}")
                lag = row.get("lag")
                if lag:
                    print(f"  {'':12s} loop lag: 1 ms timer late by (ms) {lag['late_ms_buckets']}: {lag['late_ms']}; "
                          f"late >= 2 ms: {lag['late_2ms_n']} ({lag['late_2ms_total_ms']} ms in all)")
    scaled = [(name, name.partition("@")[0].partition("/")) for name in res if "/" in name.partition("@")[0]]
    if scaled:
        print("\nseveral workers (instructions per request summed over the workers; projected throughput ratio"
              " = N x one worker's / N workers', on N free cores):")
    for name, (base, _, n) in scaled:
        one = res.get(base + name.partition("@")[1] + name.partition("@")[2], {})
        for kind, row in res[name].items():
            if "instructions" in row and "instructions" in one.get(kind, {}):
                ratio = int(n) * one[kind]["instructions"] / row["instructions"]
                print(f"  {name:24s} {kind:16s} {row['instructions']:10.0f} vs {one[kind]['instructions']:10.0f}"
                      f"  projected {ratio:.2f}x")

    def total(r: dict[str, float]) -> float:
        return r.get("py_calls", 0) + r.get("c_calls", 0)

    print("\nper stream event ((paced - json) / events: the stream's own fixed cost spread over its events):")
    for name, rows in res.items():
        for kind, events in report["events"].items():
            json_kind = kind.replace("-paced", "-json").replace("-sse", "-json")
            if kind.endswith("-long") or not (kind in rows and json_kind in rows and "py_calls" in rows[kind]):
                continue
            per = (total(rows[kind]) - total(rows[json_kind])) / events
            print(f"  {name:12s} {kind:16s} {per:6.1f} calls per event ({events} events)")
    print(f"\nper stream event, marginal ((long - paced) / {LONG_EXTRA}: the cost of one more event):")
    for name, rows in res.items():
        for kind in report["events"]:
            paced = kind.replace("-long", "-paced")
            if not kind.endswith("-long") or not (kind in rows and paced in rows and "py_calls" in rows[kind]):
                continue
            marginal = (total(rows[kind]) - total(rows[paced])) / LONG_EXTRA
            py = (rows[kind]["py_calls"] - rows[paced]["py_calls"]) / LONG_EXTRA
            print(f"  {name:12s} {kind:16s} {marginal:6.1f} calls per event ({py:.1f} Python)")


if __name__ == "__main__":
    raise SystemExit(main())
