"""`page` section: a cold page load in headless Chromium, with pre-summoning off and on.

The per-URL demo site (`summon routes split-site images/decks/site --vm`: one image and
one exact-URL route per file, `prefetch = [...]` on each page) is served by summon on the
process backend and on microVMs (libvirt + QEMU, `start = "boot"` and `start =
"restore"`). Its table says `presummon = true`; a copy says `presummon = false`. For each
configuration, `runs` rounds (5, 2 with --quick); each round measures, every time from a
fresh `summon serve` (every pool cold: the last one stopped all its instances, which is
checked) and with no other of our instances alive:

- `off` / `on`: Chromium (its headless shell where installed: `bench_browser`; a fresh
  profile, no cache) navigates to `/`; the figure is the
  navigation's `loadEventEnd` (ms from navigation start to the end of the load event).
  The two alternate, and swap order every round, so a drift of the shared machine falls
  on both alike;
- `floor`: the page's and its resources' GETs (`/` and the page's `prefetch` list) sent
  at once with a plain HTTP client through summon, pre-summoning off, timed from the
  first send to the last complete response: the page's instances started all at once,
  no browser involved;
- `one`: a lone cold GET of `/` through summon: one boot alone.

`BENCH_PAGE_CONFIGS` (comma-separated: `process`, `vm_boot`, `vm_restore`) runs only those.

Boots are the `summoned` events of each run. The goals (issue 18), on VMs only: the
median `on` at most 1.2x the median floor, and at most 0.85x the median `off`. Where a
start's time goes is read from the `ready` events' `phases` of the `on` runs: the page's
own boot and the slowest resource's, per phase (medians).

Every run also prints its timeline on one clock (`page_timeline.py`): per instance when
its boot was issued and by whom (a request or a pre-summon), when it was ready (and its
phases), when Chromium (or the plain client) sent its request and got the answer, and
its QEMU's CPU seconds when the page was ready and in all; then how many cores were busy
and the CPU seconds of the QEMUs, Chromium, summon and the rest. Per configuration a
"where the time goes" line gives the medians. The load event is awaited as Chromium's
`Page.loadEventFired`, with nothing asked of the page meanwhile (a poll costs Chromium
CPU that the boots it waits for then lack). `BENCH_PAGE_LOWPRIO=1` adds a diagnostic kind
per round, `on_lp`: pre-summoning on with `[prefetch] low_priority = true`.
"""

from __future__ import annotations

import collections
import http.client
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import benchlib as bl  # noqa: E402
import page_timeline as ptl  # noqa: E402

GOAL_ON_OVER_FLOOR = 1.2
GOAL_ON_OVER_OFF = 0.85
VM_SETTLE_S = 0.5  # after the last VM is gone, before the next start (cf. bench_cold)
LOAD_TIMEOUT_S = 120.0
LOWPRIO = os.environ.get("BENCH_PAGE_LOWPRIO") == "1"  # also `on_lp`: pre-summoning on, `low_priority = true`
SITE = ROOT / "images" / "decks" / "site"
SUMMON = ROOT / ".venv" / "bin" / "summon"


class Site:
    """The split demo site in a directory libvirt's QEMU can read, and its route tables."""

    def __init__(self, vm: bool) -> None:
        self.name = f"pagebench{os.getpid()}"  # unique: domain names and processes are ours alone
        self.dir = Path(tempfile.mkdtemp(prefix="summon-bench-page-", dir="/var/tmp"))
        self.dir.chmod(0o755)
        argv = [str(SUMMON), "routes", "split-site", str(SITE), "--name", self.name, "--images-dir",
                str(self.dir / "images"), "--routes-dir", str(self.dir / "routes"), "-q"]
        if vm:
            argv.append("--vm")
        cp = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
        if cp.returncode != 0:
            raise RuntimeError(f"split-site failed: {(cp.stderr or cp.stdout)[-800:]}")
        self.table = (self.dir / "routes" / f"{self.name}.toml").read_text()
        page = next(r for r in tomllib.loads(self.table)["route"] if r["url"] == "/")
        self.resources: list[str] = list(page.get("prefetch", []))

    def routes(self, presummon: bool, start: str) -> Path:
        """The route table with pre-summoning on or off and every route's `start`."""
        path = self.dir / "routes" / f"{self.name}-{'on' if presummon else 'off'}-{start}.toml"
        text = self.table.replace("presummon = true", f"presummon = {'true' if presummon else 'false'}")
        if start != "boot":
            text = re.sub(r"^(presummon = \w+)$", rf'\1\nstart = "{start}"', text, flags=re.M)
        path.write_text(text)
        return path

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


