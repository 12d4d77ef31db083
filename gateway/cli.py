"""Command line: serve | worker | check-config | mock-upstream | migrate | users | keys."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable

from gateway.config import DEFAULT_CONFIG, Config, ConfigError, load

Command = Callable[[argparse.Namespace], int]
# Subsystems add their commands here (name -> (help, configure-parser, run)).
EXTRA_COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Command]] = {}


def _load(args: argparse.Namespace) -> Config:
    try:
        return load(args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def cmd_serve(args: argparse.Namespace) -> int:
    from gateway.observability import logging as gwlog
    from gateway.supervisor import Supervisor

    if args.workers is not None and args.workers < 1:
        print("error: --workers must be at least 1", file=sys.stderr)
        return 2
    cfg = _load(args)
    try:  # what workers will load besides the file: fail here, once, rather than in every worker
        from gateway.accounting.pricing import PriceTable

        PriceTable.load(cfg)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    gwlog.configure(cfg.log.level)
    try:
        supervisor = Supervisor(cfg, cfg.source, workers=args.workers, port=args.port)
    except OSError as exc:
        print(f"error: cannot listen on {cfg.server.host}:{args.port or cfg.server.port}: {exc.strerror}", file=sys.stderr)
        return 1
    return supervisor.run()


def cmd_worker(args: argparse.Namespace) -> int:
    """A worker runs the configuration text its supervisor validated (``--config-fd``), else the file."""
    import os

    from gateway import worker
    from gateway.config import parse

    if args.config_fd is None:
        cfg = _load(args)
    else:
        text = os.pread(args.config_fd, os.fstat(args.config_fd).st_size, 0).decode()
        os.close(args.config_fd)
        try:
            cfg = parse(text, source=args.config)
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    worker.run(cfg, args.fd, args.notify_fd, args.index)
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    try:
        cfg = load(args.config)
        from gateway.accounting.pricing import PriceTable

        PriceTable.load(cfg)
    except ConfigError as exc:
        print(f"{len(exc.errors)} error(s) in configuration:", file=sys.stderr)
        for e in exc.errors:
            print(f"  {e}", file=sys.stderr)
        return 1
    mode = "standalone" if cfg.standalone else "database"
    print(f"ok: {cfg.source} ({mode}; {len(cfg.upstreams)} upstreams, {len(cfg.routes)} routes)")
    return 0


def cmd_mock_upstream(args: argparse.Namespace) -> int:
    from gateway.mock import upstream

    cfg = _load(args).mock_upstream
    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    upstream.run(dataclasses.replace(cfg, **overrides))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llm-gateway", description="Self-hosted LLM gateway.")
    p.add_argument("--config", "-c", default=None, help=f"TOML file (default: $GATEWAY_CONFIG or {DEFAULT_CONFIG})")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", "-c", default=argparse.SUPPRESS, help="TOML file")

    s = sub.add_parser("serve", parents=[common], help="run the supervisor and its workers")
    s.add_argument("--workers", "-w", type=int, default=None, help="worker processes (default: one per core)")
    s.add_argument("--port", type=int, default=None)
    s.set_defaults(func=cmd_serve)

    # Internal (the supervisor starts it): no help= at all, so that --help does not list it (help=SUPPRESS
    # would print "==SUPPRESS==" in the command list).
    w = sub.add_parser("worker", parents=[common])
    w.add_argument("--fd", type=int, required=True)
    w.add_argument("--notify-fd", type=int, default=None)
    w.add_argument("--index", type=int, default=0)
    w.add_argument("--config-fd", type=int, default=None)
    w.set_defaults(func=cmd_worker)

    c = sub.add_parser("check-config", parents=[common], help="validate a configuration file, reporting every error")
    c.set_defaults(func=cmd_check_config)

    m = sub.add_parser("mock-upstream", parents=[common], help="serve fake Anthropic and OpenAI APIs")
    m.add_argument("--host", default=None)
    m.add_argument("--port", type=int, default=None)
    m.set_defaults(func=cmd_mock_upstream)

    for name, (help_text, configure, run) in EXTRA_COMMANDS.items():
        e = sub.add_parser(name, parents=[common], help=help_text)
        configure(e)
        e.set_defaults(func=run)
    return p


def main(argv: list[str] | None = None) -> int:
    _register_subsystems()
    args = build_parser().parse_args(argv)
    # Subcommands accept --config after their name too.
    return int(args.func(args))


def _register_subsystems() -> None:
    """Import optional subsystems that add CLI commands (migrate, users, keys)."""
    import importlib

    for mod in ("gateway.stores.cli",):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name != mod:
                raise
