"""Overload figure for `make bench`: goodput and p99 at 2x the proxy's saturation rate,
next to the same figures at saturation.

Method (wrk cannot hold a fixed arrival rate and wrk2 is not packaged here):
1. summon runs pinned to one core, in a CPU cgroup capped at `CPU_SHARE` of it, so that
   summon is the bottleneck and one Python generator on the other core can offer twice
   what it serves. The cap is a 1 ms quota per `1 ms / CPU_SHARE` period: a slower CPU
   rather than one that stops for most of a 100 ms period (cgroup v1 or v2, when
   writable: root). Without a writable cgroup the section runs uncapped and says so. Its
   route to nginx allows 1,024 upstream connections (nginx takes any number): with the
   default 32 per replica, the slowed-down summon would queue requests for upstream
   connections rather than saturate its CPU, and the figure would measure that cap.
2. Saturation: wrk, closed loop, one thread, over 1..128 connections; the saturation rate
   is the peak 2xx rate of that sweep.
3. An open-loop generator (below, one uvloop process) sends GETs at a fixed arrival rate,
   whatever the answers do: each arrival takes an idle keep-alive connection or opens a
   new one (up to 2,048; past that it is counted as `dropped`), as independent clients
   would. Latency is measured from the scheduled arrival (no coordinated omission).
   `offered_per_s` counts every arrival (goal: at 2x, at least 1.95x saturation), and
   `send_lag_p99_ms` says how late the generator itself was. Goodput is 2xx answers per
   second. Shed is what summon turned away: 503s (`shed_503`), connections refused at
   connect (`refused`) or reset from the backlog before any answer (`reset`); summon
   refuses connections while it is overloaded (proxy/overload.py), and its own count is
   under `summon_overload`. `unanswered` is what was still waiting 1 s after the run.
4. It runs at 1x and 2x the saturation rate, against summon with its overload limits
   (max_inflight 256, max_connections 1,024). The goals: goodput at 2x is at least 80% of
   goodput at 1x (it must not collapse), and the 2xx p99 at 2x stays within 10x of 1x.
   The saturation rate is the sweep's best moment, so 1x already overloads a little.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
GOAL_GOODPUT_RATIO = 0.8  # goodput at 2x / goodput at 1x, at least
GOAL_P99_RATIO = 10.0  # 2xx p99 at 2x / at 1x, at most
GOAL_OFFERED_RATIO = 1.95  # what the generator offered at "2x" / saturation, at least
CPU_SHARE = 0.08  # of one core, for summon during this section: low enough that one generator can offer 2x
QUOTA_US = 1000  # the smallest CFS quota: the shorter the period, the smoother the cap
MAX_CONNS = 2048  # the generator's connections, at most

GENERATOR = r'''
import asyncio, json, sys, time
import uvloop

host, port, rate, duration, max_conns = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
REQ = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"
stats = {"offered": 0, "sent": 0, "ok": 0, "shed_503": 0, "refused": 0, "reset": 0, "other": 0, "errors": 0,
         "dropped": 0, "opened": 0}
lat_ok = []
send_lag = []
idle = []
conns = set()

class Client(asyncio.Protocol):
    def __init__(self, scheduled):
        self.scheduled = [scheduled]
        self.buf = b""
        self.transport = None
        self.answered = False

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
            self.answered = True
            if 200 <= status < 300:
                stats["ok"] += 1
                lat_ok.append(time.perf_counter() - t)
            elif status == 503:
                stats["shed_503"] += 1
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
        if self.scheduled:
            # reset before any answer: summon refused it from its accept queue
            key = "reset" if isinstance(exc, ConnectionResetError) and not self.answered else "errors"
            stats[key] += len(self.scheduled)
        self.scheduled = []

def connected(fut, c):
    exc = fut.exception()
    if exc is not None:
        conns.discard(c)
        stats["refused" if isinstance(exc, (ConnectionRefusedError, ConnectionResetError)) else "errors"] += 1

async def main():
    loop = asyncio.get_running_loop()
    t0 = time.perf_counter()
    n = 0
    while True:
        now = time.perf_counter()
        if now - t0 >= duration:
            break
        due = min(int((now - t0) * rate), int(duration * rate))
        while n < due:
            scheduled = t0 + n / rate
            n += 1
            stats["offered"] += 1
            if idle:
                idle.pop().send(scheduled)
            elif len(conns) < max_conns:
                c = Client(scheduled)
                conns.add(c)
                stats["opened"] += 1
                loop.create_task(loop.create_connection(lambda c=c: c, host, port)).add_done_callback(
                    lambda f, c=c: connected(f, c))
            else:
                stats["dropped"] += 1
                continue
            stats["sent"] += 1
            send_lag.append(time.perf_counter() - scheduled)
        await asyncio.sleep(0.001)
    await asyncio.sleep(1.0)  # let answers in flight arrive; later ones count as unanswered
    lat_ok.sort()
    send_lag.sort()
    def q(values, p):
        return round(values[min(len(values) - 1, int(len(values) * p))] * 1000, 3) if values else None
    answered = stats["ok"] + stats["shed_503"] + stats["other"]
    unanswered = stats["sent"] - answered - stats["refused"] - stats["reset"] - stats["errors"]
    shed = stats["shed_503"] + stats["refused"] + stats["reset"]
    print(json.dumps({**stats, "unanswered": unanswered, "rate": rate, "duration_s": duration,
                      "offered_per_s": round(stats["offered"] / duration, 1),
                      "goodput_per_s": round(stats["ok"] / duration, 1), "shed_per_s": round(shed / duration, 1),
                      "p50_ms": q(lat_ok, 0.5), "p99_ms": q(lat_ok, 0.99),
                      "send_lag_p99_ms": q(send_lag, 0.99), "send_lag_max_ms": q(send_lag, 1.0)}))
    for c in list(conns):
        if c.transport is not None:
            c.transport.close()

uvloop.run(main())
'''


def cap_cpu(pid: int, share: float) -> Path | None:
    """Put `pid` in a new CPU cgroup limited to `share` of a core (QUOTA_US per period);
    the cgroup's path, or None when there is no writable cpu controller (v1 or v2)."""
    period = max(QUOTA_US, round(QUOTA_US / share))
    v1 = Path("/sys/fs/cgroup/cpu")
    v2 = Path("/sys/fs/cgroup/cgroup.controllers")
    try:
        if (v1 / "cpu.cfs_quota_us").exists():
            d = v1 / f"summon-bench-{os.getpid()}"
            d.mkdir(exist_ok=True)
            (d / "cpu.cfs_period_us").write_text(str(period))
            (d / "cpu.cfs_quota_us").write_text(str(QUOTA_US))
        elif v2.exists() and "cpu" in v2.read_text().split():
            d = Path("/sys/fs/cgroup") / f"summon-bench-{os.getpid()}"
            d.mkdir(exist_ok=True)
            (d / "cpu.max").write_text(f"{QUOTA_US} {period}")
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
    pin = ["taskset", "-c", "1"] if (os.cpu_count() or 1) > 1 and shutil.which("taskset") else []
    cp = subprocess.run([*pin, sys.executable, str(script), HOST, str(port), str(rate), str(duration_s), str(MAX_CONNS)],
                        capture_output=True, text=True, timeout=duration_s + 60, check=False)
    if cp.returncode != 0 or not cp.stdout.strip():
        raise RuntimeError(f"open-loop generator failed: {cp.stderr[-2000:]}")
    return dict(json.loads(cp.stdout.strip().splitlines()[-1]))