class Run:
    """One `summon serve` over a route table; stopped (and its instances checked gone) on exit."""

    counter = 0

    def __init__(self, bench: Any, site: Site, backend: str, routes: Path, extra: str = "") -> None:
        Run.counter += 1
        self.bench, self.site, self.backend = bench, site, backend
        self.dir = bench.tmp / f"page-{Run.counter}"
        self.dir.mkdir(parents=True)
        self.port, self.admin = bl.free_port(), bl.free_port()
        host = ('backend = "libvirt"\nuri = "qemu:///system"' if backend == "libvirt" else 'backend = "process"')
        self.config = self.dir / "summon.toml"
        self.config.write_text(f"""
include = ["{routes}"]

[proxy]
listen = "127.0.0.1:{self.port}"
admin = "127.0.0.1:{self.admin}"
workers = 1
drain_timeout = "2s"

[limits]
max_instances = 32

[images]
dir = "{site.dir / 'images'}"

[events]
path = "{self.dir / 'events.db'}"

[[region]]
name = "local"
cidrs = ["127.0.0.0/8", "::1/128"]

[[host]]
name = "local"
region = "local"
slots = 32
{host}
{extra}
""")
        self.proc: bl.Proc | None = None

    def __enter__(self) -> Run:
        self.proc = self.bench.procs.start(f"page-summon-{Run.counter}", [str(SUMMON), "serve", "-c", str(self.config)],
                                           cwd=self.dir)
        if not bl.wait_port("127.0.0.1", self.port, timeout=30, alive=self.proc.alive):
            tail = self.proc.output_tail()
            self.bench.procs.stop(self.proc)
            raise RuntimeError(f"summon did not start:\n{tail}")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.bench.procs.stop(self.proc, grace=30)  # SIGTERM: drains, stops every instance
        left = wait_none_left(self.site, self.backend)
        if left:
            raise RuntimeError(f"instances left running after summon stopped: {left}")

    def events(self) -> list[Any]:
        from proxy.observe.events import open_readonly

        return list(open_readonly(self.dir / "events.db").query())


def ours_running(site: Site, backend: str) -> list[str]:
    """Our instances still alive: libvirt domains named after the site, or processes whose
    command line names its directory."""
    out: list[str] = []
    if backend == "libvirt":
        import libvirt

        from proxy.backends.libvirt_xml import sanitise

        conn = libvirt.open("qemu:///system")
        try:
            prefix = f"summon-{sanitise(site.name)}"
            out += [d.name() for d in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
                    if d.name().startswith(prefix)]
        finally:
            conn.close()
    cp = subprocess.run(["pgrep", "-f", str(site.dir)], capture_output=True, text=True, check=False)
    out += [f"pid {p}" for p in cp.stdout.split()]
    return out


