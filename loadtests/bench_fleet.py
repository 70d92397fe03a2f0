"""Fleet figures for `make bench`: what sharing one fleet through Redis (`[cluster]`) costs,
measured against the embedded engine (no `[cluster]`) in the same run.

One redis-server (started here, stopped by PID) and summon proxies on the process backend,
every instance the `decks` image (busybox httpd) from the repository's images/.

1. Warm requests/s. Two proxies, `embedded` (no [cluster]) and `cluster` ([cluster] on the
   Redis), each with a summoned route `warm` (max_replicas = 1) whose one instance is
   booted before measuring. Rounds of `wrk -t1 -c32` alternate the two (the order flips
   every round), and the figure is the median of the per-round ratios cluster/embedded:
   goal at least 0.95 (the warm path makes no Redis call). Redis's own
   `total_commands_processed` per second during each target's runs says so directly: the
   same rate (the cluster proxy's sync loop, ten scripts a second) whichever one serves.
   Each proxy's CPU time per request (/proc) is the steadier figure on a shared machine.
2. Cold-start overhead of the permit and the boot lock. The same two proxies have a route
   `cold` (Host: cold) with idle_timeout 100 ms: cold requests alternate between them,
   each after that route went back to zero instances, and the figure is the median
   time-to-first-byte through `cluster` minus the median through `embedded`: goal under
   2 ms.
3. A Locust spike against three proxies (regions eu, us-east, us-west, one process host
   each in its own region, `max_instances = CAP` fleet-wide through Redis,
   `trusted_proxies = ["127.0.0.0/8"]`). Users come from the three regions by weights
   (WEIGHTS; us-east the busiest), send `X-Client-Region`, and each goes to its own
   region's proxy (loadtests/locustfile.py with --region-hosts). A sampler every 50 ms
   reads `ZCARD {summon}:permits` from Redis and counts the instance processes on the
   machine (children of the three summon processes, not busybox's per-connection
   children). Goals: both peaks at most the cap; failed requests 0, where a failure is
   anything Locust counts as one: a connection error, a timeout or any status >= 400,
   503 with Retry-After included (no answer is excused); the first boot, and apart the
   first scale-out boot, placed in the busiest client region for a client of it, from the
   "summoned" events of the three proxies' logs (their region and client_region).
"""

from __future__ import annotations

import http.client
import json
import socket
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # spike.py reads images through the proxy package
sys.path.insert(0, str(ROOT / "loadtests"))  # run from bench.py or loaded by a test
import benchlib as bl  # noqa: E402
import targets as tg  # noqa: E402

HOST = "127.0.0.1"
IMAGE = "decks"
GOAL_WARM_RATIO = 0.95  # cluster req/s / embedded req/s at c32, at least
GOAL_COLD_ADDED_MS = 2.0  # cluster cold TTFB median - embedded cold TTFB median, below
CAP = 4  # max_instances of the spike's fleet
REGIONS = ("eu", "us-east", "us-west")
WEIGHTS = "us-east=5,eu=3,us-west=2"  # client regions of the spike's users
SAMPLE_S = 0.05  # between two samples of the live instance count
SETTLE_S = 0.05  # after a cold route is back at zero, before its next cold request
PERMITS = "{summon}:permits"

# ---------------------------------------------------------------------------
# pure helpers (tests/unit/test_bench_fleet.py)


def instance_pids(procs: dict[int, tuple[int, str]], owners: set[int], needle: str = "httpd") -> list[int]:
    """Instance processes from a process table (pid -> (ppid, command line)): the direct
    children of an owner (a summon process) whose command line contains `needle`. The
    per-connection children that busybox httpd forks have the instance as parent, so they
    are not counted, nor are the owners themselves."""
    return sorted(pid for pid, (ppid, cmd) in procs.items()
                  if ppid in owners and pid not in owners and needle in cmd)


