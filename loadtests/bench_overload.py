"""Overload figure for `make bench`: goodput and p99 at 2x the proxy's saturation rate,
next to the same figures at saturation.

Method (wrk cannot hold a fixed arrival rate and wrk2 is not packaged here):
1. Saturation: wrk, closed loop, one thread, over 1..128 connections; the saturation
   rate is the peak req/s of that sweep.
2. An open-loop generator (below, one uvloop process) sends GETs at a fixed arrival rate,
   whatever the answers do: each arrival takes an idle keep-alive connection or opens a
   new one (up to 2,048), so when summon slows down the generator opens connections, as
   independent clients would. Latency is measured from the scheduled arrival time (no
   coordinated omission). Goodput is 2xx answers per second; shed is 503s per second.
3. It runs at 1x and 2x the saturation rate against summon with overload limits
   (max_inflight 256, max_connections 1,024). The goal: goodput at 2x is at least 80% of
   goodput at 1x (it must not collapse), and the 2xx p99 at 2x stays within 10x of 1x.

On a 2-core machine one Python generator cannot offer twice what summon serves on a
whole core, so summon runs in a CPU cgroup capped at `CPU_SHARE` of a core (cgroup v1 or
v2, when writable: root) and the generator is pinned to the other core. The overload is
then real: the generator can send 2x the capped saturation rate. Without a writable
cgroup the section runs uncapped and says so; `offered_per_s` always tells what the
generator managed to send.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
GOAL_GOODPUT_RATIO = 0.8  # goodput at 2x / goodput at 1x, at least
GOAL_P99_RATIO = 10.0  # 2xx p99 at 2x / at 1x, at most

GENERATOR = r'''
import asyncio, json, sys, time
import uvloop

host, port, rate, duration, max_conns = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
REQ = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"
stats = {"sent": 0, "ok": 0, "shed": 0, "other": 0, "errors": 0, "dropped": 0, "opened": 0}
lat_ok = []
idle = []
conns = set()

class Client(asyncio.Protocol):
    def __init__(self, scheduled):
        self.scheduled = [scheduled]
        self.buf = b""
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport
        transport.write(REQ)

    def send(self, scheduled):
        self.scheduled.append(scheduled)
        self.transport.write(REQ)

    def data_received(self, data):
        self.buf += data
        while self.scheduled:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end].lower()
            i = head.find(b"content-length:")
            length = int(head[i + 15:head.find(b"\r\n", i) if head.find(b"\r\n", i) > 0 else None]) if i >= 0 else 0
            if len(self.buf) < end + 4 + length:
                return
            self.buf = self.buf[end + 4 + length:]
            status = int(head[9:12])
            t = self.scheduled.pop(0)
            if 200 <= status < 300:
                stats["ok"] += 1
                lat_ok.append(time.perf_counter() - t)
            elif status == 503:
                stats["shed"] += 1
            else:
                stats["other"] += 1
            if b"connection: close" in head:
                self.transport.close()
                return
            idle.append(self)

    def connection_lost(self, exc):
        conns.discard(self)
        if self in idle:
            idle.remove(self)
        stats["errors"] += len(self.scheduled)
        self.scheduled = []

async def main():
    loop = asyncio.get_running_loop()
    t0 = time.perf_counter()
    sent = 0
    while True:
        now = time.perf_counter()
        if now - t0 >= duration:
            break
        due = int((now - t0) * rate)
        while sent < due:
            scheduled = t0 + sent / rate
            sent += 1
            if idle:
                idle.pop().send(scheduled)
            elif len(conns) < max_conns:
                c = Client(scheduled)
                conns.add(c)
                stats["opened"] += 1
                loop.create_task(loop.create_connection(lambda c=c: c, host, port)).add_done_callback(
                    lambda f, c=c: (f.exception() and (conns.discard(c), stats.__setitem__("errors", stats["errors"] + 1))))
            else:
                stats["dropped"] += 1
                continue
            stats["sent"] += 1
        await asyncio.sleep(0.001)
    await asyncio.sleep(1.0)  # let answers in flight arrive
    lat_ok.sort()
    def q(p):
        return round(lat_ok[min(len(lat_ok) - 1, int(len(lat_ok) * p))] * 1000, 3) if lat_ok else None
    print(json.dumps({**stats, "rate": rate, "duration_s": duration, "offered_per_s": round(stats["sent"] / duration, 1),
                      "goodput_per_s": round(stats["ok"] / duration, 1), "shed_per_s": round(stats["shed"] / duration, 1),
                      "p50_ms": q(0.5), "p99_ms": q(0.99)}))
    for c in list(conns):
        if c.transport is not None:
            c.transport.close()

uvloop.run(main())
'''


CPU_SHARE = 0.15  # of one core, for summon during this section: low enough that one generator can offer 2x


def cap_cpu(pid: int, share: float) -> Path | None:
    """Put `pid` in a new CPU cgroup limited to `share` of a core; the cgroup's path, or None."""
    period = 100_000
    quota = max(1000, int(share * period))
    v1 = Path("/sys/fs/cgroup/cpu")
    v2 = Path("/sys/fs/cgroup/cgroup.controllers")
    try:
        if (v1 / "cpu.cfs_quota_us").exists():
            d = v1 / f"summon-bench-{os.getpid()}"
            d.mkdir(exist_ok=True)
            (d / "cpu.cfs_period_us").write_text(str(period))
            (d / "cpu.cfs_quota_us").write_text(str(quota))
        elif v2.exists() and "cpu" in v2.read_text().split():
            d = Path("/sys/fs/cgroup") / f"summon-bench-{os.getpid()}"
            d.mkdir(exist_ok=True)
            (d / "cpu.max").write_text(f"{quota} {period}")
        else:
            return None
        (d / "cgroup.procs").write_text(str(pid))
        return d
    except OSError:
        return None


