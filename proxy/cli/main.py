"""`summon`: serve | check | status | log | stats | images ... | routes ..."""

from __future__ import annotations

import argparse
import logging
import sys

from ..errors import ConfigError
from ..observe.events import setup_json_logging
from .common import admin_request, admin_target, environment_ok, load_or_report, refusal, report
from .events import add_parsers as add_event_parsers
from .images import add_parsers as add_image_parsers
from .routes import add_parsers as add_route_parsers


def cmd_check(args: argparse.Namespace) -> int:
    config = load_or_report(args.config)
    if config is None:
        return 2
    if not args.config_only and not environment_ok(config):
        return 2
    summoned = sum(1 for r in config.routes if r.summoned)
    print(f"{args.config}: ok: {len(config.routes)} routes ({summoned} summoned), {len(config.hosts)} hosts")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    config = load_or_report(args.config)
    if config is None or not environment_ok(config):
        return 2
    if args.log_format == "json":
        setup_json_logging(args.log_level)  # one JSON object per line on stderr
    else:
        logging.basicConfig(level=getattr(logging, args.log_level.upper()), stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s %(message)s")
    from ..serve.preflight import pull_token, redis_password
    from ..serve.server import serve

    try:
        return serve(config, redis_password(config), pull_token(config))
    except ConfigError as exc:  # what start-up met after the checks (a port taken in between)
        report(exc.problems)
        return 2


def cmd_status(args: argparse.Namespace) -> int:
    """Ask a running proxy's admin API for its pools and instances."""
    import json
    import urllib.error
    import urllib.request

    target = admin_target(args.config, "/status")
    if isinstance(target, int):
        return target
    config, url = target
    try:
        with urllib.request.urlopen(admin_request(config, url), timeout=5) as resp:
            data = json.load(resp)
    except (urllib.error.URLError, OSError) as exc:
        print(f"summon: cannot reach the admin API at {url}: {exc} (is `summon serve` running?)", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(data, indent=1))
        return 0
    totals = data.get("totals", {})
    workers = totals.get("workers")
    print(f"instances {totals.get('instances', 0)}/{totals.get('cap', '?')}   connections {totals.get('connections', 0)}"
          f"   in flight {totals.get('inflight', 0)}" + (f"   workers {workers}" if workers else ""))
    if totals.get("unreachable_workers"):
        print(f"  (no answer from worker(s) {', '.join(map(str, totals['unreachable_workers']))}: not counted)")
    cluster = totals.get("cluster")
    if cluster:
        mode = "DEGRADED: shared store unreachable, booting within the local share" if cluster.get("degraded") else "ok"
        print(f"fleet: node {cluster.get('node')}, {cluster.get('store')}, permits {cluster.get('permits')}"
              f"/{cluster.get('cap')}, {mode}")
    for route in data.get("routes", []):
        kind = "static" if route.get("static") else f"image {route.get('image')}"
        print(f"{route['name']}  ({kind}, queued {route.get('queued', 0)})")
        for i in route.get("instances", []):
            worker = f"   worker {i['worker']}" if "worker" in i else ""
            node = f"   node {i['node']}" if cluster and i.get("node") else ""
            arch = f"   {i['arch']}" if i.get("arch") else ""
            print(f"  {i['id']:<24} {i['state']:<9} {i.get('host', ''):<10} {i.get('region', ''):<8}"
                  f" {i.get('address') or ''}{arch}{worker}{node}")
    return 0




def cmd_reload(args: argparse.Namespace) -> int:
    """Ask a running proxy to validate and swap its config (POST /reload on the admin API)."""
    import json
    import urllib.error
    import urllib.request

    target = admin_target(args.config, "/reload")
    if isinstance(target, int):
        return target
    config, url = target
    try:
        with urllib.request.urlopen(admin_request(config, url, post=True), timeout=30) as resp:
            body = json.load(resp)
    except urllib.error.HTTPError as exc:
        body, text = refusal(exc)
        if body is None:
            print(f"summon: reload refused ({exc.code}): {text}", file=sys.stderr)
            return 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"summon: cannot reach the admin API at {url}: {exc} (is `summon serve` running?)", file=sys.stderr)
        return 1
    for message in body.get("errors", []):
        print(message, file=sys.stderr)
    if body.get("ok"):
        print(f"{args.config}: reloaded")
        return 0
    return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="summon", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="run the proxy")
    p.add_argument("-c", "--config", default="summon.toml")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-format", default="json", choices=["json", "text"],
                   help="stderr logs: JSON lines (default, for collectors) or plain text")
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("check", help="validate a config and what serving it needs (backends, images, ports, "
                                     "event log): exit 0, or 2 with file:line: message lines")
    p.add_argument("-c", "--config", default="summon.toml")
    p.add_argument("--config-only", action="store_true",
                   help="only the file itself, not the machine (e.g. before a reload: the running summon "
                        "holds the ports)")
    p.set_defaults(func=cmd_check)
    p = sub.add_parser("status", help="pools and instances of a running proxy (admin API)")
    p.add_argument("-c", "--config", default="summon.toml")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("reload", help="validate and swap the config of a running proxy (admin API: token or loopback)")
    p.add_argument("-c", "--config", default="summon.toml")
    p.set_defaults(func=cmd_reload)
    add_event_parsers(sub)
    add_image_parsers(sub)
    add_route_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
