#!/usr/bin/env python3
"""Who calls what, per request, from two bench_counts snapshots.

    .venv/bin/python loadtests/bench_counts.py --targets standalone --kinds openai-json \
        --n1 100 --n2 300 --cpu-n 0 --no-strace --top 40 --keep-pstats /tmp/ps
    .venv/bin/python loadtests/profile_callers.py /tmp/ps/standalone-openai-json 300 isinstance "'get' of 'dict'"

For each function whose name contains a PATTERN: its calls per request, then
its callers with their calls per request (the difference between the snapshot
taken before the N2-request batch and the one after it).
"""

from __future__ import annotations

import marshal
import sys
from typing import Any

Key = tuple[str, int, str]


def load(path: str) -> dict[Key, Any]:
    with open(path, "rb") as f:
        data: dict[Key, Any] = marshal.load(f)
    return data


def short(key: Key) -> str:
    filename, line, name = key
    for marker in ("site-packages/", "/gateway/", "/lib/python3.11/"):
        i = filename.find(marker)
        if i >= 0:
            filename = filename[i + (1 if marker == "/gateway/" else len(marker)) :]
            break
    return f"{filename}:{line}({name})"


def _calls(v: Any) -> int:
    return int(v[1]) if isinstance(v, tuple) else int(v)


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print(__doc__)
        return 2
    base, n, patterns = argv[0], int(argv[1]), argv[2:]
    before, after = load(base + ".before.pstats"), load(base + ".pstats")
    empty: tuple[int, int, float, float, dict[Key, Any]] = (0, 0, 0.0, 0.0, {})
    for key, stats in after.items():
        name = short(key)
        if not any(p in name for p in patterns):
            continue
        prev = before.get(key, empty)
        total = (stats[1] - prev[1]) / n
        if total < 0.5:
            continue
        print(f"{total:7.1f} {name}")
        rows = []
        for caller, value in stats[4].items():
            d = (_calls(value) - _calls(prev[4].get(caller, 0))) / n
            if d >= 0.5:
                rows.append((d, short(caller)))
        for d, caller_name in sorted(rows, reverse=True)[:25]:
            print(f"     {d:6.1f} <- {caller_name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
