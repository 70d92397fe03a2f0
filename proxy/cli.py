"""`summon`: serve | check | status | log | stats | images ... | routes ..."""

from __future__ import annotations

import argparse
import logging
import sys

from .config import load
from .errors import ConfigError


def cmd_check(args: argparse.Namespace) -> int:
    try:
        config = load(args.config)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 2
    summoned = sum(1 for r in config.routes if r.summoned)
    print(f"{args.config}: ok: {len(config.routes)} routes ({summoned} summoned), {len(config.hosts)} hosts")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        config = load(args.config)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 2
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    from .server import serve

    return serve(config)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="summon", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="run the proxy")
    p.add_argument("-c", "--config", default="summon.toml")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("check", help="validate a config: exit 0, or 2 with file:line: message lines")
    p.add_argument("-c", "--config", default="summon.toml")
    p.set_defaults(func=cmd_check)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