def _bench() -> Any:
    main = sys.modules.get("__main__")
    return main if hasattr(main, "start_upstream") else importlib.import_module("bench")


def open_loop(bench: Any, port: int, rate: float, duration_s: float) -> dict[str, Any]:
    script = bench.tmp / "openloop.py"
    script.write_text(GENERATOR)
    pin = ["taskset", "-c", "1"] if (os.cpu_count() or 1) > 1 and _has("taskset") else []
    cp = subprocess.run([*pin, sys.executable, str(script), HOST, str(port), str(rate), str(duration_s), "2048"],
                        capture_output=True, text=True, timeout=duration_s + 60, check=False)
    if cp.returncode != 0 or not cp.stdout.strip():
        raise RuntimeError(f"open-loop generator failed: {cp.stderr[-2000:]}")
    return dict(json.loads(cp.stdout.strip().splitlines()[-1]))


def _has(program: str) -> bool:
    import shutil

    return shutil.which(program) is not None


def section_overload(bench: Any) -> dict[str, Any]:
    B = _bench()
    bl = sys.modules["benchlib"]
    quick = bool(getattr(bench.args, "quick", False))
    duration = 3.0 if quick else 8.0
    _, upstream_port = B.start_upstream(bench)
    proc, port = B.start_summon(bench, upstream_port, "summon-overload", "max_inflight = 256\nmax_connections = 1024\n")
    if (os.cpu_count() or 1) > 1:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(proc.pid, {0})
    cgroup = cap_cpu(proc.pid, CPU_SHARE)
    bench.log(f"  summon capped at {CPU_SHARE:.0%} of a core ({cgroup})" if cgroup else
              "  no writable CPU cgroup: summon runs uncapped (the generator may not reach 2x)")
    try:
        return _overload(bench, B, bl, port, duration, quick) | {"summon_cpu_share": CPU_SHARE if cgroup else None}
    finally:
        bench.procs.stop(proc)
        if cgroup is not None:
            with contextlib.suppress(OSError):
                cgroup.rmdir()


def _overload(bench: Any, B: Any, bl: Any, port: int, duration: float, quick: bool) -> dict[str, Any]:
    url = f"http://{HOST}:{port}/"
    sweep = []
    for c in ([1, 8, 32, 128] if quick else [1, 2, 4, 8, 16, 32, 64, 128]):
        r = bl.run_wrk(url, duration_s=min(duration, 4.0), connections=c, threads=1)
        sweep.append({"connections": c, "requests_per_s": r["requests_per_s"], "p99_ms": r.get("latency_ms", {}).get("p99") or r.get("latency_ms", {}).get("99"),
                      "non2xx": r.get("non2xx", 0)})
        bench.log(f"  saturation sweep c{c}: {r['requests_per_s']:.0f} req/s, p99 {sweep[-1]['p99_ms']} ms")
    saturation = max(s["requests_per_s"] for s in sweep)
    at_1x = open_loop(bench, port, saturation, duration)
    at_2x = open_loop(bench, port, 2 * saturation, duration)
    for name, r in (("1x", at_1x), ("2x", at_2x)):
        bench.log(f"  open loop {name} ({r['rate']:.0f}/s offered, {r['offered_per_s']}/s sent): goodput "
                  f"{r['goodput_per_s']}/s, shed {r['shed_per_s']}/s, errors {r['errors']}, p99 {sweep[-1]['p99_ms']} ms")
    limited = [name for name, r in (("1x", at_1x), ("2x", at_2x)) if r["offered_per_s"] < 0.9 * r["rate"]]
    if limited:
        bench.log(f"  NOTE: the generator could not offer the {'/'.join(limited)} rate (it shares the cores with "
                  "summon): those figures are at the rate it reached, see offered_per_s")
    good_ratio = bl.ratio(at_2x["goodput_per_s"], at_1x["goodput_per_s"])
    p99_ratio = bl.ratio(at_2x["p99_ms"], at_1x["p99_ms"])
    goals = {
        "goodput_2x_over_1x": {"value": good_ratio, "goal": f">= {GOAL_GOODPUT_RATIO}",
                               "status": bl.check_goal(good_ratio, ">=", GOAL_GOODPUT_RATIO)},
        "p99_2x_over_1x": {"value": p99_ratio, "goal": f"<= {GOAL_P99_RATIO}",
                           "status": bl.check_goal(p99_ratio, "<=", GOAL_P99_RATIO)},
    }
    for name, g in goals.items():
        print(f"  {name:<22} {g['value']!s:>10}   goal {g['goal']:<8} {g['status']}")
    return {"method": "wrk closed-loop sweep for saturation; open-loop fixed-rate generator at 1x and 2x",
            "limits": {"max_inflight": 256, "max_connections": 1024},
            "saturation_per_s": saturation, "generator_limited": limited, "sweep": sweep, "at_1x": at_1x, "at_2x": at_2x, "goals": goals}
