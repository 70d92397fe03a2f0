"""The spike runner: summon + a headless Locust spike + replicas per region over time.

    python loadtests/spike.py                          # process backend, profile "spike" (~2.5 min)
    python loadtests/spike.py --quick                  # CI smoke: 40 users, ~40 s
    python loadtests/spike.py --backend libvirt        # real microVMs, profile "libvirt"
    python loadtests/spike.py --proxy http://127.0.0.1:8080 --admin http://127.0.0.1:8081
                                                       # against a proxy that is already running

What it does:
1. Unless --proxy is given, writes OUT/summon.toml (loadtests/loadtest.toml with free
   ports, the profile's idle_timeout and cap, the events db in OUT, and with
   --backend libvirt every host switched to libvirt) and starts `summon serve` on it.
2. Polls the admin API's GET /status every --poll seconds in a thread (replicas per
   region, total, cap) and runs `locust --headless` with the `Spike` shape of
   loadtests/locustfile.py, writing Locust's CSVs to OUT/spike_*.csv.
3. After the shape's tail, waits up to --settle seconds for every pool to reach zero,
   saves GET /events to OUT/events.jsonl, stops summon (SIGTERM to its PID's process
   group, SIGKILL after 20 s) and writes OUT/replicas.csv, OUT/chart.png (requests/s,
   p95 latency, replicas per region with the cap) and OUT/summary.txt.

Exit code: 0 when every check passed (no failed request, the cap never exceeded, every
pool back at zero, and when this runner started summon, the first replica in the
busiest client region); 1 when a check failed; 2 when the harness itself failed
(summon or Locust would not start, no CSVs); 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
import tomllib
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from benchlib import free_port  # noqa: E402
from regions import DEFAULT_WEIGHTS, PROFILES, Profile, busiest, parse_weights  # noqa: E402

from proxy.errors import ImageError  # noqa: E402
from proxy.images.manifest import load_image  # noqa: E402

LIVE_STATES = ("booting", "ready", "draining")


class HarnessError(Exception):
    pass


# --- the summon config ----------------------------------------------------------------


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def dump_toml(data: dict[str, Any]) -> str:
    """Enough TOML for a summon config: top-level keys, tables, arrays of tables."""
    lines: list[str] = []
    tables = {k: v for k, v in data.items() if isinstance(v, dict)}
    arrays = {k: v for k, v in data.items() if isinstance(v, list) and v and all(isinstance(x, dict) for x in v)}
    for k, v in data.items():
        if k not in tables and k not in arrays:
            lines.append(f"{k} = {_toml_value(v)}")
    for k, v in tables.items():
        lines += ["", f"[{k}]"] + [f"{kk} = {_toml_value(vv)}" for kk, vv in v.items()]
    for k, items in arrays.items():
        for item in items:
            lines += ["", f"[[{k}]]"] + [f"{kk} = {_toml_value(vv)}" for kk, vv in item.items()]
    return "\n".join(lines).lstrip("\n") + "\n"


def make_config(src: Path, out: Path, profile: Profile, backend: str, libvirt_uri: str,
                listen: int, admin: int, images_dir: Path | None = None) -> dict[str, Any]:
    data = tomllib.loads(src.read_text())
    base = src.resolve().parent
    data.setdefault("proxy", {})
    data["proxy"]["listen"] = f"127.0.0.1:{listen}"
    data["proxy"]["admin"] = f"127.0.0.1:{admin}"
    trusted = data["proxy"].setdefault("trusted_proxies", [])
    if not any(t.startswith("127.") for t in trusted):
        trusted.append("127.0.0.1/32")
    images = data.setdefault("images", {})
    images["dir"] = str(images_dir.resolve() if images_dir else (base / images.get("dir", "images")).resolve())
    data.setdefault("events", {})["path"] = str((out / "events.db").resolve())
    if "include" in data:
        data["include"] = [str((base / p).resolve()) for p in data["include"]]
    if profile.max_instances is not None:
        data.setdefault("limits", {})["max_instances"] = profile.max_instances
    for route in data.get("route", []):
        route["idle_timeout"] = f"{profile.idle_timeout_s:g}s"
        if profile.boot_timeout_s is not None:
            route["boot_timeout"] = f"{profile.boot_timeout_s:g}s"
    if backend == "libvirt":
        for host in data.get("host", []):
            host["backend"] = "libvirt"
            host["uri"] = libvirt_uri
            host["slots"] = min(int(host.get("slots", 1)), 1)  # real VMs on two cores: one per host
        for route in data.get("route", []):
            # busybox httpd listens with a backlog of 9; behind QEMU's user networking a burst
            # beyond it (the queue of a cold boot) can hang instead of being retried
            route.setdefault("max_conns", 8)
    (out / "summon.toml").write_text(dump_toml(data))
    return data


def image_has_vm_target(cfg: dict[str, Any]) -> list[str]:
    """Images of the config's routes without an x86_64 target (needed by libvirt)."""
    missing = []
    images_dir = Path(cfg["images"]["dir"])
    for route in cfg.get("route", []):
        name = route.get("image")
        if not name:
            continue
        try:  # the built manifest (build/image.toml) when there is a current one
            targets = load_image(images_dir, name).targets()
        except ImageError:
            targets = []
        if "x86_64" not in targets:
            missing.append(name)
    return missing


