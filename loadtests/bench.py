"""`make bench`: throughput and latency of summon next to nginx and mitmproxy.

    python loadtests/bench.py [--quick] [--out loadtests/results/bench.json] [--only proxy]

Everything runs on 127.0.0.1 with configs and logs in a temporary directory; every
process started here is stopped by PID at the end, also on errors and Ctrl-C.

The run is a list of sections (SECTIONS below). Each is a function taking the shared
Bench context and returning a dict, stored in the JSON file under the section's name;
`--only a,b` runs a subset. Exit code: 0 when the harness ran (missed goals and
unavailable targets are reported, not fatal), 1 on a harness error, 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as bl  # noqa: E402
from targets import (  # noqa: E402
    BODY,
    GOAL_ADDED_P50_MS,
    GOAL_MITM_RATIO,
    GOAL_NGINX_RATIO,
    ROOT,
    Bench,
    HarnessError,
    Starter,
    TargetUnavailable,
    figure,
    fmt,
    probe,
    round_ratios,
    start_and_measure,
    start_mitmproxy,
    start_nginx_proxy,
    start_summon,
    start_upstream,
)

# ---------------------------------------------------------------------------
# sections


def section_proxy(bench: Bench) -> dict:
    """Direct upstream vs nginx proxy vs summon vs mitmproxy, wrk at c1 and c32.

    Every target is started first; then `--repeat` rounds each measure every target in
    turn. A drift in the machine's speed (these machines are shared) then falls on all
    targets alike, and the summon/nginx goal is the median of the per-round ratios."""
    concurrencies = [1, 32]
    mitm_duration = min(bench.duration_s, bench.args.mitm_duration)

    bench.log("proxy: starting the upstream (nginx, return 200)")
    try:
        up_proc, up_port = start_upstream(bench)
        probe(up_port)
    except TargetUnavailable as e:
        raise HarnessError(f"the upstream is needed by every target: {e}") from None

    starters: list[tuple[str, Starter | None, float]] = [
        ("direct", None, bench.duration_s),
        ("nginx", start_nginx_proxy, bench.duration_s),
        ("summon", start_summon, bench.duration_s),
        ("mitmproxy", start_mitmproxy, mitm_duration),
    ]
    if bench.args.targets:
        starters = [s for s in starters if s[0] in bench.args.targets]
    targets = start_and_measure(bench, "proxy", starters, up_port, concurrencies)
    if not up_proc.alive():
        raise HarnessError(f"the upstream nginx died during the run:\n{up_proc.output_tail()}")
    bench.procs.stop(up_proc)

    summon_nginx = bl.median(round_ratios(targets, "summon", "nginx", 32))
    summon_mitm = bl.ratio(
        figure(targets, "summon", 32, "requests_per_s"), figure(targets, "mitmproxy", 32, "requests_per_s")
    )
    added = bl.difference(figure(targets, "summon", 1, "p50_ms"), figure(targets, "direct", 1, "p50_ms"))
    goals = {
        "summon_over_nginx_rps_c32": {
            "value": summon_nginx,
            "goal": f">= {GOAL_NGINX_RATIO}",
            "status": bl.check_goal(summon_nginx, ">=", GOAL_NGINX_RATIO),
        },
        "summon_over_mitmproxy_rps_c32": {
            "value": summon_mitm,
            "goal": f">= {GOAL_MITM_RATIO}",
            "status": bl.check_goal(summon_mitm, ">=", GOAL_MITM_RATIO),
        },
        "summon_added_p50_ms_c1": {
            "value": added,
            "goal": f"< {GOAL_ADDED_P50_MS}",
            "status": bl.check_goal(added, "<", GOAL_ADDED_P50_MS),
        },
    }
    # The same figures for the references, for context (no goal).
    reference = {
        "nginx_added_p50_ms_c1": bl.difference(
            figure(targets, "nginx", 1, "p50_ms"), figure(targets, "direct", 1, "p50_ms")
        ),
        "mitmproxy_added_p50_ms_c1": bl.difference(
            figure(targets, "mitmproxy", 1, "p50_ms"), figure(targets, "direct", 1, "p50_ms")
        ),
        "nginx_over_direct_rps_c32": bl.ratio(
            figure(targets, "nginx", 32, "requests_per_s"), figure(targets, "direct", 32, "requests_per_s")
        ),
        "nginx_over_mitmproxy_rps_c32": bl.ratio(
            figure(targets, "nginx", 32, "requests_per_s"), figure(targets, "mitmproxy", 32, "requests_per_s")
        ),
    }
    print_proxy_table(targets, goals, concurrencies)
    return {
        "settings": {
            "duration_s": bench.duration_s,
            "mitmproxy_duration_s": mitm_duration,
            "warmup_s": bench.warmup_s,
            "repeat": bench.args.repeat,
            "wrk_threads": 1,
            "concurrencies": concurrencies,
            "response_body_bytes": len(BODY),
        },
        "summon_over_nginx_rps_c32_per_round": round_ratios(targets, "summon", "nginx", 32),
        "targets": targets,
        "goals": goals,
        "reference": reference,
    }


def print_targets_table(targets: dict, concurrencies: list[int], width: int = 10) -> None:
    """target x concurrency: req/s, p50, p99, errors (shared by the proxy and mitm sections)."""
    print()
    print(f"{'target':<{width}} {'conc':>4} {'req/s':>11} {'p50 ms':>9} {'p99 ms':>9} {'errors':>7}")
    print("-" * (width + 45))
    for name, t in targets.items():
        if not t.get("available"):
            print(f"{name:<{width}} {'':>4} {'unavailable':>11}")
            continue
        for c in concurrencies:
            r = t["runs"].get(f"c{c}", {})
            if "error" in r:
                print(f"{name:<{width}} {c:>4} {'wrk failed':>11}")
                continue
            print(
                f"{name:<{width}} {c:>4} {fmt(r.get('requests_per_s'), 1):>11} {fmt(r.get('p50_ms'), 3):>9}"
                f" {fmt(r.get('p99_ms'), 3):>9} {r.get('errors', 0):>7}"
            )
    print()


def print_proxy_table(targets: dict, goals: dict, concurrencies: list[int]) -> None:
    print_targets_table(targets, concurrencies)
    labels = {
        "summon_over_nginx_rps_c32": "summon / nginx req/s at c32",
        "summon_over_mitmproxy_rps_c32": "summon / mitmproxy req/s at c32",
        "summon_added_p50_ms_c1": "summon p50 - direct p50 at c1 (ms)",
    }
    for key, g in goals.items():
        print(f"{labels[key]:<38} {fmt(g['value'], 3):>8}   goal {g['goal']:<7} {g['status']}")
    print()


from bench_cold import section_cold, section_cold_vm  # noqa: E402
from bench_fleet import section_fleet  # noqa: E402
from bench_hotpath import section_hotpath  # noqa: E402
from bench_mitm import section_mitm  # noqa: E402
from bench_overload import section_overload  # noqa: E402
from bench_page import section_page  # noqa: E402
from bench_plugin import section_plugin  # noqa: E402
from bench_routes import section_routes  # noqa: E402

SECTIONS: dict[str, Callable[[Bench], dict]] = {
    "proxy": section_proxy,
    "hotpath": section_hotpath,
    "cold": section_cold,
    "cold_vm": section_cold_vm,
    "routes": section_routes,
    "mitm": section_mitm,
    "overload": section_overload,
    "fleet": section_fleet,
    "plugin": section_plugin,
    "page": section_page,
}


# ---------------------------------------------------------------------------
# main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="2 s runs instead of 5 s")
    p.add_argument("--duration", type=float, help="seconds per measured wrk run (default 5, 2 with --quick)")
    p.add_argument("--repeat", type=int, default=3,
                   help="rounds (proxy section: interleaved over the targets); medians are reported")
    p.add_argument("--mitm-duration", type=float, default=3.0, help="cap on mitmproxy's run length (s)")
    p.add_argument("--wrk-timeout", type=float, default=2.0, help="wrk --timeout (s); slower replies count as errors")
    p.add_argument("--out", default=str(ROOT / "loadtests" / "results" / "bench.json"), help="JSON file to write")
    p.add_argument("--only", action="append", help=f"sections to run, comma-separated ({', '.join(SECTIONS)})")
    p.add_argument(
        "--targets", help="proxy section: comma-separated subset of direct,nginx,summon,mitmproxy (default all)"
    )
    p.add_argument("--no-install", action="store_true", help="never run scripts/setup-mitmproxy.sh")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temporary directory (configs and logs)")
    args = p.parse_args(argv)
    only = [s.strip() for group in (args.only or []) for s in group.split(",") if s.strip()]
    unknown = [s for s in only if s not in SECTIONS]
    if unknown:
        p.error(f"unknown section(s) {', '.join(unknown)}; known: {', '.join(SECTIONS)}")
    args.only = only or list(SECTIONS)
    args.targets = [t.strip() for t in args.targets.split(",")] if args.targets else []
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    return args


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGHUP, _raise_interrupt)
    if shutil.which("wrk") is None:
        print("bench: wrk not found (Debian: apt-get install wrk; or run scripts/setup.sh)", file=sys.stderr)
        return 1

    tmp = Path(tempfile.mkdtemp(prefix="summon-bench-"))
    procs = bl.Processes(tmp / "logs")
    duration = args.duration if args.duration else (2.0 if args.quick else 5.0)
    bench = Bench(args, tmp, procs, duration_s=duration, warmup_s=1.0)
    started = time.time()
    results: dict[str, dict] = {}
    failed = False
    try:
        for name in args.only:
            t0 = time.monotonic()
            try:
                results[name] = SECTIONS[name](bench)
            except HarnessError as e:
                print(f"bench: section {name}: {e}", file=sys.stderr)
                results[name] = {"error": str(e)}
                failed = True
            except Exception as e:  # a bug in the harness: report it, run the other sections
                traceback.print_exc()
                results[name] = {"error": f"{type(e).__name__}: {e}"}
                failed = True
            finally:
                procs.stop_all()
            results[name]["elapsed_s"] = round(time.monotonic() - t0, 2)
    except KeyboardInterrupt:
        print("\nbench: interrupted, stopping processes", file=sys.stderr)
        procs.stop_all()
        return 130
    finally:
        procs.stop_all()
        if args.keep_tmp:
            print(f"bench: configs and logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    results["meta"] = meta(started, args)
    bl.write_json(args.out, results)
    print(f"bench: wrote {args.out}")
    for msg in bench.messages:
        print(f"bench: note: {msg.splitlines()[0]}")
    return 1 if failed else 0


def meta(started: float, args: argparse.Namespace) -> dict:
    def git(*cmd: str) -> str | None:
        try:
            cp = subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True, timeout=10, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return cp.stdout.strip() if cp.returncode == 0 else None

    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    try:
        nv = subprocess.run([nginx, "-v"], capture_output=True, text=True, check=False).stderr.strip()
    except OSError:
        nv = None
    return {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "sections": args.only,
        "quick": args.quick,
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "wrk": bl.wrk_version(),
        "nginx": nv,
    }


if __name__ == "__main__":
    sys.exit(main())