def section_overload(bench: Any) -> dict[str, Any]:
    B = _bench()
    bl = sys.modules["benchlib"]
    quick = bool(getattr(bench.args, "quick", False))
    duration = 3.0 if quick else 8.0
    _, upstream_port = B.start_upstream(bench)
    # nginx takes any number of connections: with the default max_conns (32 per replica)
    # the slowed-down summon would queue requests for upstream connections instead of
    # saturating its CPU, and the figure would measure that cap.
    proc, port = B.start_summon(bench, upstream_port, "summon-overload", "max_inflight = 256\nmax_connections = 1024\n",
                                "max_conns = 1024\n")
    if (os.cpu_count() or 1) > 1:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(proc.pid, {0})
    cgroup = cap_cpu(proc.pid, CPU_SHARE)
    bench.log(f"  summon capped at {CPU_SHARE:.0%} of a core ({cgroup})" if cgroup else
              "  no writable CPU cgroup: summon runs uncapped (the generator may not reach 2x)")
    try:
        out = _overload(bench, bl, port, duration, quick)
        out["summon_overload"] = _summon_overload(bench)
        return out | {"summon_cpu_share": CPU_SHARE if cgroup else None,
                      "summon_cpu_period_us": max(QUOTA_US, round(QUOTA_US / CPU_SHARE)) if cgroup else None}
    finally:
        bench.procs.stop(proc)
        if cgroup is not None:
            with contextlib.suppress(OSError):
                cgroup.rmdir()