# --- processes ----------------------------------------------------------------------------


def venv_bin(name: str) -> str:
    cand = Path(sys.executable).parent / name
    return str(cand) if cand.exists() else name


def stop_process(proc: subprocess.Popen[bytes] | None, grace_s: float = 20.0) -> None:
    """SIGTERM to the process group we created for this PID, then SIGKILL."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def http_get(url: str, timeout: float = 2.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 (loopback URLs we built)
        return bytes(r.read())


def wait_admin(admin: str, proc: subprocess.Popen[bytes] | None, timeout_s: float, log: Path | None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
            raise HarnessError(f"summon exited with status {proc.returncode}:\n{tail}")
        try:
            json.loads(http_get(admin + "/status"))
            return
        except (OSError, ValueError):
            time.sleep(0.2)
    raise HarnessError(f"admin API {admin}/status did not answer within {timeout_s:g}s")


# --- sampling /status -----------------------------------------------------------------------


@dataclass
class Sample:
    t: float  # unix time
    total: int
    cap: int
    live: dict[str, int]  # region -> booting + ready + draining
    ready: dict[str, int]
    queued: int
    instances: int  # instances listed (any state), to check "all pools at zero"
    inflight: dict[str, int] = field(default_factory=dict)  # instance id -> requests in flight


@dataclass
class Poller:
    admin: str
    interval_s: float
    samples: list[Sample] = field(default_factory=list)
    errors: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def sample(self) -> Sample | None:
        try:
            snap = json.loads(http_get(self.admin + "/status"))
        except (OSError, ValueError):
            self.errors += 1
            return None
        live: dict[str, int] = {}
        ready: dict[str, int] = {}
        listed = queued = 0
        inflight: dict[str, int] = {}
        for route in snap.get("routes", []):
            queued += int(route.get("queued") or 0)
            for inst in route.get("instances", []):
                listed += 1
                inflight[str(inst.get("id"))] = int(inst.get("inflight") or 0)
                region = inst.get("region") or "?"
                if inst.get("state") in LIVE_STATES:
                    live[region] = live.get(region, 0) + 1
                if inst.get("state") == "ready":
                    ready[region] = ready.get(region, 0) + 1
        totals = snap.get("totals", {})
        s = Sample(time.time(), int(totals.get("instances", sum(live.values()))), int(totals.get("cap") or 0),
                   live, ready, queued, listed, inflight)
        self.samples.append(s)
        return s

    def _run(self) -> None:
        while not self._stop.is_set():
            start = time.monotonic()
            self.sample()
            self._stop.wait(max(0.0, self.interval_s - (time.monotonic() - start)))

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="status-poller", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)


# --- reading Locust's CSVs ---------------------------------------------------------------


def _num(v: str | None) -> float:
    try:
        return float(v) if v not in (None, "", "N/A") else math.nan
    except ValueError:
        return math.nan


def read_totals(path: Path) -> dict[str, float]:
    with path.open() as f:
        for row in csv.DictReader(f):
            if row.get("Name") == "Aggregated":
                return {
                    "requests": _num(row.get("Request Count")),
                    "failures": _num(row.get("Failure Count")),
                    "median_ms": _num(row.get("Median Response Time")),
                    "p95_ms": _num(row.get("95%")),
                    "p99_ms": _num(row.get("99%")),
                    "max_ms": _num(row.get("Max Response Time")),
                    "rps": _num(row.get("Requests/s")),
                }
    raise HarnessError(f"{path}: no Aggregated row")


def read_history(path: Path) -> list[dict[str, float]]:
    """Aggregated rows of *_stats_history.csv. Requests/s and failures/s are computed from the
    running totals (Locust's own figure is a 10 s average that freezes when requests stop), and
    the percentiles are blanked for intervals without requests (Locust repeats the last ones)."""
    rows = []
    with path.open() as f:
        for row in csv.DictReader(f):
            if row.get("Name") != "Aggregated":
                continue
            rows.append({
                "t": _num(row.get("Timestamp")),
                "users": _num(row.get("User Count")),
                "rps": _num(row.get("Requests/s")),
                "fps": _num(row.get("Failures/s")),
                "p50": _num(row.get("50%")),
                "p95": _num(row.get("95%")),
                "requests": _num(row.get("Total Request Count")),
                "failures": _num(row.get("Total Failure Count")),
            })
    prev: dict[str, float] | None = None
    for row in rows:
        if prev is not None and row["t"] > prev["t"]:
            dt = row["t"] - prev["t"]
            new = row["requests"] - prev["requests"]
            row["rps"] = new / dt
            row["fps"] = (row["failures"] - prev["failures"]) / dt
            if new <= 0:
                row["p50"] = row["p95"] = math.nan
        elif prev is None:
            row["rps"] = row["fps"] = 0.0
        prev = row
    return rows


def read_failures(path: Path) -> list[str]:
    if not path.exists():
        return []
    with path.open() as f:
        return [f"{r.get('Occurrences')} x {r.get('Method')} {r.get('Name')}: {r.get('Error')}" for r in csv.DictReader(f)]


# --- analysis ------------------------------------------------------------------------------


def events_max_live(events: list[dict[str, Any]]) -> tuple[int, dict[str, int]]:
    """Max concurrent instances (total and per region) from summoned/stopped events."""
    live: dict[str, str] = {}  # instance -> region
    best = 0
    per_region: dict[str, int] = {}
    for e in sorted(events, key=lambda e: e.get("ts") or 0):
        inst = e.get("instance")
        if not inst:
            continue
        if e.get("kind") == "summoned":
            live[inst] = e.get("region") or "?"
        elif e.get("kind") == "stopped":
            live.pop(inst, None)
        else:
            continue
        best = max(best, len(live))
        counts: dict[str, int] = {}
        for region in live.values():
            counts[region] = counts.get(region, 0) + 1
        for region, n in counts.items():
            per_region[region] = max(per_region.get(region, 0), n)
    return best, per_region


def analyse(out: Path, profile: Profile, weights: dict[str, float], poller: Poller | None,
            events: list[dict[str, Any]], t0: float, own_proxy: bool, backend: str) -> tuple[bool, str]:
    totals = read_totals(out / "spike_stats.csv")
    history = read_history(out / "spike_stats_history.csv")
    failures = read_failures(out / "spike_failures.csv")
    samples = poller.samples if poller else []
    cap = max((s.cap for s in samples), default=0)
    regions = sorted({r for s in samples for r in s.live} | set(weights) if samples else set(weights),
                     key=lambda r: -weights.get(r, 0))
    max_total = max((s.total for s in samples), default=0)
    max_region = {r: max((s.live.get(r, 0) for s in samples), default=0) for r in regions}
    ev_max, ev_region = events_max_live(events)
    summoned = sorted((e for e in events if e.get("kind") == "summoned"), key=lambda e: e.get("ts") or 0)
    first_region = summoned[0].get("region") if summoned else None
    if first_region is None:
        first = next((s for s in samples if s.total > 0), None)
        first_region = max(first.live.items(), key=lambda kv: kv[1])[0] if first and first.live else None
    expected = busiest(weights)
    scale_outs = [e for e in summoned if not str((e.get("detail") or {}).get("reason", "")).startswith("cold request")]
    first_scale_region = scale_outs[0].get("region") if scale_outs else None
    # order in which regions got their first replica
    order: list[str] = []
    for e in summoned:
        if e.get("region") and e["region"] not in order:
            order.append(e["region"])
    last = samples[-1] if samples else None
    back_to_zero = last is not None and last.total == 0 and last.instances == 0
    zero_at = None
    if back_to_zero:
        for s in reversed(samples):
            if s.total != 0:
                break
            zero_at = s.t
    peak_at = next((s.t for s in samples if s.total == max_total), None) if max_total else None
    rejected = sum(1 for e in events if e.get("kind") == "rejected")
    cap_reached = sum(1 for e in events if e.get("kind") == "cap_reached")
    failed_boots = sum(1 for e in events if e.get("kind") == "failed")
    # instances stopped without serving a request: boots the load did not need
    unused = sum(1 for e in events if e.get("kind") == "stopped" and (e.get("detail") or {}).get("served") == 0)

    checks: list[tuple[str, bool, bool]] = []  # (text, ok, gating)
    nreq = int(totals["requests"]) if math.isfinite(totals["requests"]) else 0
    nfail = int(totals["failures"]) if math.isfinite(totals["failures"]) else 0
    checks.append((f"requests made: {nreq}", nreq > 0, True))
    checks.append((f"failed requests: {nfail}", nfail == 0, True))
    if poller is not None:
        worst = max(max_total, ev_max)
        checks.append((f"max replicas {worst} (status samples {max_total}, events {ev_max}) <= cap {cap}",
                       cap > 0 and worst <= cap, True))
        checks.append(("all pools back at zero at the end" + (f" ({zero_at - t0:.1f}s into the run)" if zero_at else ""),
                       back_to_zero, True))
        checks.append((f"first replica in region {first_region} (busiest client region: {expected})",
                       first_region == expected, own_proxy))
        if scale_outs:
            checks.append((f"first scale-out replica in region {first_scale_region} (busiest client region: {expected})",
                           first_scale_region == expected, own_proxy))

    def rel(t: float | None) -> str:
        return f"{t - t0:.1f}s" if t is not None else "-"

    lines = [
        f"summon spike load test: profile {profile.name}, backend {backend}, region weights "
        + ",".join(f"{k}={v:g}" for k, v in weights.items()),
        "phases: " + ", ".join(f"{n} {a:g}-{b:g}s" for n, a, b in profile.phases())
        + f"; users quiet {profile.quiet_users}, peak {profile.peak_users}; "
        + (f"idle_timeout {profile.idle_timeout_s:g}s" if own_proxy else "the running proxy's own idle_timeout"),
        "",
        f"requests           {nreq}",
        f"failures           {nfail}",
        f"requests/s (mean)  {totals['rps']:.1f}    peak (1 s) {max((h['rps'] for h in history if math.isfinite(h['rps'])), default=0):.1f}",
        f"latency ms         median {totals['median_ms']:g}, p95 {totals['p95_ms']:g}, p99 {totals['p99_ms']:g}, max {totals['max_ms']:.0f}",
        f"p95 (2 s window)   worst {max((h['p95'] for h in history if math.isfinite(h['p95'])), default=math.nan):g} ms",
    ]
    if poller is not None:
        lines += [
            f"cap                {cap}",
            f"max replicas       {max(max_total, ev_max)} (status samples {max_total}, event log {ev_max}), at {rel(peak_at)}",
            "max per region     " + ", ".join(f"{r}={max(max_region.get(r, 0), ev_region.get(r, 0))}" for r in regions),
            f"first region       {first_region} at {rel(summoned[0]['ts']) if summoned else '-'}; regions in order: {' '.join(order) or '-'}",
            f"first scale-out    {first_scale_region or '-'}"
            + (f" at {rel(scale_outs[0]['ts'])} (client region {scale_outs[0].get('detail', {}).get('client_region')})"
               if scale_outs else " (the load never needed a second replica)"),
            f"summoned           {len(summoned)} instances, {failed_boots} failed, {cap_reached} cap_reached events, "
            f"{rejected} rejected requests (engine), {unused} stopped without serving a request",
            f"back to zero       {'yes' if back_to_zero else 'NO'} (last sample: {last.total if last else '-'} live, "
            f"{last.instances if last else '-'} listed){'' if not zero_at else f', from {rel(zero_at)}'}",
            f"status samples     {len(samples)} ({poller.errors} failed polls)",
        ]
    if failures:
        lines += ["", "failures:"] + [f"  {f}" for f in failures[:20]]
    lines += ["", "checks:"]
    ok = True
    for text, passed, gating in checks:
        mark = "PASS" if passed else ("FAIL" if gating else "WARN")
        lines.append(f"  {mark}  {text}")
        if gating and not passed:
            ok = False
    lines += ["", f"result: {'PASS' if ok else 'FAIL'}"]
    return ok, "\n".join(lines) + "\n"


# --- the chart -------------------------------------------------------------------------------

REGION_COLOURS = ["tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink"]


def draw_chart(path: Path, history: list[dict[str, float]], samples: list[Sample], t0: float,
               profile: Profile, weights: dict[str, float], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(3, 1, figsize=(11, 9), sharex=True,
                                        gridspec_kw={"height_ratios": [1, 1, 1.2]})
    ht = [h["t"] - t0 for h in history]
    ax1.plot(ht, [h["rps"] for h in history], color="tab:blue", label="requests/s")
    ax1.plot(ht, [h["fps"] for h in history], color="tab:red", label="failures/s")
    ax1.set_ylabel("requests/s")
    ax1b = ax1.twinx()
    ax1b.plot(ht, [h["users"] for h in history], color="grey", linestyle=":", label="users")
    ax1b.set_ylabel("users", color="grey")
    ax1b.set_ylim(bottom=0)
    h1, l1 = ax1.get_legend_handles_labels()
    h2, l2 = ax1b.get_legend_handles_labels()
    ax1.legend(h1 + h2, l1 + l2, loc="upper right", fontsize=8)
    ax1.set_ylim(bottom=0)

    ax2.plot(ht, [h["p95"] for h in history], color="tab:purple", label="p95")
    ax2.plot(ht, [h["p50"] for h in history], color="tab:cyan", label="p50", linewidth=0.8)
    ax2.set_ylabel("latency ms (2 s window)")
    ax2.set_ylim(bottom=0)
    ax2.legend(loc="upper right", fontsize=8)

    st = [s.t - t0 for s in samples]
    regions = sorted({r for s in samples for r in s.live} | set(weights), key=lambda r: -weights.get(r, 0))
    for i, region in enumerate(regions):
        w = weights.get(region)
        label = f"{region} (weight {w:g})" if w is not None else region
        ax3.step(st, [s.live.get(region, 0) for s in samples], where="post", label=label,
                 color=REGION_COLOURS[i % len(REGION_COLOURS)], linewidth=1.8)
    ax3.step(st, [s.total for s in samples], where="post", color="black", linewidth=1, linestyle="--", label="total")
    cap = max((s.cap for s in samples), default=0)
    if cap:
        ax3.axhline(cap, color="red", linewidth=1.2, label=f"cap ({cap})")
        ax3.set_ylim(0, cap + 1)
    ax3.set_ylabel("replicas\n(booting+ready+draining)")
    ax3.set_xlabel("seconds since the start of the spike")
    ax3.legend(loc="upper right", fontsize=8, ncol=2)
    ax3.yaxis.get_major_locator().set_params(integer=True)

    for name, start, _end in profile.phases():
        for ax in (ax1, ax2, ax3):
            ax.axvline(start, color="lightgrey", linewidth=0.8, zorder=0)
        ax1.annotate(name, (start, 1.0), xycoords=("data", "axes fraction"), fontsize=8, color="dimgrey",
                     xytext=(2, -10), textcoords="offset points")
    for ax in (ax1, ax2, ax3):
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_replicas_csv(path: Path, samples: list[Sample], t0: float, regions: list[str]) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["t", "unix_time", "total", "cap", "queued", "inflight", *[f"live_{r}" for r in regions],
                    *[f"ready_{r}" for r in regions], "inflight_by_instance"])
        for s in samples:
            w.writerow([f"{s.t - t0:.2f}", f"{s.t:.3f}", s.total, s.cap, s.queued, sum(s.inflight.values()),
                        *[s.live.get(r, 0) for r in regions], *[s.ready.get(r, 0) for r in regions],
                        " ".join(f"{k}={v}" for k, v in s.inflight.items())])


# --- main ----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", choices=sorted(PROFILES), help="default: spike (libvirt with --backend libvirt)")
    p.add_argument("--quick", action="store_true", help="the quick profile (40 users, ~40 s)")
    p.add_argument("--backend", choices=("process", "libvirt"), default="process")
    p.add_argument("--libvirt-uri", default="qemu:///system")
    p.add_argument("--config", type=Path, default=HERE / "loadtest.toml", help="summon config to start from")
    p.add_argument("--images-dir", type=Path, default=None,
                   help="images directory for the started summon (default: the config's [images] dir)")
    p.add_argument("--out", type=Path, default=None, help="output directory (default loadtests/results/spike-PROFILE-BACKEND)")
    p.add_argument("--proxy", help="use a running proxy at this URL instead of starting summon")
    p.add_argument("--admin", help="its admin API (with --proxy; without it no replicas are recorded)")
    p.add_argument("--region-weights", default=DEFAULT_WEIGHTS)
    p.add_argument("--poll", type=float, default=0.5, help="seconds between GET /status samples")
    p.add_argument("--settle", type=float, default=None,
                   help="after the run, wait this long at most for zero pools (default 30 s, 120 s with --proxy: "
                        "its idle_timeout is not ours)")
    for name, kind in (("peak-users", int), ("quiet-users", int), ("quiet-s", float), ("surge-s", float),
                       ("plateau-s", float), ("decay-s", float), ("tail-s", float), ("idle-timeout-s", float),
                       ("max-instances", int)):
        p.add_argument(f"--{name}", type=kind, default=None, help="override the profile's value")
    args = p.parse_args(argv)
    if args.quick:
        args.profile = args.profile or "quick"
    if args.profile is None:
        args.profile = "libvirt" if args.backend == "libvirt" else "spike"
    if args.admin and not args.proxy:
        p.error("--admin goes with --proxy")
    if args.settle is None:
        args.settle = 120.0 if args.proxy else 30.0
    return args


def run(args: argparse.Namespace) -> int:
    weights = parse_weights(args.region_weights)
    profile = PROFILES[args.profile].with_overrides(
        peak_users=args.peak_users, quiet_users=args.quiet_users, quiet_s=args.quiet_s, surge_s=args.surge_s,
        plateau_s=args.plateau_s, decay_s=args.decay_s, tail_s=args.tail_s, idle_timeout_s=args.idle_timeout_s,
        max_instances=args.max_instances)
    out: Path = args.out or HERE / "results" / f"spike-{profile.name}-{args.backend}"
    out.mkdir(parents=True, exist_ok=True)
    for old in [*out.glob("spike_*.csv"), *out.glob("events.db*")]:
        old.unlink()
    own_proxy = not args.proxy
    summon: subprocess.Popen[bytes] | None = None
    locust: subprocess.Popen[bytes] | None = None
    poller: Poller | None = None
    events: list[dict[str, Any]] = []
    try:
        if own_proxy:
            listen, admin_port = free_port(), free_port()
            cfg = make_config(args.config, out, profile, args.backend, args.libvirt_uri, listen, admin_port,
                              args.images_dir)
            if args.backend == "libvirt":
                missing = image_has_vm_target(cfg)
                if missing:
                    raise HarnessError(f"image(s) {', '.join(missing)} in {cfg['images']['dir']} have no x86_64 "
                                       f"target: run `.venv/bin/summon images build {missing[0]}` first")
                if args.libvirt_uri.startswith("qemu:///"):
                    subprocess.run(["bash", str(REPO / "scripts" / "start-libvirt.sh")], check=True)
            proxy, admin = f"http://127.0.0.1:{listen}", f"http://127.0.0.1:{admin_port}"
            log = out / "summon.log"
            with log.open("wb") as lf:
                summon = subprocess.Popen([venv_bin("summon"), "serve", "-c", str(out / "summon.toml")],
                                          stdout=lf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          cwd=REPO, start_new_session=True)
            wait_admin(admin, summon, 30.0, log)
        else:
            proxy, admin = args.proxy.rstrip("/"), (args.admin.rstrip("/") if args.admin else None)
            if admin:
                wait_admin(admin, None, 5.0, None)
        if admin:
            poller = Poller(admin, args.poll)
            poller.start()
        cmd = [venv_bin("locust"), "-f", str(HERE / "locustfile.py"), "--headless", "--host", proxy,
               "--csv", str(out / "spike"), "--csv-full-history", "--only-summary", "--loglevel", "WARNING",
               "--spike-profile", profile.name, "--region-weights", args.region_weights]
        for key in ("peak_users", "quiet_users", "quiet_s", "surge_s", "plateau_s", "decay_s", "tail_s"):
            cmd += [f"--{key.replace('_', '-')}", str(getattr(profile, key))]
        print(f"spike: profile {profile.name} ({profile.total_s:g} s, peak {profile.peak_users} users), "
              f"backend {args.backend}, proxy {proxy}, output {out}", flush=True)
        t_launch = time.time()
        with (out / "locust.log").open("wb") as lf:
            locust = subprocess.Popen(cmd, stdout=lf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      cwd=REPO, start_new_session=True)
            try:
                rc = locust.wait(profile.total_s + 120)
            except subprocess.TimeoutExpired:
                stop_process(locust, 10)
                raise HarnessError("locust did not finish in time") from None
        if not (out / "spike_stats.csv").exists():
            tail = (out / "locust.log").read_text(errors="replace")[-2000:]
            raise HarnessError(f"locust exited with status {rc} and wrote no CSVs:\n{tail}")
        if poller is not None:
            deadline = time.monotonic() + args.settle
            while time.monotonic() < deadline:
                last = poller.samples[-1] if poller.samples else None
                if last is not None and last.total == 0 and last.instances == 0:
                    break
                time.sleep(args.poll)
            poller.stop()
            poller.sample()  # the final word
        if admin:
            try:
                raw = http_get(admin + "/events?n=10000", timeout=10).decode()
                events = [json.loads(line) for line in raw.splitlines() if line.strip()]
                events = [e for e in events if (e.get("ts") or 0) >= t_launch - 5]
            except (OSError, ValueError) as exc:
                print(f"spike: could not read {admin}/events: {exc}", file=sys.stderr)
            (out / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    finally:
        if poller is not None:
            poller.stop()
        stop_process(locust, 10)
        stop_process(summon)

    history = read_history(out / "spike_stats_history.csv")
    # the first history row is written when the test starts: that is t = 0 of the shape
    t0 = history[0]["t"] if history and math.isfinite(history[0]["t"]) else t_launch
    samples = poller.samples if poller else []
    ok, summary = analyse(out, profile, weights, poller, events, t0, own_proxy, args.backend)
    regions = sorted({r for s in samples for r in s.live} | set(weights), key=lambda r: -weights.get(r, 0))
    write_replicas_csv(out / "replicas.csv", samples, t0, regions)
    draw_chart(out / "chart.png", history, samples, t0, profile, weights,
               f"summon spike: {profile.peak_users} users ({args.region_weights}), {args.backend} backend")
    (out / "summary.txt").write_text(summary)
    print(summary, end="")
    print(f"spike: wrote {out}/chart.png, summary.txt, replicas.csv, events.jsonl, spike_*.csv", flush=True)
    return 0 if ok else 1


def _sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # the finally blocks stop summon and locust


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _sigterm)
    try:
        return run(args)
    except HarnessError as exc:
        print(f"spike: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("spike: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
