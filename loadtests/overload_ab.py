"""Fixed-rate A/B runs for the overload rule: variants of summon (and nginx) offered the
same arrival rate, alternating, under the overload bench's CPU cap and generator.

Why beside the `overload` section: that section sweeps for each target's saturation and
reports ratios, over ten minutes for three rounds, and its ratios move by several hundredths
from one run to the next on a shared machine. Comparing two versions of a rule needs
something else: the same offered rate for both, many short rounds, each variant a fresh
process, the order rotating so that neither always meets the machine's noise first, and
the figures that say where the CPU went (answers on new connections, 503s, resets).

    .venv/bin/python loadtests/overload_ab.py --rate 1800 --rounds 5 summon base=../wt-base nginx

A variant is `summon` (this checkout), `nginx` (the bench's reverse proxy), or
`NAME=DIR`: summon with the `proxy` package of checkout DIR first on PYTHONPATH (this
checkout's venv and dependencies otherwise). Each run: a fresh, capped process, a warm-up
of `--warmup` seconds at half the rate, then `--duration` seconds at the rate. Printed:
every run, then the medians per variant; `--out` keeps them as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_overload as bo  # noqa: E402
import benchlib as bl  # noqa: E402
import targets as tg  # noqa: E402

FIGURES = ("goodput_per_s", "goodput_with_tail_per_s", "cpu_us_per_ok", "p99_ms", "ok_first", "opened", "shed_503",
           "reset", "refused", "unanswered")


def start(bench: tg.Bench, variant: str, upstream_port: int) -> tuple[bl.Proc, int]:
    if variant == "nginx":
        return tg.start_nginx_proxy(bench, upstream_port)
    name, _, where = variant.partition("=")
    env = None
    if where:
        src = Path(where).resolve()
        if not (src / "proxy" / "__init__.py").exists():
            raise SystemExit(f"overload_ab: variant {name}: {src} holds no proxy package")
        env = {**os.environ, "PYTHONPATH": str(src)}
    return bo._start_summon(bench, tg, upstream_port, f"ab-{name}", env)  # the overload section's limits


def one_run(bench: tg.Bench, variant: str, upstream_port: int, rate: float, duration: float,
            warmup: float) -> dict[str, Any]:
    proc, port = start(bench, variant, upstream_port)
    with bo.confined(bench, proc) as cgroup:
        if warmup > 0:
            bo.open_loop(bench, port, rate / 2, warmup)
            bo._settle(bl, port)
        r = bo._run(bench, port, rate, duration, proc.pid)
    r["capped"] = cgroup is not None
    return r


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("variants", nargs="+", help="summon, nginx or NAME=DIR (see above)")
    p.add_argument("--rate", type=float, required=True, help="offered GETs per second")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=5.0, help="seconds at the rate, per run")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds at half the rate first")
    p.add_argument("--out", help="JSON file for every run and the medians")
    args = p.parse_args(argv)
    names = [v.partition("=")[0] for v in args.variants]
    if len(set(names)) != len(names):
        raise SystemExit("overload_ab: two variants share a name")
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory(prefix="summon-ab-") as tmp, bl.Processes(Path(tmp) / "logs") as procs:
        bench = tg.Bench(args=args, tmp=Path(tmp), procs=procs, duration_s=args.duration, warmup_s=args.warmup)
        _, upstream_port = tg.start_upstream(bench)
        for i in range(args.rounds):
            k = i % len(args.variants)
            for variant in args.variants[k:] + args.variants[:k]:  # the order rotates per round
                name = variant.partition("=")[0]
                r = one_run(bench, variant, upstream_port, args.rate, args.duration, args.warmup)
                r["round"], r["loadavg"] = i + 1, bl.loadavg()
                runs[name].append(r)
                print(f"round {i + 1} {name:>10}: " + ", ".join(f"{f} {r.get(f)}" for f in FIGURES), flush=True)
                time.sleep(0.5)
    medians = {n: {f: bl.median(r.get(f) for r in rs) for f in FIGURES} for n, rs in runs.items()}
    print(f"\nmedians over {args.rounds} rounds at {args.rate:.0f}/s offered for {args.duration:.0f} s:")
    print(f"  {'':<24}" + "".join(f"{n:>12}" for n in medians))
    for f in FIGURES:  # one row per figure: the names are long
        print(f"  {f:<24}" + "".join(f"{_cell(m[f]):>12}" for m in medians.values()))
    if args.out:
        Path(args.out).write_text(json.dumps({"rate": args.rate, "duration_s": args.duration, "runs": runs,
                                              "medians": medians}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
