"""``summon log`` and ``summon stats``: read the event log of a (possibly running) proxy.

Kept apart from ``proxy/cli.py`` so the read-only tools have no import of the server:
they must work on a machine that only holds a copied database.  They open the database
read-only (`proxy.observe.events.open_readonly`), so pointing them at the live file is safe.

Exit codes: 0 success, 1 no or unreadable database, 2 bad arguments or configuration
(the same 2 as ``summon check``).
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from redis.exceptions import RedisError

from ..config import load, parse_duration
from ..errors import ConfigError
from ..observe import stats
from ..observe.events import Event, EventReader, iso_time, json_line, open_readonly
from ..observe.fleetlog import FleetLog


def parse_since(text: str, now: float | None = None) -> float:
    """``"10m"`` (that long ago) or an ISO 8601 timestamp (naive means UTC) -> unix time."""
    now = time.time() if now is None else now
    try:
        return now - parse_duration(text)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"{text!r} is neither a duration (\"10m\", \"1h\") nor an ISO timestamp") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)  # output is UTC, so input is too
    return when.timestamp()


def _since_arg(text: str) -> float:
    try:
        return parse_since(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _common(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument("-c", "--config", default="summon.toml",
                       help="summon.toml whose [events] path to read (default: %(default)s)")
    where.add_argument("--db", type=Path, help="the event database itself, instead of --config")
    parser.add_argument("--since", type=_since_arg, metavar="WHEN",
                        help='only events since WHEN: a duration ago ("30s", "10m", "1h") or an ISO timestamp')
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--local", action="store_true",
                        help="with [cluster]: this node's own log, not the fleet's stream in Redis")


def add_parsers(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``log`` and ``stats`` on the ``summon`` command's subparsers."""
    p = subparsers.add_parser("log", help="show recorded events", description="Show recorded events, oldest first.")
    _common(p)
    p.add_argument("--route", metavar="NAME", help="only events of this route")
    p.add_argument("-n", "--limit", type=int, metavar="N", help="only the newest N events")
    p.set_defaults(func=run_log)

    p = subparsers.add_parser("stats", help="per-route boot, latency and cost summary",
                              description="Per-route boots, boot-to-ready percentiles (nearest rank), cold "
                                          "requests, peak instances and instance-seconds.")
    _common(p)
    p.set_defaults(func=run_stats)


def _fail(command: str, message: str, code: int) -> int:
    print(f"summon {command}: error: {message}", file=sys.stderr)
    return code


def _open(args: argparse.Namespace, command: str) -> EventReader | FleetLog | int:
    """The reader (the fleet's stream when the config has [cluster] and Redis answers), or
    the exit code after explaining what is wrong."""
    db: Path | None = getattr(args, "db", None)
    if db is None:
        try:
            config = load(args.config)
        except ConfigError as exc:
            for problem in exc.problems:
                print(problem, file=sys.stderr)
            return 2
        except OSError as exc:
            return _fail(command, f"cannot read config {args.config}: {exc}", 2)
        db = config.events_path
        if config.cluster is not None and not args.local:
            from ..cluster.redis_store import sync_client
            from ..serve.preflight import redis_password

            client = sync_client(config.cluster.redis, redis_password(config))
            try:
                client.ping()
                return FleetLog(client)
            except RedisError as exc:
                print(f"summon {command}: the fleet's stream is unreachable ({exc}): this node's events only",
                      file=sys.stderr)
    try:
        return open_readonly(db)
    except FileNotFoundError:
        return _fail(command, f"no event database at {db} (has the proxy run yet? use --db or -c)", 1)


def _where(reader: EventReader | FleetLog) -> str:
    return "the fleet's event stream" if isinstance(reader, FleetLog) else str(reader.path)


# --- log -----------------------------------------------------------------------------


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    return f"{seconds * 1000:.0f}ms" if seconds < 1.0 else f"{seconds:.2f}s"


def _compact(detail: dict[str, Any]) -> str:
    """``key=value`` pairs; strings bare unless they contain spaces, anything else as JSON."""
    parts = []
    for key, value in detail.items():
        if isinstance(value, str) and value and " " not in value and "=" not in value:
            text = value
        else:
            text = json.dumps(value, default=str, separators=(",", ":"))
        parts.append(f"{key}={text}")
    return " ".join(parts)


def format_events(events: list[Event]) -> str:
    """One aligned line per event: time, kind, route, instance, host/region, duration, detail."""
    nodes = any(e.node for e in events)  # a fleet's log: say where each event happened
    rows = [
        (iso_time(e.ts) + (f"  {e.node or '-'}" if nodes else ""), e.kind, e.route or "-", e.instance or "-",
         "/".join(x for x in (e.host, e.region) if x) or "-", _duration(e.duration_s), _compact(e.detail))
        for e in events
    ]
    if not rows:
        return ""
    widths = [max(len(r[i]) for r in rows) for i in range(6)]
    lines = []
    for r in rows:
        cols = [r[i].ljust(widths[i]) for i in range(5)] + [r[5].rjust(widths[5]), r[6]]
        lines.append("  ".join(cols).rstrip())
    return "\n".join(lines)


def run_log(args: argparse.Namespace) -> int:
    reader = _open(args, "log")
    if isinstance(reader, int):
        return reader
    try:
        events = reader.query(since=args.since, route=args.route, limit=args.limit, newest=True)
    except (sqlite3.Error, RedisError) as exc:
        return _fail("log", f"cannot read {_where(reader)}: {exc}", 1)
    if args.json:
        for e in events:
            print(json_line(e))
    elif events:
        print(format_events(events))
    return 0


# --- stats ---------------------------------------------------------------------------


def run_stats(args: argparse.Namespace) -> int:
    reader = _open(args, "stats")
    if isinstance(reader, int):
        return reader
    now = time.time()
    try:
        if isinstance(reader, FleetLog):  # the whole stream: compute() charges what ran into the window
            events = reader.query(until=now)
        else:
            # Instances started before the window still cost inside it: fetch just those.
            before = reader.running_at(args.since) if args.since is not None else []
            events = before + reader.query(since=args.since, until=now)
    except (sqlite3.Error, RedisError) as exc:
        return _fail("stats", f"cannot read {_where(reader)}: {exc}", 1)
    rows = stats.compute(events, now=now, since=args.since)
    phases = stats.phase_stats(events, since=args.since)
    if args.json:
        print(stats.to_json(rows, phases))
    else:
        print(stats.format_table(rows))
        if phases:
            print()
            print(stats.format_phases(phases))
    return 0
