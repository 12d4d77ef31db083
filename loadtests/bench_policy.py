#!/usr/bin/env python3
"""Policy-path benchmark: the standalone gateway vs the same gateway with shared limits in Redis.

Same stack and measurements as ``bench.py`` (nginx mock on core 1, gateway
pinned to core 0, wrk saturation for CPU-us/request, k6 fixed-rate for added
latency), with two gateways started side by side and measured alternately in
one run:

  * ``standalone``: the bench key with only a model list (the hot path);
  * ``policy``: the same key with rpm, tpm, max_concurrency and a budget on
    the key and a budget on its user, limits in a throwaway ``redis-server``
    (pinned to core 1, as a remote Redis would be): every request runs the
    cached-key lookup, one ADMIT script and a batched settlement.

Limits are set high enough that nothing is rejected: the cost measured is the
bookkeeping, not 429s.  Target (issue 4): policy adds <= 80 CPU-us/request and
<= 0.3 ms p50 over standalone.

Usage: .venv/bin/python loadtests/bench_policy.py [--quick] [--kinds openai-json,...] [--rates 100,500]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # the benchmark engineer's harness: same stack, same measurements

POLICY_LIMITS = (
    'models = ["bench-*"], rpm = 100000000, tpm = 1000000000000, max_concurrency = 100000, '
    'budget_usd = 1000000000.0, budget_period = "month"'
)
USER_LIMITS = 'budget_usd = 1000000000.0, budget_period = "day"'


class PolicyStack(bench.Stack):
    """bench.Stack plus Redis and a second gateway whose key carries every limit."""

    redis: subprocess.Popen[bytes] | None = None
    redis_port: int = 0
    pairs: dict[str, tuple[subprocess.Popen[bytes], int, Path]]

    def _gateway_config(self) -> Path:
        path = super()._gateway_config()
        if getattr(self, "_policy", False):
            text = path.read_text().replace('limits = { models = ["bench-*"] }', f"limits = {{ {POLICY_LIMITS} }}")
            text += f'\n[[users]]\nname = "standalone"\nlimits = {{ {USER_LIMITS} }}\n'
            path = self.tmp / "gateway-policy.toml"
            path.write_text(text)
        return path

    def start(self) -> None:
        self.redis_port = bench.free_port()
        self.redis = subprocess.Popen(
            ["taskset", "-c", bench.LOADGEN_CPU, shutil.which("redis-server") or "redis-server",
             "--port", str(self.redis_port), "--bind", bench.HOST, "--save", "", "--appendonly", "no",
             "--dir", str(self.tmp)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        self.procs.append(self.redis)
        bench.wait_port(self.redis_port)
        super().start()  # mock, nginx proxy, standalone gateway
        # The standalone gateway keeps writing to its open log file under the new name.
        (self.tmp / "gateway.log").rename(self.tmp / "gateway-standalone.log")
        self.pairs = {"standalone": (self.gateway, self.gw_port, self.tmp / "gateway-standalone.log")}  # type: ignore[dict-item]
        self._policy = True
        self.gw_port = bench.free_port()
        self.overrides["GATEWAY_REDIS_URL"] = f"redis://{bench.HOST}:{self.redis_port}/0"
        try:
            proc = self._start_gateway()
        finally:
            del self.overrides["GATEWAY_REDIS_URL"]
        self.pairs["policy"] = (proc, self.gw_port, self.tmp / "gateway.log")
        self.use("standalone")

    def use(self, which: str) -> None:
        """Point bench's "gateway" target at one of the two gateways."""
        self.gateway, self.gw_port, self.gw_log = self.pairs[which]


