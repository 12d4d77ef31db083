#!/usr/bin/env python3
"""CPU cost of translation itself, in process: what a translated request adds to passthrough.

Per non-streamed request: the request translated (parse already done by the
proxy) and serialised, the upstream's JSON answer parsed, translated and
serialised.  Per stream event: the upstream's SSE bytes fed to the stream
translator (the bench's fixed 25-event streams, fed in one piece and event by
event).  Passthrough pays none of this.  The bodies are loadtests/bench.py's.

Usage: .venv/bin/python loadtests/bench_translate.py [--n 20000]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "loadtests"))

from bench import KINDS, anthropic_json_body, anthropic_sse_body, openai_json_body, openai_sse_body  # noqa: E402

from gateway.translate.attempt import Translation  # noqa: E402
from gateway.translate.common import Options  # noqa: E402


def cpu_us(fn: Callable[[], object], n: int) -> float:
    fn()
    best = float("inf")
    for _ in range(3):
        t0 = time.process_time()
        for _ in range(n):
            fn()
        best = min(best, (time.process_time() - t0) / n * 1e6)
    return best


def split_events(body: bytes) -> list[bytes]:
    return [e + b"\n\n" for e in body.split(b"\n\n") if e]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20_000)
    n = ap.parse_args().n
    rows = []
    for client, upstream_json, upstream_sse in (
        ("openai", anthropic_json_body(), anthropic_sse_body()),
        ("anthropic", openai_json_body(), openai_sse_body()),
    ):
        kind = KINDS[f"{client}-json"]

        def request(kind=kind, client=client) -> bytes:  # type: ignore[no-untyped-def]
            doc = orjson.loads(kind.body())  # the proxy parses the body anyway: not counted below
            return Translation(client, doc, Options()).body("served-model")

        parse_only = cpu_us(lambda kind=kind: orjson.loads(kind.body()), n)  # type: ignore[misc]
        req = cpu_us(request, n) - parse_only
        t = Translation(client, orjson.loads(kind.body()), Options())
        resp = cpu_us(lambda t=t, b=upstream_json: t.response(200, b, None), n)  # type: ignore[misc]
        events = split_events(upstream_sse)
        whole = cpu_us(lambda t=t, b=upstream_sse: (s := t.stream()).feed(b) + s.finish(), n // 4)  # type: ignore[misc]

        def one_by_one(t=t, events=events) -> None:  # type: ignore[no-untyped-def]
            s = t.stream()
            for e in events:
                s.feed(e)
            s.finish()

        each = cpu_us(one_by_one, n // 4)
        rows.append({
            "client": client, "upstream": "anthropic" if client == "openai" else "openai",
            "request_us": round(req, 1), "response_us": round(resp, 1), "non_stream_total_us": round(req + resp, 1),
            "stream_events": len(events), "per_event_us_one_read": round(whole / len(events), 2),
            "per_event_us_event_by_event": round(each / len(events), 2),
        })
    print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
