"""What every bench section starts and measures: nginx, the upstream, summon, mitmproxy.

Shared by bench.py and the section modules (bench_*.py), which import it directly: no
section reaches back into bench.py, so the imports point one way.
"""

from __future__ import annotations

import argparse
import http.client
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as bl  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
BODY = b"hello, world\n"  # 13 bytes, what the upstream returns for every path

# Goals of the proxy section (see loadtests/README.md).
GOAL_NGINX_RATIO = 0.25  # summon req/s / nginx-proxy req/s at c32, at least
GOAL_MITM_RATIO = 10.0  # summon req/s / mitmproxy req/s at c32, at least
GOAL_ADDED_P50_MS = 0.3  # summon p50 - direct p50 at c1, below


class HarnessError(RuntimeError):
    """Something the benchmark itself needs is missing or broken (not a target's fault)."""


class TargetUnavailable(RuntimeError):
    """A target could not be started or does not answer correctly; it is skipped."""


@dataclass
class Bench:
    args: argparse.Namespace
    tmp: Path
    procs: bl.Processes
    duration_s: float
    warmup_s: float
    messages: list[str] = field(default_factory=list)

    def log(self, msg: str) -> None:
        print(msg, flush=True)


# ---------------------------------------------------------------------------
# targets


def nginx_common(tmp: Path, name: str) -> str:
    """Top of an nginx config: one process, no daemon, every path inside tmp."""
    d = tmp / name
    (d / "temp").mkdir(parents=True, exist_ok=True)
    temps = "\n".join(
        f"  {k}_temp_path {d / 'temp' / k};" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""daemon off;
master_process off;
worker_processes 1;
pid {d / "nginx.pid"};
error_log {d / "error.log"} warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  keepalive_requests 1000000;
  keepalive_timeout 65s;
{temps}
"""


def start_nginx(bench: Bench, name: str, server_block: str, main: str = "") -> tuple[bl.Proc, int]:
    """nginx with `server_block` inside http{} and `main` (load_module lines) above it all."""
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    if nginx is None:
        raise TargetUnavailable("nginx not found (Debian: apt-get install nginx-light; or run scripts/setup.sh)")
    port = bl.free_port(HOST)
    d = bench.tmp / name
    conf = d / "nginx.conf"
    d.mkdir(parents=True, exist_ok=True)
    conf.write_text(main + nginx_common(bench.tmp, name) + server_block.replace("@PORT@", str(port)) + "}\n")
    proc = bench.procs.start(name, [nginx, "-p", str(d), "-e", str(d / "error.log"), "-c", str(conf)])
    if not bl.wait_port(HOST, port, timeout=10, alive=proc.alive):
        why = proc.output_tail() or bl.tail(d / "error.log")
        bench.procs.stop(proc)
        raise TargetUnavailable(f"{name} did not start:\n{why}")
    return proc, port


def start_upstream(bench: Bench) -> tuple[bl.Proc, int]:
    body = BODY.decode().replace("\n", "\\n")
    server = f"""  server {{
    listen {HOST}:@PORT@;
    default_type text/plain;
    location / {{ return 200 "{body}"; }}
  }}
"""
    return start_nginx(bench, "upstream", server)


def start_nginx_proxy(bench: Bench, upstream_port: int) -> tuple[bl.Proc, int]:
    server = f"""  upstream bench_upstream {{
    server {HOST}:{upstream_port};
    keepalive 64;
    keepalive_requests 1000000;
  }}
  server {{
    listen {HOST}:@PORT@;
    location / {{
      proxy_pass http://bench_upstream;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }}
  }}
"""
    return start_nginx(bench, "nginx-proxy", server)


def summon_bin() -> Path:
    return ROOT / ".venv" / "bin" / "summon"


def start_summon(bench: Bench, upstream_port: int, name: str = "summon", extra_proxy: str = "",
                 extra_route: str = "", env: dict[str, str] | None = None) -> tuple[bl.Proc, int]:
    """summon with one static route to the upstream; `extra_proxy` adds [proxy] lines,
    `extra_route` lines to the route; `env` replaces summon's environment (another
    checkout's code on PYTHONPATH, for `overload_ab`)."""
    exe = summon_bin()
    if not exe.exists():
        raise TargetUnavailable(f"{exe} not found (run `make setup`)")
    cp = subprocess.run([str(exe), "serve", "--help"], capture_output=True, text=True, timeout=30, check=False,
                        env=env)
    if cp.returncode != 0:
        raise TargetUnavailable(
            "`summon serve --help` failed, summon serve is not there yet:\n" + bl_tail_text(cp.stderr or cp.stdout)
        )
    port = bl.free_port(HOST)
    admin = bl.free_port(HOST)
    d = bench.tmp / name
    d.mkdir(parents=True, exist_ok=True)
    conf = d / "summon.toml"
    conf.write_text(
        f"""[proxy]
listen = "{HOST}:{port}"
admin = "{HOST}:{admin}"
workers = 1
{extra_proxy}
[events]
path = "{d / "events.db"}"

[[route]]
name = "bench"
host = "*"
path = "/"
upstreams = ["{HOST}:{upstream_port}"]
{extra_route}"""
    )
    proc = bench.procs.start(name, [str(exe), "serve", "-c", str(conf)], env=env, cwd=d)
    if not bl.wait_port(HOST, port, timeout=20, alive=proc.alive):
        alive = proc.alive()
        code = bench.procs.stop(proc)
        state = "did not listen within 20 s" if alive else f"exited with code {code}"
        raise TargetUnavailable(f"summon {state}; stderr tail:\n{proc.output_tail()}")
    return proc, port


def bl_tail_text(text: str, lines: int = 20) -> str:
    return "\n".join(text.rstrip("\n").splitlines()[-lines:])


def mitmdump_bin() -> Path:
    return ROOT / ".venv-mitm" / "bin" / "mitmdump"


def ensure_mitmproxy(bench: Bench) -> Path:
    exe = mitmdump_bin()
    if exe.exists():
        return exe
    if bench.args.no_install:
        raise TargetUnavailable(f"{exe} not found and --no-install given (run scripts/setup-mitmproxy.sh)")
    bench.log("mitmproxy: .venv-mitm missing, running scripts/setup-mitmproxy.sh ...")
    script = ROOT / "scripts" / "setup-mitmproxy.sh"
    log = bench.tmp / "setup-mitmproxy.log"
    with open(log, "wb") as f:
        try:
            cp = subprocess.run(["bash", str(script)], stdout=f, stderr=subprocess.STDOUT, timeout=600, check=False)
        except subprocess.TimeoutExpired:
            raise TargetUnavailable("scripts/setup-mitmproxy.sh took more than 10 minutes") from None
    if cp.returncode != 0 or not exe.exists():
        raise TargetUnavailable(f"could not install mitmproxy (scripts/setup-mitmproxy.sh):\n{bl.tail(log)}")
    return exe


def start_mitmproxy(bench: Bench, upstream_port: int) -> tuple[bl.Proc, int]:
    exe = ensure_mitmproxy(bench)
    port = bl.free_port(HOST)
    confdir = bench.tmp / "mitmproxy"
    confdir.mkdir(parents=True, exist_ok=True)
    argv = [
        str(exe),
        "--mode",
        f"reverse:http://{HOST}:{upstream_port}",
        "--listen-host",
        HOST,
        "--listen-port",
        str(port),
        "--set",
        f"confdir={confdir}",  # its CA lives in tmp, not in ~/.mitmproxy
        "-q",
    ]
    proc = bench.procs.start("mitmproxy", argv)
    if not bl.wait_port(HOST, port, timeout=30, alive=proc.alive):
        alive = proc.alive()
        code = bench.procs.stop(proc)
        state = "did not listen within 30 s" if alive else f"exited with code {code}"
        raise TargetUnavailable(f"mitmdump {state}:\n{proc.output_tail()}")
    return proc, port


def probe(port: int, path: str = "/") -> None:
    """One GET through the target: it must answer 200 with the upstream's body."""
    conn = http.client.HTTPConnection(HOST, port, timeout=10)
    try:
        conn.request("GET", path, headers={"Host": f"bench.test:{port}"})
        resp = conn.getresponse()
        body = resp.read()
    except (OSError, http.client.HTTPException) as e:
        raise TargetUnavailable(f"probe GET {path} failed: {e!r}") from None
    finally:
        conn.close()
    if resp.status != 200 or body != BODY:
        raise TargetUnavailable(f"probe GET {path}: status {resp.status}, body {body[:80]!r} (want 200, {BODY!r})")


# ---------------------------------------------------------------------------
# measuring


Starter = Callable[[Bench, int], tuple[bl.Proc, int]]


def start_and_measure(bench: Bench, label: str, starters: list[tuple[str, Starter | None, float]], up_port: int,
                      concurrencies: list[int]) -> dict[str, dict]:
    """Start every target (None: the upstream itself), skipping with the reason any that
    does not start or answer `probe`; measure the rest in interleaved rounds
    (`measure_rounds`); stop them all. Targets come back in the order of `starters`."""
    targets: dict[str, dict] = {}
    running: dict[str, tuple[bl.Proc | None, int, float]] = {}
    try:
        for name, start, duration in starters:
            try:
                if start is None:
                    running[name] = (None, up_port, duration)
                    continue
                bench.log(f"{label}: starting {name}")
                proc, port = start(bench, up_port)
                running[name] = (proc, port, duration)
                probe(port)
            except TargetUnavailable as e:
                failed_proc = running.pop(name, (None, 0, 0.0))[0]
                if failed_proc is not None:
                    bench.procs.stop(failed_proc, grace=10)
                msg = f"{label}/{name}: SKIPPED: {e}"
                bench.log("  " + msg.replace("\n", "\n    "))
                bench.messages.append(msg)
                targets[name] = {"available": False, "reason": str(e)}
        targets.update(measure_rounds(bench, running, concurrencies))
        for name, (target_proc, _, _) in running.items():
            if target_proc is not None and not target_proc.alive() and targets[name].get("available"):
                targets[name]["note"] = f"exited during the run: {target_proc.output_tail(5)}"
    finally:
        for target_proc, _, _ in running.values():
            if target_proc is not None:
                bench.procs.stop(target_proc, grace=10)
    return {name: targets[name] for name, _, _ in starters if name in targets}


def measure_rounds(bench: Bench, running: dict[str, tuple[bl.Proc | None, int, float]],
                   concurrencies: list[int]) -> dict[str, dict]:
    """Warm up every running target, then `--repeat` rounds, each running wrk against
    every target at every concurrency in turn. Returns `measure`'s shape per target."""
    reps: dict[str, dict[int, list[dict]]] = {name: {c: [] for c in concurrencies} for name in running}
    failed: dict[str, dict[int, str]] = {name: {} for name in running}
    for name, (_, port, duration) in running.items():
        bench.log(f"  {name}: warm-up {bench.warmup_s:g}s, then {duration:g}s per run at c={concurrencies}")
        try:
            bl.run_wrk(f"http://{HOST}:{port}/", bench.warmup_s, max(concurrencies))
        except bl.WrkParseError as e:
            failed[name] = {c: str(e) for c in concurrencies}
    for rnd in range(bench.args.repeat):
        bench.log(f"  round {rnd + 1} of {bench.args.repeat}")
        for name, (_, port, duration) in running.items():
            for c in concurrencies:
                if c in failed[name]:
                    continue
                try:
                    r = bl.run_wrk(f"http://{HOST}:{port}/", duration, c, timeout_s=bench.args.wrk_timeout)
                except bl.WrkParseError as e:
                    failed[name][c] = str(e)
                    continue
                reps[name][c].append(r)
                bench.log(f"    {name:<10} c{c:<3} {r['requests_per_s'] or 0:>10.1f} req/s"
                          f"  p50 {fmt(r['latency_ms'].get('50'), 3)} ms  errors {r['errors']}")
    out: dict[str, dict] = {}
    for name, (_, port, duration) in running.items():
        runs = {f"c{c}": ({"connections": c, "error": failed[name][c]} if c in failed[name]
                          else summarize(c, reps[name][c])) for c in concurrencies}
        out[name] = {"available": True, "url": f"http://{HOST}:{port}/", "duration_s": duration, "runs": runs}
    return out


def round_ratios(targets: dict, num: str, den: str, conc: int) -> list[float]:
    """num/den req/s of each round (runs of the same round were measured back to back)."""
    a = ((targets.get(num) or {}).get("runs") or {}).get(f"c{conc}") or {}
    b = ((targets.get(den) or {}).get("runs") or {}).get(f"c{conc}") or {}
    return bl.paired_ratios(a.get("all_requests_per_s") or [], b.get("all_requests_per_s") or [])


def summarize(connections: int, reps: list[dict]) -> dict:
    """One row from one or more wrk runs: medians of the figures, errors summed."""

    def med(key: str, pct: str | None = None) -> float | None:
        if pct is None:
            return bl.median(r.get(key) for r in reps)
        return bl.median(r["latency_ms"].get(pct) for r in reps)

    return {
        "connections": connections,
        "threads": 1,
        "repeats": len(reps),
        "requests_per_s": med("requests_per_s"),
        "requests": sum(r["requests"] or 0 for r in reps),
        "latency_avg_ms": med("latency_avg_ms"),
        "p50_ms": med("latency_ms", "50"),
        "p75_ms": med("latency_ms", "75"),
        "p90_ms": med("latency_ms", "90"),
        "p99_ms": med("latency_ms", "99"),
        "errors": sum(r["errors"] for r in reps),
        "non2xx": sum(r["non2xx"] for r in reps),
        "socket_errors": {k: sum(r["socket_errors"][k] for r in reps) for k in ("connect", "read", "write", "timeout")},
        "all_requests_per_s": [r["requests_per_s"] for r in reps],
        "commands": [r["command"] for r in reps],
    }


def fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def figure(targets: dict, target: str, conc: int, key: str) -> float | None:
    t = targets.get(target) or {}
    return ((t.get("runs") or {}).get(f"c{conc}") or {}).get(key)