def first_replicas(events: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any] | None]:
    """The first boot and the first scale-out boot among "summoned" events (of several
    proxies' logs, merged by time): a boot whose reason is not a cold request scales out."""
    summoned = sorted((e for e in events if e.get("kind") == "summoned"), key=lambda e: e.get("ts") or 0.0)
    first = summoned[0] if summoned else None
    scale = next((e for e in summoned if not str(e.get("detail", {}).get("reason", "")).startswith("cold request")),
                 None)
    return {"first_boot": first, "first_scale_out": scale}


def placed_in(event: dict[str, Any] | None, region: str) -> bool | None:
    """True when the boot was placed in `region` for a client of `region`; None if no boot."""
    if event is None:
        return None
    return bool(event.get("region") == region and event.get("detail", {}).get("client_region") == region)


# ---------------------------------------------------------------------------
# processes and probes


def read_procs() -> dict[int, tuple[int, str]]:
    """pid -> (ppid, command line) of every process on the machine (/proc)."""
    out: dict[int, tuple[int, str]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue
        out[int(d.name)] = (ppid, cmd)
    return out


def start_redis(bench: Any) -> tuple[bl.Proc, int]:
    import shutil

    binary = shutil.which("redis-server")
    if binary is None:
        raise tg.TargetUnavailable("redis-server not found (Debian: apt-get install redis-server)")
    port = bl.free_port(HOST)
    d = bench.tmp / "fleet" / "redis"
    d.mkdir(parents=True, exist_ok=True)
    proc = bench.procs.start("redis", [binary, "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no",
                                       "--dir", str(d), "--daemonize", "no", "--loglevel", "warning"])
    if not bl.wait_port(HOST, port, timeout=10, alive=proc.alive):
        bench.procs.stop(proc)
        raise tg.TargetUnavailable(f"redis-server did not start:\n{proc.output_tail()}")
    return proc, port


def regions_toml() -> str:
    return "".join(f'[[region]]\nname = "{r}"\nnearest = {json.dumps([x for x in REGIONS if x != r])}\n\n'
                   for r in REGIONS)


def start_proxy(bench: Any, name: str, body: str) -> tuple[bl.Proc, int, int]:
    """`summon serve` on a config of `body` plus [proxy], [images] and [events]."""
    exe = tg.summon_bin()
    if not exe.exists():
        raise tg.TargetUnavailable(f"{exe} not found (run `make setup`)")
    port, admin = bl.free_port(HOST), bl.free_port(HOST)
    d = bench.tmp / "fleet" / name
    d.mkdir(parents=True, exist_ok=True)
    conf = d / "summon.toml"
    conf.write_text(f'[proxy]\nlisten = "{HOST}:{port}"\nadmin = "{HOST}:{admin}"\nworkers = 1\n'
                    f'trusted_proxies = ["127.0.0.0/8"]\n\n[images]\ndir = "{ROOT / "images"}"\n\n'
                    f'[events]\npath = "{d / "events.db"}"\n\n{body}')
    proc = bench.procs.start(f"fleet-{name}", [str(exe), "serve", "-c", str(conf)], cwd=d)
    if not bl.wait_port(HOST, admin, timeout=30, alive=proc.alive) or not bl.wait_port(HOST, port, timeout=10):
        code = bench.procs.stop(proc)
        raise tg.TargetUnavailable(f"summon {name} did not start (exit {code}):\n{proc.output_tail()}")
    return proc, port, admin


def status(admin: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://{HOST}:{admin}/status", timeout=5) as r:  # noqa: S310 (loopback)
        return json.load(r)  # type: ignore[no-any-return]


def get(port: int, host: str, path: str = "/", timeout: float = 30.0) -> int:
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Host": host})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def ttfb(port: int, host: str, timeout: float = 30.0) -> tuple[float, int]:
    """Seconds from sending a GET to its first response byte, and the status."""
    with socket.create_connection((HOST, port), timeout=timeout) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        t0 = time.perf_counter()
        s.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = s.recv(1)
        t1 = time.perf_counter()
        while chunk := s.recv(65536):
            data += chunk
    return t1 - t0, int(data.split(b" ", 2)[1])


def route_instances(admin: int, route: str) -> int:
    return sum(len(r.get("instances", [])) for r in status(admin).get("routes", []) if r.get("name") == route)


def wait_zero(admin: int, route: str, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if route_instances(admin, route) == 0:
            return
        time.sleep(0.02)
    raise tg.HarnessError(f"route {route} did not go back to zero instances within {timeout:g}s")


def redis_client(port: int) -> Any:
    import redis

    return redis.Redis(host=HOST, port=port, socket_timeout=2, socket_connect_timeout=2)


def read_events(db: Path) -> list[dict[str, Any]]:
    if not db.exists():
        return []
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as c:
        rows = c.execute("select ts, kind, route, instance, host, region, detail from events order by id").fetchall()
    return [{"ts": ts, "kind": k, "route": r, "instance": i, "host": h, "region": reg, "detail": json.loads(d or "{}")}
            for ts, k, r, i, h, reg, d in rows]


def is_true(value: bool | None, region: str) -> dict[str, Any]:
    return {"value": value, "goal": f"in {region}", "status": "N/A" if value is None else ("PASS" if value else "FAIL")}


def goal(value: float | None, op: str, target: float) -> dict[str, Any]:
    return {"value": None if value is None else round(value, 4), "goal": f"{op} {target:g}",
            "status": bl.check_goal(value, op, target)}


# ---------------------------------------------------------------------------
# 1 and 2: warm req/s and cold-start overhead, embedded vs cluster


def pair_body(cluster: str) -> str:
    return (f"{cluster}"
            '[[host]]\nname = "local"\nbackend = "process"\nslots = 8\n\n'
            f'[[route]]\nname = "cold"\nhost = "cold"\npath = "/"\nimage = "{IMAGE}"\nidle_timeout = "100ms"\n'
            'boot_timeout = "10s"\n\n'
            f'[[route]]\nname = "warm"\nhost = "*"\npath = "/"\nimage = "{IMAGE}"\nidle_timeout = "10m"\n'
            'boot_timeout = "10s"\ntarget_concurrency = 1000\nmax_replicas = 1\n')


def warm_and_cold(bench: Any, redis_port: int) -> dict[str, Any]:
    quick = bool(getattr(bench.args, "quick", False))
    rounds, duration, runs = (3, 2.0, 10) if quick else (7, 2.0, 30)
    cluster = f'[cluster]\nredis = "redis://{HOST}:{redis_port}/0"\nnode = "bench-1"\nlease = "5s"\n\n'
    proxies: dict[str, tuple[bl.Proc, int, int]] = {}
    try:
        for name, extra in (("embedded", ""), ("cluster", cluster)):
            bench.log(f"fleet: starting summon {name}")
            proxies[name] = start_proxy(bench, name, pair_body(extra))
        for name, (_, port, _) in proxies.items():
            if (code := get(port, "warm")) != 200:
                raise tg.HarnessError(f"fleet: the warm route of {name} answered {code}")
        rc = redis_client(redis_port)
        warm = measure_warm(bench, proxies, rc, rounds, duration)
        cold = measure_cold(bench, proxies, runs)
        for name, (proc, _, _) in proxies.items():
            if not proc.alive():
                raise tg.HarnessError(f"fleet: summon {name} died during the run:\n{proc.output_tail()}")
    finally:
        for proc, _, _ in proxies.values():
            bench.procs.stop(proc, grace=15)
    return {"warm": warm, "cold": cold}


def measure_warm(bench: Any, proxies: dict[str, tuple[bl.Proc, int, int]], rc: Any, rounds: int,
                 duration: float) -> dict[str, Any]:
    bench.log(f"fleet: warm req/s, wrk -c32 {duration:g}s, {rounds} rounds alternating embedded and cluster")
    for _, port, _ in proxies.values():
        bl.run_wrk(f"http://{HOST}:{port}/", bench.warmup_s, 32)
    rps: dict[str, list[float]] = {n: [] for n in proxies}
    errors = dict.fromkeys(proxies, 0)
    commands: dict[str, list[float]] = {n: [] for n in proxies}  # Redis commands per second of each run
    cpu_s = dict.fromkeys(proxies, 0.0)  # the proxy's own CPU time over its runs (user + system)
    served = dict.fromkeys(proxies, 0)
    per_request: list[float] = []
    for rnd in range(rounds):
        order = list(proxies) if rnd % 2 == 0 else list(reversed(proxies))
        for name in order:
            port = proxies[name][1]
            before, t0 = int(rc.info("stats")["total_commands_processed"]), time.monotonic()
            cpu0 = _cpu_seconds(proxies[name][0].pid)
            r = bl.run_wrk(f"http://{HOST}:{port}/", duration, 32, timeout_s=bench.args.wrk_timeout)
            cpu_s[name] += _cpu_seconds(proxies[name][0].pid) - cpu0
            served[name] += r["requests"] or 0
            # minus our own INFO; the calls a Lua script makes count as commands too
            n = int(rc.info("stats")["total_commands_processed"]) - before - 1
            commands[name].append(n / (time.monotonic() - t0))
            rps[name].append(r["requests_per_s"] or 0.0)
            errors[name] += r["errors"]
            if name == "cluster" and r["requests"]:
                per_request.append(n / r["requests"])
            bench.log(f"    {name:<9} {r['requests_per_s'] or 0:>9.1f} req/s  p50 {tg.fmt(r['latency_ms'].get('50'), 3)}"
                      f" ms  errors {r['errors']}  Redis commands {n}")
    ratios = bl.paired_ratios(rps["cluster"], rps["embedded"])
    return {"rounds": rounds, "duration_s": duration, "connections": 32, "requests_per_s": rps, "errors": errors,
            "cluster_over_embedded_per_round": [round(x, 4) for x in ratios],
            "cluster_over_embedded": bl.median(ratios),
            # while `embedded` runs, the idle cluster proxy's sync loop is all Redis sees: the
            # same rate during the cluster's runs means no call per request
            "redis_commands_per_s": {k: bl.median(v) for k, v in commands.items()},
            "redis_commands_per_request": bl.median(per_request),
            # steadier than req/s on a shared machine: other load slows a run, not its CPU per request
            "cpu_us_per_request": {n: round(cpu_s[n] / served[n] * 1e6, 1) if served[n] else None for n in proxies},
            "cpu_cluster_over_embedded": bl.ratio(cpu_s["cluster"] / max(1, served["cluster"]),
                                                  cpu_s["embedded"] / max(1, served["embedded"]))}


def _cpu_seconds(pid: int) -> float:
    """A proxy's CPU time so far (`benchlib.cpu_seconds`); a proxy gone mid-run ends the run."""
    seconds = bl.cpu_seconds(pid)
    if seconds is None:
        raise RuntimeError(f"proxy {pid} is gone: no CPU time to read")
    return seconds


def measure_cold(bench: Any, proxies: dict[str, tuple[bl.Proc, int, int]], runs: int) -> dict[str, Any]:
    bench.log(f"fleet: cold TTFB, {runs} cold requests each, alternating embedded and cluster")
    ttfbs: dict[str, list[float]] = {n: [] for n in proxies}
    for i in range(runs):
        order = list(proxies) if i % 2 == 0 else list(reversed(proxies))
        for name in order:
            _, port, admin = proxies[name]
            wait_zero(admin, "cold")
            time.sleep(SETTLE_S)
            seconds, code = ttfb(port, "cold")
            if code != 200:
                raise tg.HarnessError(f"fleet: a cold request through {name} answered {code}")
            ttfbs[name].append(seconds * 1000)
    med = {n: bl.median(v) for n, v in ttfbs.items()}
    added = bl.difference(med["cluster"], med["embedded"])
    paired = [c - e for c, e in zip(ttfbs["cluster"], ttfbs["embedded"], strict=True)]
    bench.log(f"  cold TTFB median: embedded {tg.fmt(med['embedded'], 2)} ms, cluster {tg.fmt(med['cluster'], 2)} ms")
    return {"runs": runs, "ttfb_ms": {n: [round(x, 3) for x in v] for n, v in ttfbs.items()},
            "median_ms": {n: None if v is None else round(v, 3) for n, v in med.items()},
            "stdev_ms": {n: round(statistics.stdev(v), 3) if len(v) > 1 else None for n, v in ttfbs.items()},
            "cluster_minus_embedded_ms": None if added is None else round(added, 3),
            "median_of_paired_differences_ms": bl.median(paired)}


# ---------------------------------------------------------------------------
# 3: a Locust spike from three regions against three proxies with a cap


def spike_body(redis_port: int, node: str, region: str) -> str:
    return (f"[limits]\nmax_instances = {CAP}\n\n{regions_toml()}"
            f'[cluster]\nredis = "redis://{HOST}:{redis_port}/0"\nnode = "{node}"\nregion = "{region}"\n'
            'lease = "3s"\n\n'
            f'[[host]]\nname = "host-{node}"\nregion = "{region}"\nbackend = "process"\nslots = 8\n\n'
            f'[[route]]\nname = "decks"\nhost = "*"\npath = "/"\nimage = "{IMAGE}"\nidle_timeout = "60s"\n'
            'boot_timeout = "10s"\ntarget_concurrency = 1\nmax_replicas = 8\nqueue_size = 2000\n'
            'hash_key = "header:x-user"\n')


class Sampler:
    """Live instances every SAMPLE_S: Redis's permit count and the host's instance processes."""

    def __init__(self, rc: Any, owners: set[int]) -> None:
        self.rc = rc
        self.owners = owners
        self.samples: list[tuple[float, int | None, int]] = []  # (t, permits, processes)
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fleet-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            permits: int | None
            try:
                permits = int(self.rc.zcard(PERMITS))
            except Exception:  # a failed read is counted, not fatal
                permits = None
                self.errors += 1
            hosts = len(instance_pids(read_procs(), self.owners))
            self.samples.append((time.time(), permits, hosts))
            self._stop.wait(SAMPLE_S)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def peak(self, index: int) -> int:
        return max((s[index] or 0 for s in self.samples), default=0)


def spike(bench: Any, redis_port: int) -> dict[str, Any]:
    from spike import read_failures, read_totals

    quick = bool(getattr(bench.args, "quick", False))
    shape = ({"quiet-users": 3, "quiet-s": 3, "peak-users": 30, "surge-s": 2, "plateau-s": 8, "decay-s": 2,
              "tail-s": 1} if quick else
             {"quiet-users": 3, "quiet-s": 4, "peak-users": 60, "surge-s": 3, "plateau-s": 20, "decay-s": 4,
              "tail-s": 1})
    shape.update({"think-min-s": 0.05, "think-max-s": 0.3})
    rc = redis_client(redis_port)
    rc.flushall()  # the warm/cold proxies are gone: start the fleet from nothing
    weights = dict(part.split("=") for part in WEIGHTS.split(","))
    busiest = max(weights, key=lambda r: float(weights[r]))
    out = bench.tmp / "fleet" / "spike"
    out.mkdir(parents=True, exist_ok=True)
    proxies: dict[str, tuple[bl.Proc, int, int]] = {}
    locust: bl.Proc | None = None
    try:
        for node, region in zip(("eu-1", "east-1", "west-1"), REGIONS, strict=True):
            bench.log(f"fleet: starting summon {node} (region {region})")
            proxies[region] = start_proxy(bench, node, spike_body(redis_port, node, region))
        hosts = ",".join(f"{region}=http://{HOST}:{port}" for region, (_, port, _) in proxies.items())
        owners = {proc.pid for proc, _, _ in proxies.values()}
        cmd = [str(ROOT / ".venv" / "bin" / "locust"), "-f", str(ROOT / "loadtests" / "locustfile.py"), "--headless",
               "--host", f"http://{HOST}:{proxies[busiest][1]}", "--csv", str(out / "fleet"), "--only-summary",
               "--loglevel", "WARNING", "--spike-profile", "quick", "--region-weights", WEIGHTS,
               "--region-hosts", hosts]
        for key, value in shape.items():
            cmd += [f"--{key}", str(value)]
        total_s = sum(float(shape[k]) for k in ("quiet-s", "surge-s", "plateau-s", "decay-s", "tail-s"))
        bench.log(f"fleet: Locust spike, {shape['peak-users']} users at the peak ({WEIGHTS}), {total_s:g}s, cap {CAP}")
        with Sampler(rc, owners) as sampler:
            locust = bench.procs.start("fleet-locust", cmd, cwd=ROOT)
            try:
                locust.popen.wait(total_s + 90)
            except subprocess.TimeoutExpired:
                raise tg.HarnessError("fleet: locust did not finish in time") from None
        if not (out / "fleet_stats.csv").exists():
            raise tg.HarnessError(f"fleet: locust wrote no CSVs:\n{locust.output_tail()}")
        totals = read_totals(out / "fleet_stats.csv")
        failures = read_failures(out / "fleet_failures.csv")
        per_node = {region: status(admin) for region, (_, _, admin) in proxies.items()}
    finally:
        if locust is not None:
            bench.procs.stop(locust, grace=10)
        for proc, _, _ in proxies.values():
            bench.procs.stop(proc, grace=15)
    events = [e for region in REGIONS for e in read_events(out.parent / _node_of(region) / "events.db")]
    firsts = first_replicas(events)
    summoned = [e for e in events if e["kind"] == "summoned"]
    boots_per_region = {r: sum(1 for e in summoned if e["region"] == r) for r in REGIONS}
    requests = int(totals["requests"])
    failed = int(totals["failures"])
    return {
        "cap": CAP, "weights": WEIGHTS, "busiest_region": busiest, "shape": shape,
        "requests": requests, "failed": failed, "failures": failures[:20],
        "requests_per_s": round(totals["rps"], 1), "median_ms": totals["median_ms"], "p95_ms": totals["p95_ms"],
        "p99_ms": totals["p99_ms"],
        "samples": len(sampler.samples), "sample_errors": sampler.errors,
        "peak_permits_redis": sampler.peak(1), "peak_instance_processes": sampler.peak(2),
        "boots": len(summoned), "boots_per_region": boots_per_region,
        "event_kinds": dict(sorted(Counter(e["kind"] for e in events).items())),
        "first_boot": _brief(firsts["first_boot"]), "first_scale_out": _brief(firsts["first_scale_out"]),
        "first_boot_in_busiest_region": placed_in(firsts["first_boot"], busiest),
        "first_scale_out_in_busiest_region": placed_in(firsts["first_scale_out"], busiest),
        "status_totals": {r: s.get("totals") for r, s in per_node.items()},
    }


def _node_of(region: str) -> str:
    return dict(zip(REGIONS, ("eu-1", "east-1", "west-1"), strict=True))[region]


def _brief(e: dict[str, Any] | None) -> dict[str, Any] | None:
    if e is None:
        return None
    return {"region": e["region"], "client_region": e["detail"].get("client_region"), "host": e["host"],
            "reason": e["detail"].get("reason")}


# ---------------------------------------------------------------------------
# the section


def section_fleet(bench: Any) -> dict[str, Any]:
    try:
        redis_proc, redis_port = start_redis(bench)
    except tg.TargetUnavailable as e:
        bench.messages.append(f"fleet: SKIPPED: {e}")
        return {"skipped": str(e)}
    try:
        pair = warm_and_cold(bench, redis_port)
        sp = spike(bench, redis_port)
    except tg.TargetUnavailable as e:
        raise tg.HarnessError(str(e)) from None
    finally:
        bench.procs.stop(redis_proc)
    warm, cold = pair["warm"], pair["cold"]
    peak = max(sp["peak_permits_redis"], sp["peak_instance_processes"])
    goals = {
        "warm_cluster_over_embedded_rps_c32": goal(warm["cluster_over_embedded"], ">=", GOAL_WARM_RATIO),
        "cold_cluster_minus_embedded_ttfb_ms": goal(cold["cluster_minus_embedded_ms"], "<", GOAL_COLD_ADDED_MS),
        "spike_peak_live_instances": goal(float(peak), "<=", float(CAP)),
        "spike_failed_requests": goal(float(sp["failed"]), "<=", 0.0),
        "spike_first_boot_in_busiest_region": is_true(sp["first_boot_in_busiest_region"], sp["busiest_region"]),
        "spike_first_scale_out_in_busiest_region": is_true(sp["first_scale_out_in_busiest_region"],
                                                           sp["busiest_region"]),
    }
    print_fleet(warm, cold, sp, goals)
    return {"warm": warm, "cold": cold, "spike": sp, "goals": goals}


def print_fleet(warm: dict[str, Any], cold: dict[str, Any], sp: dict[str, Any], goals: dict[str, Any]) -> None:
    med = {n: bl.median(v) for n, v in warm["requests_per_s"].items()}
    print()
    print(f"  warm req/s (c32, median of {warm['rounds']}): embedded {tg.fmt(med['embedded'], 0)}, "
          f"cluster {tg.fmt(med['cluster'], 0)}; Redis commands/s during the runs: embedded "
          f"{tg.fmt(warm['redis_commands_per_s']['embedded'], 0)}, cluster {tg.fmt(warm['redis_commands_per_s']['cluster'], 0)}"
          f" ({tg.fmt(warm['redis_commands_per_request'], 4)} per request)")
    cpu = warm["cpu_us_per_request"]
    print(f"  summon CPU per warm request: embedded {tg.fmt(cpu['embedded'], 1)} us, cluster {tg.fmt(cpu['cluster'], 1)}"
          f" us (ratio {tg.fmt(warm['cpu_cluster_over_embedded'], 3)})")
    print(f"  cold TTFB median ({cold['runs']} each): embedded {tg.fmt(cold['median_ms']['embedded'], 2)} ms, "
          f"cluster {tg.fmt(cold['median_ms']['cluster'], 2)} ms")
    fb, fs = sp["first_boot"] or {}, sp["first_scale_out"] or {}
    print(f"  spike: {sp['requests']} requests, {sp['failed']} failed, {sp['requests_per_s']} req/s, "
          f"p95 {sp['p95_ms']} ms; peak live: Redis permits {sp['peak_permits_redis']}, instance processes "
          f"{sp['peak_instance_processes']} (cap {sp['cap']}, {sp['samples']} samples); boots per region "
          f"{sp['boots_per_region']}; first boot {fb.get('region')} (client {fb.get('client_region')}), first "
          f"scale-out {fs.get('region')} (client {fs.get('client_region')})")
    labels = {
        "warm_cluster_over_embedded_rps_c32": "cluster / embedded warm req/s at c32",
        "cold_cluster_minus_embedded_ttfb_ms": "cluster - embedded cold TTFB (ms)",
        "spike_peak_live_instances": "spike peak live instances",
        "spike_failed_requests": "spike failed requests",
        "spike_first_boot_in_busiest_region": "spike first boot in busiest region",
        "spike_first_scale_out_in_busiest_region": "spike first scale-out in busiest region",
    }
    for key, g in goals.items():
        value = g["value"] if isinstance(g["value"], (bool, type(None))) else tg.fmt(g["value"], 3)
        print(f"  {labels[key]:<40} {str(value):>8}   goal {g['goal']:<10} {g['status']}")
    print()