def _summon_overload(bench: Any) -> dict[str, Any] | None:
    """summon's own count of what it refused and shed (its admin /status)."""
    import urllib.request

    conf = (bench.tmp / "summon-overload" / "summon.toml").read_text()
    admin = next(line.split('"')[1] for line in conf.splitlines() if line.startswith("admin"))
    try:
        with urllib.request.urlopen(f"http://{admin}/status", timeout=5) as r:
            status = json.load(r)
    except (OSError, ValueError):
        return None
    totals = status.get("totals", {})
    return {"refused_connections": totals.get("refused_connections"), "shed_requests": totals.get("shed_requests"),
            **{k: v for k, v in status.get("overload", {}).items() if k not in ("refused_connections", "shed_requests")}}


def _wrk(bl: Any, port: int, url: str, duration_s: float, connections: int) -> dict[str, Any]:
    """run_wrk, again if wrk found the port closed: summon refuses connections while it
    sheds, and the run before may have left it shedding for a moment."""
    bl.wait_port(HOST, port, timeout=10)
    try:
        return dict(bl.run_wrk(url, duration_s=duration_s, connections=connections, threads=1))
    except bl.WrkParseError:
        time.sleep(0.5)
        bl.wait_port(HOST, port, timeout=10)
        return dict(bl.run_wrk(url, duration_s=duration_s, connections=connections, threads=1))


def _overload(bench: Any, bl: Any, port: int, duration: float, quick: bool) -> dict[str, Any]:
    url = f"http://{HOST}:{port}/"
    sweep = []
    for c in ([1, 8, 32, 128] if quick else [1, 2, 4, 8, 16, 32, 64, 128]):
        r = _wrk(bl, port, url, min(duration, 4.0), c)
        good = r["requests_per_s"] * (1 - r.get("non2xx", 0) / r["requests"]) if r.get("requests") else 0.0
        latency = r.get("latency_ms", {})
        sweep.append({"connections": c, "requests_per_s": r["requests_per_s"], "ok_per_s": round(good, 1),
                      "p99_ms": latency.get("99"), "non2xx": r.get("non2xx", 0), "socket_errors": r.get("socket_errors")})
        bench.log(f"  saturation sweep c{c}: {good:.0f} 2xx/s, p99 {sweep[-1]['p99_ms']} ms")
    saturation = max(s["ok_per_s"] for s in sweep)
    at_1x = open_loop(bench, port, saturation, duration)
    at_2x = open_loop(bench, port, 2 * saturation, duration)
    for name, r in (("1x", at_1x), ("2x", at_2x)):
        bench.log(f"  open loop {name}: offered {r['offered_per_s']}/s, goodput {r['goodput_per_s']}/s, "
                  f"shed {r['shed_per_s']}/s (503 {r['shed_503']}, refused {r['refused']}, reset {r['reset']}), "
                  f"dropped {r['dropped']}, unanswered {r['unanswered']}, errors {r['errors']}; "
                  f"2xx p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms; generator late by {r['send_lag_p99_ms']} ms (p99)")
    offered_ratio = bl.ratio(at_2x["offered_per_s"], saturation)
    good_ratio = bl.ratio(at_2x["goodput_per_s"], at_1x["goodput_per_s"])
    p99_ratio = bl.ratio(at_2x["p99_ms"], at_1x["p99_ms"])
    goals = {
        "offered_2x_over_saturation": {"value": offered_ratio, "goal": f">= {GOAL_OFFERED_RATIO}",
                                       "status": bl.check_goal(offered_ratio, ">=", GOAL_OFFERED_RATIO)},
        "goodput_2x_over_1x": {"value": good_ratio, "goal": f">= {GOAL_GOODPUT_RATIO}",
                               "status": bl.check_goal(good_ratio, ">=", GOAL_GOODPUT_RATIO)},
        "p99_2x_over_1x": {"value": p99_ratio, "goal": f"<= {GOAL_P99_RATIO}",
                           "status": bl.check_goal(p99_ratio, "<=", GOAL_P99_RATIO)},
    }
    for name, g in goals.items():
        print(f"  {name:<28} {g['value']!s:>10}   goal {g['goal']:<8} {g['status']}")
    return {"method": "wrk closed-loop sweep for saturation (2xx/s); open-loop fixed-rate generator at 1x and 2x",
            "limits": {"max_inflight": 256, "max_connections": 1024, "route_max_conns": 1024},
            "saturation_per_s": saturation, "sweep": sweep, "at_1x": at_1x, "at_2x": at_2x, "goals": goals}
