"""`summon routes split-site|list`: route-table commands, kept out of cli.py.

`split-site` turns a static site into one image per URL plus a generated route table
(see proxy/sitesplit.py); `list` prints the routes a config resolves to. `add_parsers`
registers them on the ``routes`` sub-command; each parser gets ``func=`` taking the parsed
args and returning an exit code.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..errors import ImageError
from .common import load_or_report


def add_parsers(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    routes = subparsers.add_parser("routes", help="generate and list route tables")
    sub = routes.add_subparsers(dest="routes_command", required=True)

    split = sub.add_parser(
        "split-site",
        help="one image per URL of a static site, plus a route table mapping each URL to its image",
        description="For every file under SITE_DIR write an image IMAGES_DIR/NAME-<slug>/ holding just that file "
        "(served by busybox httpd with the right Content-Type) and a route table ROUTES_DIR/NAME.toml with one "
        "exact-URL route per file, plus '/' and '/dir/' for index.html files. Same input, same output.",
    )
    split.add_argument("site", type=Path, metavar="SITE_DIR")
    split.add_argument("--name", required=True, help="site name: prefix of the image and route names, and the route file's name")
    split.add_argument("--images-dir", type=Path, default=Path("images"), help="default: images/")
    split.add_argument("--routes-dir", type=Path, default=Path("routes"), help="default: routes/")
    split.add_argument("--host", default="*", help="the routes' host: exact, *.suffix or * (default)")
    split.add_argument("--prefix", default="/", help="URL path the site is mounted at (default /)")
    split.add_argument("--idle-timeout", default="60s", help="per route (default 60s)")
    split.add_argument("--boot-timeout", default=None, help="per route (default 30s, 60s with --vm)")
    split.add_argument("--max-replicas", type=int, default=2, help="per route (default 2)")
    split.add_argument("--vm", action="store_true",
                       help="also build each image's x86_64 microVM (shared kernel, an initramfs holding just its resource)")
    split.add_argument("-q", "--quiet", action="store_true", help="print only the summary")
    split.set_defaults(func=cmd_split_site)

    lst = sub.add_parser("list", help="the routes a config resolves to (after include)")
    lst.add_argument("-c", "--config", default="summon.toml")
    lst.set_defaults(func=cmd_list)
    return routes


def cmd_split_site(args: argparse.Namespace) -> int:
    from ..config import parse_duration
    from ..images.sitesplit import SplitOptions, command_line, split_site

    boot_timeout = args.boot_timeout or ("60s" if args.vm else "30s")
    for flag, value in (("--idle-timeout", args.idle_timeout), ("--boot-timeout", boot_timeout)):
        try:
            parse_duration(value)
        except ValueError as exc:
            print(f"summon routes split-site: {flag}: {exc}", file=sys.stderr)
            return 2
    if args.max_replicas < 1:
        print("summon routes split-site: --max-replicas must be at least 1", file=sys.stderr)
        return 2
    opts = SplitOptions(
        name=args.name, images_dir=args.images_dir, routes_dir=args.routes_dir, host=args.host, prefix=args.prefix,
        idle_timeout=args.idle_timeout, boot_timeout=boot_timeout, max_replicas=args.max_replicas, vm=args.vm,
    )
    opts = SplitOptions(**{**opts.__dict__, "command": command_line(str(args.site), opts)})
    t0 = time.monotonic()
    try:
        result = split_site(args.site, opts, progress=lambda line: print(f"  {line}", flush=True))
    except (ImageError, OSError) as exc:
        print(f"summon routes split-site: {exc}", file=sys.stderr)
        return 1
    if not args.quiet:
        for r in result.resources:
            also = f" (also {', '.join(r.aliases)})" if r.aliases else ""
            print(f"  {r.url:<32} {r.image:<40} {r.content_type}{also}")
    for path, why in result.skipped:
        print(f"  skipped {path}: {why}")
    for warning in result.warnings:
        print(f"  warning: {warning}")
    for name in result.removed:
        print(f"  removed stale image {opts.images_dir / name} (its file is no longer in {args.site})")
    print(f"split {args.site} into {len(result.resources)} images under {opts.images_dir} "
          f"({len(result.written)} written, {len(result.unchanged)} unchanged, {len(result.removed)} stale removed) "
          f"and {result.routes} routes in {result.routes_file} in {time.monotonic() - t0:.1f}s")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    config = load_or_report(args.config)
    if config is None:
        return 2
    for r in config.routes:
        match = f"url {r.url}" if r.url is not None else f"path {r.path}"
        target = f"image {r.image}" if r.image is not None else "upstreams " + ",".join(str(u) for u in r.upstreams)
        print(f"{r.name}\t{r.host}\t{match}\t{target}\t{r.source}")
    return 0
