"""Route-table figures for 1k, 10k and 100k routes: load time, memory per route, lookup time.

Each size runs in a fresh interpreter (so memory and caches do not carry over): it
writes a route table of mixed hosts (exact names and `*.suffix` wildcards), exact URLs
and prefixes, loads and validates it with `proxy.config.load` (the same code as
`summon check` and `serve`), builds the `RouteTable`, and times single lookups of
random request paths (hits on exact URLs, hits under prefixes, misses).
Goals: 100k routes load in under 2 s, under 1 KiB per idle route, lookup p99 under
5 us and flat from 1k to 100k.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
GOAL_LOAD_S = 2.0
GOAL_BYTES_PER_ROUTE = 1024
GOAL_LOOKUP_P99_US = 5.0

_CHILD = r'''
import json, random, sys, time, tracemalloc, gc
sys.path.insert(0, sys.argv[3])
from proxy.config import load
from proxy.routing.table import RouteTable
n, tmp = int(sys.argv[1]), sys.argv[2]
lines = []
for i in range(n):
    host = f"site{i % 1000}.example.com" if i % 3 else f"*.zone{i % 50}.example.org"
    if i % 2:
        lines.append(f'[[route]]\nname = "r{i}"\nhost = "{host}"\nurl = "/page/{i}/index.html"\nimage = "decks"\n')
    else:
        lines.append(f'[[route]]\nname = "r{i}"\nhost = "{host}"\npath = "/app{i}"\nupstreams = ["127.0.0.1:9000"]\n')
open(f"{tmp}/routes.toml", "w").write("\n".join(lines))
open(f"{tmp}/summon.toml", "w").write('include = ["routes.toml"]\n')
gc.collect()
t0 = time.perf_counter()
config = load(f"{tmp}/summon.toml")
table = RouteTable(config.routes)
load_s = time.perf_counter() - t0
del config
gc.collect()
tracemalloc.start()
config = load(f"{tmp}/summon.toml")
table = RouteTable(config.routes)
del config
gc.collect()
mem = tracemalloc.get_traced_memory()[0]
tracemalloc.stop()
rng = random.Random(7)
queries = []
for _ in range(200_000):
    i = rng.randrange(n)
    host = f"site{i % 1000}.example.com" if i % 3 else f"www.zone{i % 50}.example.org"
    kind = rng.random()
    if kind < 0.45:
        path = f"/page/{i}/index.html"
    elif kind < 0.9:
        path = f"/app{i}/some/deeper/path.css"
    else:
        path = f"/missing/{i}"
    queries.append((host, path))
lookup = table.find  # a miss returns None; the 404 itself is built by the caller
times = [0] * len(queries)
clock = time.perf_counter_ns
gc.collect()
gc.disable()  # the collector's pauses would be charged to whichever lookup they hit
for n_, (host, path) in enumerate(queries):
    t = clock()
    lookup(host, path)
    times[n_] = clock() - t
gc.enable()
times.sort()
base = []
for host, path in queries[:50_000]:  # the timer's own cost, to subtract
    t = clock()
    base.append(clock() - t)
base.sort()
print(json.dumps({"routes": n, "load_s": load_s, "bytes": mem,
                  "lookup_p50_ns": times[len(times) // 2], "lookup_p99_ns": times[int(len(times) * 0.99)],
                  "timer_ns": base[len(base) // 2]}))
'''


def measure(n: int, tmp: Path) -> dict[str, Any]:
    d = tmp / f"routes-{n}"
    d.mkdir(parents=True, exist_ok=True)
    out = subprocess.run([sys.executable, "-c", _CHILD, str(n), str(d), str(ROOT)], capture_output=True, text=True,
                         check=True)
    r = json.loads(out.stdout)
    timer = r["timer_ns"]
    return {
        "routes": n,
        "load_s": round(r["load_s"], 3),
        "bytes_per_route": round(r["bytes"] / n, 1),
        "lookup_p50_us": round(max(0, r["lookup_p50_ns"] - timer) / 1000, 3),
        "lookup_p99_us": round(max(0, r["lookup_p99_ns"] - timer) / 1000, 3),
    }


def section_routes(bench: Any) -> dict[str, Any]:
    sizes = [1_000, 10_000, 100_000]
    rows = []
    for n in sizes:
        bench.log(f"route table: {n} routes")
        rows.append(measure(n, bench.tmp))
    print(f"{'routes':>8} {'load s':>8} {'B/route':>8} {'p50 us':>8} {'p99 us':>8}")
    for r in rows:
        print(f"{r['routes']:>8} {r['load_s']:>8} {r['bytes_per_route']:>8} {r['lookup_p50_us']:>8} {r['lookup_p99_us']:>8}")
    big, small = rows[-1], rows[0]
    flat = big["lookup_p99_us"] <= max(2 * small["lookup_p99_us"], small["lookup_p99_us"] + 1.0)
    goals = {
        "load_100k_s": {"value": big["load_s"], "goal": f"< {GOAL_LOAD_S}",
                        "status": "PASS" if big["load_s"] < GOAL_LOAD_S else "FAIL"},
        "bytes_per_route_100k": {"value": big["bytes_per_route"], "goal": f"< {GOAL_BYTES_PER_ROUTE}",
                                 "status": "PASS" if big["bytes_per_route"] < GOAL_BYTES_PER_ROUTE else "FAIL"},
        "lookup_p99_us_100k": {"value": big["lookup_p99_us"], "goal": f"< {GOAL_LOOKUP_P99_US}",
                               "status": "PASS" if big["lookup_p99_us"] < GOAL_LOOKUP_P99_US else "FAIL"},
        "lookup_flat_1k_to_100k": {"value": [small["lookup_p99_us"], big["lookup_p99_us"]],
                                   "goal": "p99 at 100k within 2x (or +1 us) of 1k",
                                   "status": "PASS" if flat else "FAIL"},
    }
    for name, g in goals.items():
        print(f"  {name:<26} {g['value']!s:>16}   goal {g['goal']:<40} {g['status']}")
    return {"sizes": rows, "goals": goals}
