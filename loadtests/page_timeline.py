"""Where a cold page load's time goes: one timeline per run of the `page` section, on one clock.

Why a module of its own: `bench_page.py` measures, this explains. Every mark is wall-clock
seconds (`time.time()`, the clock of summon's events), shown relative to the run's zero
(Chromium's navigation start, or the plain client's first send):

- Chromium's Performance timing: `performance.timeOrigin` is the navigation start in
  epoch milliseconds, every entry's times are milliseconds after it (requestStart,
  responseStart, responseEnd per resource, loadEventEnd);
- summon's events: `summoned` (a boot issued: a cold request arrived, or a pre-summon),
  `presummoned`, `ready` (its `duration_s` counts from the summons, its `phases` say where
  that went);
- the CPU: a thread samples /proc/stat every `SAMPLE_S` (how many of the cores were busy)
  and the QEMUs' own CPU time (found by their `-name guest=` on the command line), and two
  scans of every process at the window's ends say who used the CPU: the QEMUs, Chromium,
  summon, libvirt's daemons, this benchmark, and everything else (the other users of a
  shared machine).

Nothing here is a goal: these figures say why a goal is met or missed.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

PROC = Path("/proc")
TCK = os.sysconf("SC_CLK_TCK")
SAMPLE_S = 0.1
LIBVIRT_DAEMONS = {"libvirtd", "virtqemud", "virtlogd", "virtlockd", "virtnetworkd", "virtnodedevd"}


def _stat(pid: str) -> tuple[str, int, int] | None:
    """(comm, ppid, utime + stime ticks) of a process, or None if it is gone."""
    try:
        text = (PROC / pid / "stat").read_text()
    except OSError:
        return None
    comm = text[text.index("(") + 1:text.rindex(")")]
    rest = text[text.rindex(")") + 2:].split()
    return comm, int(rest[1]), int(rest[11]) + int(rest[12])


def _guest_name(pid: str) -> str | None:
    try:
        argv = (PROC / pid / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    for i, a in enumerate(argv):
        if a == b"-name" and i + 1 < len(argv):
            return argv[i + 1].decode(errors="replace").split(",")[0].removeprefix("guest=")
    return None


def cpu_by_kind(summon_pid: int | None) -> dict[str, float]:
    """CPU seconds used so far by every live process, summed by kind."""
    procs: dict[str, tuple[str, int, int]] = {}
    for d in os.listdir(PROC):
        if d.isdigit() and (s := _stat(d)) is not None:
            procs[d] = s
    summon: set[str] = set()
    if summon_pid is not None:  # summon and its descendants (workers), not the QEMUs libvirt forks
        summon.add(str(summon_pid))
        grew = True
        while grew:
            grew = False
            for pid, (_c, ppid, _t) in procs.items():
                if pid not in summon and str(ppid) in summon:
                    summon.add(pid)
                    grew = True
    me = str(os.getpid())
    out = dict.fromkeys(("qemu", "chromium", "summon", "libvirt", "bench", "other"), 0.0)
    for pid, (comm, _ppid, ticks) in procs.items():
        if comm.startswith("qemu-system"):
            kind = "qemu"
        elif pid in summon:
            kind = "summon"
        elif comm.startswith(("chromium", "chrome")):
            kind = "chromium"
        elif comm in LIBVIRT_DAEMONS or comm.startswith("rpc-"):
            kind = "libvirt"
        elif pid == me:
            kind = "bench"
        else:
            kind = "other"
        out[kind] += ticks / TCK
    return out


def _busy_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all cores so far."""
    f = [int(x) for x in (PROC / "stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = f[3] + f[4]  # idle + iowait
    total = sum(f[:8])  # guest time is already inside user
    return total - idle, total


class CpuWatch:
    """Samples the cores' business and the QEMUs' CPU time while a run goes on."""

    def __init__(self, summon_pid: int | None) -> None:
        self.summon_pid = summon_pid
        self.samples: list[tuple[float, int, int]] = []  # (wall, busy, total)
        self.qemu: dict[str, list[tuple[float, float]]] = {}  # guest name -> [(wall, cpu s)]
        self._qemu_pids: dict[str, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-watch", daemon=True)
        self.before: dict[str, float] = {}
        self.after: dict[str, float] = {}
        self.t0 = self.t1 = 0.0

    def __enter__(self) -> CpuWatch:
        self.before = cpu_by_kind(self.summon_pid)
        self.t0 = time.time()
        self._thread.start()
        return self

    def stop(self) -> None:
        """The window's end (before summon stops its instances)."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(2)
        self.t1 = time.time()
        self.after = cpu_by_kind(self.summon_pid)

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _scan_qemus(self) -> None:
        for d in os.listdir(PROC):
            if d.isdigit() and d not in self._qemu_pids.values():
                s = _stat(d)
                if s is not None and s[0].startswith("qemu-system") and (name := _guest_name(d)):
                    self._qemu_pids[name] = d

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            now = time.time()
            busy, total = _busy_ticks()
            self.samples.append((now, busy, total))
            if n % 2 == 0:  # new QEMUs every other sample: a /proc scan costs a few ms
                self._scan_qemus()
            for name, pid in self._qemu_pids.items():
                s = _stat(pid)
                if s is not None:
                    self.qemu.setdefault(name, []).append((now, s[2] / TCK))
            n += 1
            self._stop.wait(SAMPLE_S)

    def busy_cores(self, t_from: float, t_to: float) -> float | None:
        """Mean number of busy cores between two wall times (from the nearest samples)."""
        inside = [s for s in self.samples if t_from - SAMPLE_S <= s[0] <= t_to + SAMPLE_S]
        if len(inside) < 2:
            return None
        (_, b0, n0), (_, b1, n1) = inside[0], inside[-1]
        return round((os.cpu_count() or 1) * (b1 - b0) / max(1, n1 - n0), 2)

    def qemu_cpu_at(self, guest: str, at: float) -> float | None:
        """A QEMU's CPU seconds at wall time `at` (the last sample before it)."""
        seen = [c for t, c in self.qemu.get(guest, []) if t <= at]
        return round(seen[-1], 2) if seen else (0.0 if guest in self.qemu else None)

    def qemu_cpu_total(self, guest: str) -> float | None:
        seen = self.qemu.get(guest)
        return round(seen[-1][1], 2) if seen else None

    def used(self) -> dict[str, float]:
        """CPU seconds per kind of process in the window."""
        return {k: round(self.after.get(k, 0.0) - self.before.get(k, 0.0), 2) for k in self.before}


def chromium_timing(browser: Any) -> dict[str, Any]:
    """The navigation's and every resource's timing, wall-clock seconds."""
    t = browser.evaluate(
        "(() => { const o = performance.timeOrigin; const nav = performance.getEntriesByType('navigation')[0];"
        " const f = e => ({path: new URL(e.name).pathname, start: e.startTime, requestStart: e.requestStart,"
        " responseStart: e.responseStart, responseEnd: e.responseEnd});"
        " return {origin: o, nav: {...f(nav), domInteractive: nav.domInteractive, loadEventEnd: nav.loadEventEnd},"
        " resources: performance.getEntriesByType('resource').map(f)}; })()")
    origin = float(t["origin"]) / 1000.0

    def wall(entry: dict[str, Any]) -> dict[str, Any]:
        return {k: (v if k == "path" or v is None else origin + float(v) / 1000.0) for k, v in entry.items()}

    return {"origin": origin, "nav": wall(t["nav"]), "resources": [wall(r) for r in t["resources"]]}


def first_by_path(entries: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The first entry of each path: a later one is another fetch of it (an icon, say,
    fetched again after the load), not the one the load event waited for."""
    out: dict[str, dict[str, Any]] = {}
    for e in entries:
        out.setdefault(e["path"], e)
    return out


def timeline(events: list[Any], zero: float, paths: list[str], requests: dict[str, dict[str, float]],
             cpu: CpuWatch | None, domain_of: Any, end: float) -> dict[str, Any]:
    """Per instance of the page (in `paths` order): when its boot was issued, by whom, when it
    was ready (and its phases), when its request was sent and answered, and its QEMU's
    CPU; plus the window's CPU. Seconds after `zero`."""
    def rel(x: float | None) -> float | None:
        return None if x is None else round(x - zero, 3)

    summoned = {e.instance: e for e in events if e.kind == "summoned"}
    pre = {e.instance for e in events if e.kind == "presummoned"}
    ready = {e.instance: e for e in events if e.kind == "ready"}
    rows: dict[str, dict[str, Any]] = {}
    for inst, s in summoned.items():
        path = s.route.split(":", 1)[1] if ":" in s.route else s.route
        r = ready.get(inst)
        row: dict[str, Any] = {"boot": rel(s.ts), "by": "presummon" if inst in pre else "request",
                               "ready": rel(r.ts) if r else None,
                               "phases": (r.detail.get("phases") or {}) if r else {}}
        req = requests.get(path, {})
        row.update({k: rel(req.get(k)) for k in ("requestStart", "responseStart", "responseEnd")})
        if cpu is not None:
            guest = domain_of(s.route, inst)
            row["cpu_s"] = cpu.qemu_cpu_total(guest)
            page_ready = next((rr.ts for ii, rr in ready.items() if summoned.get(ii) is not None
                               and summoned[ii].route.endswith(":/")), None)
            row["cpu_s_at_page_ready"] = cpu.qemu_cpu_at(guest, page_ready) if page_ready else None
        rows[path] = row
    out: dict[str, Any] = {"instances": {p: rows[p] for p in paths if p in rows}, "end": rel(end)}
    if cpu is not None:
        page = rows.get("/", {})
        pr = page.get("ready")
        out["busy_cores"] = {"window": cpu.busy_cores(zero, end),
                             "to_page_ready": cpu.busy_cores(zero, zero + pr) if pr else None,
                             "after_page_ready": cpu.busy_cores(zero + pr, end) if pr else None}
        out["cpu_s"] = cpu.used()
    return out


def describe(tl: dict[str, Any]) -> list[str]:
    """A compact print of one run's timeline."""
    lines = []
    for path, r in tl["instances"].items():
        ph = " ".join(f"{k}={v:.2f}" for k, v in r["phases"].items())
        cpu = ""
        if "cpu_s" in r:
            cpu = f" qemu cpu {_f(r.get('cpu_s_at_page_ready'))}@page/{_f(r.get('cpu_s'))}"
        lines.append(f"      {path:<11} boot {_f(r['boot'])} ({r['by'][:3]}) ready {_f(r['ready'])}"
                     f" req {_f(r.get('requestStart'))} resp {_f(r.get('responseStart'))}"
                     f" end {_f(r.get('responseEnd'))}{cpu}  [{ph}]")
    tail = f"      end {_f(tl['end'])}"
    if "busy_cores" in tl:
        b = tl["busy_cores"]
        tail += (f"; busy cores {_f(b['window'])} (to page ready {_f(b['to_page_ready'])},"
                 f" after {_f(b['after_page_ready'])}); cpu s {tl['cpu_s']}")
    lines.append(tail)
    return lines


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def summary(detail: dict[str, list[dict[str, Any]]]) -> list[str]:
    """'Where the time goes', medians over each kind's runs: when the page's own instance
    and the last one were ready, the end (load event, or the last response), how many
    cores were busy, and the CPU seconds of the QEMUs (per boot), Chromium and summon."""
    def med(xs: list[float | None]) -> float | None:
        xs = sorted(x for x in xs if x is not None)
        return None if not xs else (xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2)

    lines = ["  where the time goes (medians; s after navigation start / first send; cpu in core-seconds):"]
    for kind, runs in detail.items():
        tls = [r["timeline"] for r in runs if "timeline" in r]
        if not tls or kind == "one":
            continue
        page = med([t["instances"].get("/", {}).get("ready") for t in tls])
        last = med([max((i["ready"] for i in t["instances"].values() if i.get("ready") is not None), default=None)
                    for t in tls])
        end = med([t["end"] for t in tls])
        line = f"    {kind:<6} page ready {_f(page)}, last ready {_f(last)}, end {_f(end)}"
        if any("cpu_s" in t for t in tls):
            busy = med([t["busy_cores"]["window"] for t in tls])
            per_boot = med([med([i.get("cpu_s") for i in t["instances"].values()]) for t in tls])
            cpu = {k: med([t["cpu_s"][k] for t in tls]) for k in ("qemu", "chromium", "summon")}
            line += (f"; busy cores {_f(busy)}; cpu qemu {_f(cpu['qemu'])} ({_f(per_boot)} a boot),"
                     f" chromium {_f(cpu['chromium'])}, summon {_f(cpu['summon'])}")
        lines.append(line)
    return lines