def wait_none_left(site: Site, backend: str, timeout_s: float = 30.0) -> list[str]:
    deadline = time.monotonic() + timeout_s
    while (left := ours_running(site, backend)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


# ---------------------------------------------------------------------------
# the four measurements


def browser_load(browser: Any, run: Run, resources: list[str], marks: dict[str, Any]) -> float:
    """Seconds from navigation start to the end of the load event of a cold `/`, in a
    fresh browser context (its own cache and connections: nothing carried over from the
    last load) of one running Chromium. A load event also ends a page whose resources
    failed: each must have been answered 200."""
    b = browser
    ctx = b.call("Target.createBrowserContext")["browserContextId"]
    outer = b.session
    try:
        target = b.call("Target.createTarget", {"url": "about:blank", "browserContextId": ctx})["targetId"]
        b.session = b.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        b.call("Page.enable", session=True)
        b.call("Runtime.enable", session=True)
        b.call("Page.navigate", {"url": f"http://127.0.0.1:{run.port}/"}, session=True, timeout=LOAD_TIMEOUT_S)
        # the load event as Chromium reports it, nothing asked meanwhile: a poll would be a
        # script run in the page every few ms, CPU taken from the boots the load waits for
        b.wait_event("Page.loadEventFired", timeout=LOAD_TIMEOUT_S)
        ms = b.wait_for("performance.getEntriesByType('navigation')[0]?.loadEventEnd || 0", timeout=10, interval=0.01)
        status = b.evaluate("Object.fromEntries([...performance.getEntriesByType('navigation'),"
                            " ...performance.getEntriesByType('resource')]"
                            ".map(e => [new URL(e.name).pathname, e.responseStatus]))")
        rendered = "decks" in b.dom()
        marks.update(ptl.chromium_timing(b))
    finally:
        b.session = outer
        b.call("Target.disposeBrowserContext", {"browserContextId": ctx})
        b.events.clear()
    bad = {p: status.get(p) for p in ["/", *resources] if status.get(p) != 200}
    marks["zero"] = marks["nav"]["start"]
    marks["end"] = marks["nav"]["loadEventEnd"]
    marks["requests"] = ptl.first_by_path([marks["nav"], *marks["resources"]])
    if bad or not rendered:
        raise RuntimeError(f"the browser's loads were not all answered 200: {bad or 'the page did not render'}")
    return float(ms) / 1000.0


def _get(port: int, path: str, out: dict[str, Any], at: dict[str, dict[str, float]]) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=LOAD_TIMEOUT_S)
    try:
        at[path] = {"requestStart": time.time()}
        conn.request("GET", path, headers={"Connection": "close"})
        resp = conn.getresponse()
        at[path]["responseStart"] = time.time()
        resp.read()
        at[path]["responseEnd"] = time.time()
        out[path] = (resp.status, time.perf_counter())
    except (OSError, http.client.HTTPException) as e:
        out[path] = (repr(e), time.perf_counter())
    finally:
        conn.close()


def concurrent_gets(run: Run, paths: list[str], marks: dict[str, Any] | None = None) -> float:
    """Seconds from sending every GET at once to the last complete response (all must be 200)."""
    done: dict[str, Any] = {}
    at: dict[str, dict[str, float]] = {}
    threads = [threading.Thread(target=_get, args=(run.port, p, done, at)) for p in paths]
    if marks is not None:
        marks["zero"], marks["requests"] = time.time(), at
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(LOAD_TIMEOUT_S + 5)
    bad = {p: s for p, (s, _) in done.items() if s != 200}
    if bad or len(done) != len(paths):
        raise RuntimeError(f"GETs through summon failed: {bad or 'no answer'}")
    seconds = max(at for _, at in done.values()) - t0
    if marks is not None:
        marks["end"] = marks["zero"] + seconds
    return seconds


def boots_of(events: list[Any]) -> dict[str, Any]:
    """Boots of one run, and for a pre-summoning run where the time went: the page's own
    start and its slowest resource's (seconds from summons to ready, and their phases)."""
    summoned = [e for e in events if e.kind == "summoned"]
    ready = {e.instance: e for e in events if e.kind == "ready"}
    page = next((e for e in summoned if e.route.endswith(":/")), None)
    out: dict[str, Any] = {"boots": len(summoned), "presummoned": sum(e.kind == "presummoned" for e in events),
                           "kinds": dict(collections.Counter(e.kind for e in events))}
    if page is not None and page.instance in ready:
        r = ready[page.instance]
        out["page_ready_s"] = r.duration_s
        out["page_phases"] = r.detail.get("phases") or {}
    others = [ready[e.instance] for e in summoned if e is not page and e.instance in ready]
    if others and page is not None:
        slowest = max(others, key=lambda r: r.ts)
        out["last_resource_ready_after_page_summons_s"] = round(slowest.ts - page.ts, 3)
        out["last_resource"] = slowest.route
        out["last_resource_ready_s"] = slowest.duration_s
        out["last_resource_phases"] = slowest.detail.get("phases") or {}
    return out