def run(args: argparse.Namespace) -> dict[str, Any]:
    kinds = [bench.KINDS[k] for k in args.kinds.split(",") if k]
    rates = [int(r) for r in args.rates.split(",") if r]
    seconds = args.seconds or (3.0 if args.quick else 10.0)
    repeat = args.repeat or (1 if args.quick else 3)
    warmup = 1.0 if args.quick else 2.0
    tmp = Path(tempfile.mkdtemp(prefix="llmgw-bench-policy-"))
    tmp.chmod(0o755)
    stack = PolicyStack(tmp)
    stack.gateway_src = args.gateway_src
    results: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join([Path(sys.executable).name, "loadtests/bench_policy.py", *sys.argv[1:]]),
        "git": subprocess.run(["git", "-C", str(bench.ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=False).stdout.strip(),
        "seconds_per_row": seconds, "repeat": repeat, "conns": args.conns,
        "machine": {"cpus": os.cpu_count(), "loadavg_start": os.getloadavg()},
        "kinds": {},
    }
    try:
        stack.start()
        for which in ("standalone", "policy"):
            stack.use(which)
            for kind in kinds:
                bench.check_answer(stack, "gateway", kind)
        for kind in kinds:
            rows: dict[str, Any] = {"standalone": {"latency": {}}, "policy": {"latency": {}}}
            # Alternate the two per repetition so that machine noise hits both alike.
            runs: dict[str, list[dict[str, Any]]] = {"standalone": [], "policy": []}
            for _ in range(repeat):
                for which in ("standalone", "policy"):
                    stack.use(which)
                    print(f"bench_policy: {kind.name} {which}: saturation {seconds:.0f}s", file=sys.stderr, flush=True)
                    runs[which].append(bench.saturate(stack, "gateway", kind, seconds, warmup, args.conns, 1))
            for which in runs:
                best = min(runs[which], key=lambda r: r.get("cpu_us_per_req") or float("inf"))
                rows[which]["saturation"] = {**best, "runs": [r.get("cpu_us_per_req") for r in runs[which]]}
            for rate in rates:
                for which in ("standalone", "policy"):
                    stack.use(which)
                    print(f"bench_policy: {kind.name} {which}: {rate} req/s", file=sys.stderr, flush=True)
                    rows[which]["latency"][str(rate)] = bench.fixed_rate(stack, "gateway", kind, rate, seconds)
            s, p = rows["standalone"], rows["policy"]
            rows["delta"] = {
                "cpu_us_per_req": p["saturation"]["cpu_us_per_req"] - s["saturation"]["cpu_us_per_req"],
                **{f"p50_ms@{r}": p["latency"][str(r)]["p50_ms"] - s["latency"][str(r)]["p50_ms"] for r in rates},
                **{f"p99_ms@{r}": p["latency"][str(r)]["p99_ms"] - s["latency"][str(r)]["p99_ms"] for r in rates},
            }
            results["kinds"][kind.name] = rows
    finally:
        stack.stop()
        results["machine"]["loadavg_end"] = os.getloadavg()
        for name in ("gateway-stderr.log",):
            err = tmp / name
            if err.exists() and err.stat().st_size:
                print("bench_policy: gateway stderr (tail):\n" + err.read_text()[-2000:], file=sys.stderr)
        shutil.rmtree(tmp, ignore_errors=True)
    return results


def report(results: dict[str, Any], rates: list[int]) -> list[str]:
    cols = ["kind", "gateway", "req/s", "cpu-us/req", *(f"p50@{r}" for r in rates), *(f"p99@{r}" for r in rates)]
    print("  ".join(f"{c:>12}" if i > 1 else f"{c:<15}" for i, c in enumerate(cols)))
    verdicts = []
    for kname, rows in results["kinds"].items():
        for which in ("standalone", "policy"):
            sat, lat = rows[which]["saturation"], rows[which]["latency"]
            cells = [kname, which, bench.fmt(sat.get("rps")), bench.fmt(sat.get("cpu_us_per_req"), ".1f")]
            cells += [bench.fmt(lat[str(r)]["p50_ms"], ".3f") for r in rates]
            cells += [bench.fmt(lat[str(r)]["p99_ms"], ".3f") for r in rates]
            print("  ".join(f"{c:>12}" if i > 1 else f"{c:<15}" for i, c in enumerate(cells)))
        d = rows["delta"]
        cells = [kname, "delta", "", bench.fmt(d["cpu_us_per_req"], "+.1f")]
        cells += [bench.fmt(d[f"p50_ms@{r}"], "+.3f") for r in rates]
        cells += [bench.fmt(d[f"p99_ms@{r}"], "+.3f") for r in rates]
        print("  ".join(f"{c:>12}" if i > 1 else f"{c:<15}" for i, c in enumerate(cells)))
        ok_cpu = d["cpu_us_per_req"] <= 80
        verdicts.append(f"{kname}: policy adds {d['cpu_us_per_req']:.1f} CPU-us/request (target <= 80): "
                        f"{'PASS' if ok_cpu else 'FAIL'}")
        for r in rates:
            ok = d[f"p50_ms@{r}"] <= 0.3
            verdicts.append(f"{kname}: policy adds {d[f'p50_ms@{r}']:+.3f} ms p50 at {r} req/s (target <= 0.3): "
                            f"{'PASS' if ok else 'FAIL'}")
    return verdicts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--kinds", default="openai-json,anthropic-sse")
    ap.add_argument("--seconds", type=float, default=None)
    ap.add_argument("--repeat", type=int, default=None)
    ap.add_argument("--conns", type=int, default=50)
    ap.add_argument("--rates", default="100,500")
    ap.add_argument("--out", default=None)
    ap.add_argument("--gateway-src", default="", metavar="DIR",
                    help="run both gateways from another checkout's tree (before/after comparisons)")
    args = ap.parse_args()
    if (os.cpu_count() or 1) < 2:
        raise SystemExit("bench_policy: needs 2 cores")
    bench.ensure_tools()
    results = run(args)
    print()
    verdicts = report(results, [int(r) for r in args.rates.split(",") if r])
    results["targets"] = verdicts
    print()
    for line in verdicts:
        print(line)
    bench.RESULTS.mkdir(parents=True, exist_ok=True)
    out = Path(args.out) if args.out else bench.RESULTS / f"bench-policy-{results['started'].replace(':', '')}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nresults: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