def measure(bench: Any, site: Site, backend: str, start: str, runs: int) -> dict[str, Any]:
    from tests.helpers.browser import Browser

    tables = {"off": site.routes(False, start), "on": site.routes(True, start)}
    page_and_resources = ["/", *site.resources]
    samples: dict[str, list[float]] = {"off": [], "on": [], "floor": [], "one": []}
    if LOWPRIO:  # a diagnostic: pre-summons at the lowest CPU priority until waited for
        samples["on_lp"] = []
    detail: dict[str, list[dict[str, Any]]] = {k: [] for k in samples}
    failures: list[str] = []

    def one(kind: str, browser: Any) -> None:
        for attempt in (1, 2):  # a run that failed (a resource not answered 200) is run again, once
            if backend == "libvirt":
                time.sleep(VM_SETTLE_S)  # a QEMU just torn down still slows the next start
            table = tables["on"] if kind in ("on", "on_lp") else tables["off"]
            extra = "[prefetch]\nlow_priority = true\n" if kind == "on_lp" else ""
            marks: dict[str, Any] = {}
            with Run(bench, site, backend, table, extra) as run, ptl.CpuWatch(run.proc.pid if run.proc else None) as cpu:
                try:
                    if kind in ("off", "on", "on_lp"):
                        seconds = browser_load(browser, run, site.resources, marks)
                    else:
                        seconds = concurrent_gets(run, page_and_resources if kind == "floor" else ["/"], marks)
                except RuntimeError as e:
                    seconds = None
                    why = str(e)
                cpu.stop()  # the window's end: before summon stops its instances
            events = run.events()
            boots = boots_of(events)
            if seconds is not None:
                samples[kind].append(seconds)
                boots["timeline"] = ptl.timeline(events, marks["zero"], page_and_resources, marks["requests"],
                                                 cpu if backend == "libvirt" else None, _domain_of, marks["end"])
                detail[kind].append(boots)
                bench.log(f"    {kind:<5} {seconds:7.3f} s  boots {boots['boots']}")
                for line in ptl.describe(boots["timeline"]):
                    bench.log(line)
                return
            failures.append(f"{kind} (attempt {attempt}): {why}; events {boots['kinds']}")
            bench.log(f"    {kind:<5} FAILED: {failures[-1]}")

    if start == "restore":  # one start of each image saves its snapshot; not measured
        t0 = time.monotonic()
        with Run(bench, site, backend, tables["off"]) as run:
            concurrent_gets(run, page_and_resources)
        bench.log(f"    snapshots of {len(page_and_resources)} images saved in {time.monotonic() - t0:.1f} s")
    with Browser(timeout=60, binary=bench_browser()) as browser:  # one Chromium; each load in a fresh context of it
        for n in range(runs):
            bench.log(f"  round {n + 1} of {runs}  (loadavg {bl.loadavg()})")
            for kind in (("off", "on") if n % 2 == 0 else ("on", "off")):
                one(kind, browser)
            if LOWPRIO:
                one("on_lp", browser)
            one("floor", browser)
            if n % 2 == 0:  # one boot alone is context, not a goal's term: every other round
                one("one", browser)
    med = {k: bl.median(v) for k, v in samples.items()}
    return {
        "backend": backend, "start": start, "runs": runs,
        "seconds": {k: [round(x, 3) for x in v] for k, v in samples.items()},
        "median_s": {k: round(v, 3) if v is not None else None for k, v in med.items()},
        "boots": {k: bl.median(d["boots"] for d in v) for k, v in detail.items()},
        "presummoned": {k: bl.median(d["presummoned"] for d in v) for k, v in detail.items()},
        "over_floor": {k: _r(bl.ratio(med[k], med["floor"])) for k in ("off", "on", "on_lp") if k in med},
        "over_one_boot": {k: _r(bl.ratio(med[k], med["one"])) for k in ("off", "on", "on_lp", "floor") if k in med},
        "on_over_off": _r(bl.ratio(med["on"], med["off"])),
        "on_over_off_per_round": [_r(x) for x in bl.paired_ratios(samples["on"], samples["off"])],
        "failed_runs": failures,
        "where": where_time_goes(detail),
        "runs_detail": detail,
    }


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def where_time_goes(detail: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Medians over the `on` runs (and the floor's) of the page's own start, the last
    resource's ready time counted from the page's summons, and the phases of both."""
    out: dict[str, Any] = {}
    for kind in ("on", "off", "floor"):
        runs = detail[kind]
        row: dict[str, Any] = {
            "page_ready_s": bl.median(r.get("page_ready_s") for r in runs),
            "last_resource_ready_after_page_summons_s": bl.median(
                r.get("last_resource_ready_after_page_summons_s") for r in runs),
            "last_resource_ready_s": bl.median(r.get("last_resource_ready_s") for r in runs),
        }
        for key in ("page_phases", "last_resource_phases"):
            names = [n for r in runs for n in (r.get(key) or {})]
            row[key] = {n: _r(bl.median((r.get(key) or {}).get(n) for r in runs)) for n in dict.fromkeys(names)}
        out[kind] = row
    return out


# ---------------------------------------------------------------------------
# report


def report(bench: Any, res: dict[str, Any]) -> None:
    m, b = res["median_s"], res["boots"]
    label = f"{res['backend']}, start={res['start']}" if res["backend"] == "libvirt" else "process backend"
    one_name = "one VM boot alone" if res["backend"] == "libvirt" else "one process start alone"
    bench.log(f"  {label}: medians of {res['runs']}, {os.cpu_count()} cores")
    bench.log(f"  {'configuration':<58}{'seconds':>9}{'boots':>7}{'x floor':>9}{'x one':>7}")
    rows = [
        ("Chromium, pre-summoning off (load event)", "off"),
        ("Chromium, pre-summoning on (load event)", "on"),
        *([("Chromium, on, pre-summons at low priority (diagnostic)", "on_lp")] if "on_lp" in m else []),
        ("floor: / and its resources' GETs at once, plain HTTP client", "floor"),
        (f"{one_name}: one cold GET / through summon", "one"),
    ]
    for text, k in rows:
        xf = res["over_floor"].get(k) if k in ("off", "on", "on_lp") else (1.0 if k == "floor" else None)
        xo = res["over_one_boot"].get(k) if k != "one" else 1.0
        bench.log(f"  {text:<58}{bl_fmt(m[k], 3):>9}{bl_fmt(b[k], 0):>7}{bl_fmt(xf, 2):>9}{bl_fmt(xo, 2):>7}")
    for line in ptl.summary(res["runs_detail"]):
        bench.log(line)
    w = res["where"]["on"]
    bench.log(f"  with pre-summoning: page ready {bl_fmt(w['page_ready_s'], 2)} s after its summons, the last"
              f" resource {bl_fmt(w['last_resource_ready_after_page_summons_s'], 2)} s after it"
              f" (its own start {bl_fmt(w['last_resource_ready_s'], 2)} s)")
    bench.log(f"    page phases {w['page_phases']}")
    bench.log(f"    last resource phases {w['last_resource_phases']}")
    for key, text in (("on_over_floor", "with / floor"), ("on_over_off", "with / without")):
        g = res["goals"][key]
        bench.log(f"  {text:<16} {bl_fmt(g['value'], 3):>7}   goal {g['goal']:<7} {g['status']}")


def bench_browser() -> str:
    """The Chromium the bench drives: ``$SUMMON_CHROMIUM``, else the headless shell where it
    is installed (a full Chromium's own 2-3 CPU-s per load fall on the cores the VMs boot
    on; the shell spends about 0.2), else Chromium."""
    from tests.helpers.browser import CHROMIUM, HEADLESS_SHELL

    return os.environ.get("SUMMON_CHROMIUM") or HEADLESS_SHELL or CHROMIUM


def bl_fmt(v: float | None, digits: int) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def section_page(bench: Any) -> dict[str, Any]:
    from tests.helpers.browser import CHROMIUM, HAVE_CHROMIUM

    if not HAVE_CHROMIUM:
        return {"skipped": f"headless Chromium not installed ({CHROMIUM})"}
    runs = 2 if getattr(bench.args, "quick", False) else 5
    result: dict[str, Any] = {"cpus": os.cpu_count(), "loadavg_before": bl.loadavg(), "runs": runs,
                              "floor_method": "the page's and its resources' GETs sent at once through summon "
                                              "(plain HTTP client, pre-summoning off), to the last response"}
    result["browser"] = bench_browser()
    bench.log(f"page: cold page load of the per-URL demo site in headless Chromium ({result['browser']});"
              f" {os.cpu_count()} cores, loadavg {result['loadavg_before']}")
    vm_reason = _vm_unavailable()
    site = Site(vm=vm_reason is None)
    bench.log(f"  split {SITE.relative_to(ROOT)} into {site.dir} ({'with' if vm_reason is None else 'no'} microVMs);"
              f" / fetches {site.resources}")
    configs = [("process", "boot")]
    if vm_reason is None:
        configs += [("libvirt", "boot"), ("libvirt", "restore")]
    else:
        result["vm_skipped"] = vm_reason
        bench.log(f"  VMs skipped: {vm_reason}")
    wanted = [k for k in os.environ.get("BENCH_PAGE_CONFIGS", "").split(",") if k]  # e.g. vm_boot,vm_restore
    if wanted:
        configs = [c for c in configs if _key(*c) in wanted]
    try:
        for backend, start in configs:
            key = _key(backend, start)
            bench.log(f" {key}:")
            res = measure(bench, site, backend, start, runs)
            res["goals"] = {
                "on_over_floor": {"value": res["over_floor"]["on"], "goal": f"<= {GOAL_ON_OVER_FLOOR}",
                                  "status": bl.check_goal(res["over_floor"]["on"], "<=", GOAL_ON_OVER_FLOOR)},
                "on_over_off": {"value": res["on_over_off"], "goal": f"<= {GOAL_ON_OVER_OFF}",
                                "status": bl.check_goal(res["on_over_off"], "<=", GOAL_ON_OVER_OFF)},
            }
            if backend != "libvirt":  # the goals are the VMs'; on processes the figures are context
                for g in res["goals"].values():
                    g["status"] = f"({g['status']}, no goal)"
            report(bench, res)
            result[key] = res
    finally:
        left = ours_running(site, "libvirt" if vm_reason is None else "process")
        site.close()
        result["left_running"] = left
        result["loadavg_after"] = bl.loadavg()
        bench.log(f"page: loadavg before {result['loadavg_before']}, after {result['loadavg_after']};"
                  f" instances left running: {len(left)}")
    return result


def _domain_of(route: str, instance: str) -> str:
    from proxy.backends.libvirt_xml import domain_name

    return domain_name(route, instance)


def _key(backend: str, start: str) -> str:
    return "process" if backend == "process" else f"vm_{start}"


def _vm_unavailable() -> str | None:
    try:
        import libvirt  # noqa: F401

        from proxy.backends.libvirt import libvirt_available
    except ImportError:
        return "libvirt-python is not installed"
    if not list(Path("/boot").glob("vmlinuz-*")):
        return "no kernel in /boot"
    subprocess.run(["bash", str(ROOT / "scripts" / "start-libvirt.sh")], check=False, capture_output=True)
    return libvirt_available("qemu:///system")
