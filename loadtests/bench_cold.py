"""Cold-start figures: what summoning adds on top of the instance's own start.

`section_cold` (process backend, median of 20):
  direct  = spawn the decks image's unix command, poll it every 0.5 ms until the first
            HTTP 200: the image's own start-to-ready time;
  summon  = a GET through summon to a cold route, time to its first response byte;
  overhead = median(summon) - median(direct). Goal: under 10 ms.

`section_cold_vm` (libvirt backend, median of N, only where libvirt and the built
microVM are available): the same through summon for `start = "boot"`,
`start = "restore"` and `start = "resume"` (a paused standby woken), the raw libvirt
figures (createXML / restore / virDomainResume to first HTTP 200) measured directly with
the driver, alternating with the cold requests through summon (who goes first swaps
every round) so both see the same machine (`$SUMMON_BENCH_VM_KINDS`, e.g. ``resume``,
runs only those start modes), each mode's ratio to a boot (the default start), the summon overhead over raw
libvirt (goal: within 10 ms; a difference of two medians that each move by tens of ms
between runs for a boot, so also summon's own time on its own clock, `own_ms`), the memory of an idle VM and of a paused one, and the
issue's goals through summon: boot <= 1 s, restore <= 200 ms, resume <= 50 ms, idle
RSS <= 64 MiB.

Where each boot goes (`phases`): the p50 of each phase of the `ready` events' breakdown
(libvirt create, QEMU up, firmware, kernel init, PID 1, network, server, first
response; see proxy/backends/console.py), through summon and with the raw driver, next
to the floor measured in the same run (`Floor`): the same libvirt + QEMU path for a
guest that does nothing (the same kernel and command line, an initramfs whose PID 1
marks itself and powers off at once), and a domain created paused and destroyed (libvirt
and QEMU alone; also the floor of a restore's `restore` phase, which starts a QEMU the
same way and then reads the guest's RAM in). Each phase's ratio to its floor says how far
it is above what this machine allows; network, server and first response have no floor
(the idle guest has none of them).
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "loadtests"))  # run from bench.py or loaded by a test

import benchlib as bl  # noqa: E402

from proxy.images.manifest import load_image  # noqa: E402

GOAL_COLD_OVERHEAD_MS = 10.0
GOAL_RESTORE_RATIO = 0.3
GOAL_VM_OVERHEAD_MS = 10.0
GOAL_VM_MS = {"boot": 1000.0, "restore": 200.0, "resume": 50.0}  # through summon, to the first 200
GOAL_VM_RSS_MIB = 64.0
VM_KINDS = ("boot", "restore", "resume")
VM_SETTLE_S = 1.0  # between one VM's destruction and the next start


def _http_status(port: int, timeout: float = 1.0) -> int | None:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = s.recv(64)
        return int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else None
    except (OSError, ValueError, IndexError):
        return None


def direct_start_to_ready(argv_for_port: Any, deadline_s: float = 10.0) -> float:
    """Seconds from spawn to the first HTTP 200, polling every 0.5 ms."""
    port = bl.free_port()
    argv = argv_for_port(port)
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=str(ROOT))
    try:
        while time.perf_counter() - t0 < deadline_s:
            if _http_status(port) == 200:
                return time.perf_counter() - t0
            time.sleep(0.0005)
        raise RuntimeError("direct start never answered 200")
    finally:
        proc.terminate()
        proc.wait(5)


def ttfb(port: int, path: str = "/", timeout: float = 120.0) -> tuple[float, int]:
    """Seconds from sending a GET to its first response byte, and the status."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        t0 = time.perf_counter()
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n".encode())
        first = s.recv(1)
        t1 = time.perf_counter()
        rest = first
        while chunk := s.recv(65536):
            rest += chunk
    status = int(rest.split(b" ", 2)[1])
    return t1 - t0, status


def _admin_status(admin_port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/status", timeout=5) as r:
        return json.load(r)  # type: ignore[no-any-return]


def _wait_cold(admin_port: int, timeout: float = 60.0, standbys: int = 0) -> None:
    """Until the pool is cold: no instance, or (a resume route) only its paused standbys."""
    end = time.time() + timeout
    while time.time() < end:
        totals = _admin_status(admin_port)["totals"]
        parked = totals.get("standby", {}).get("instances", 0) if standbys else 0
        if totals["instances"] == standbys and parked == standbys:
            states = {i["state"] for r in _admin_status(admin_port)["routes"] for i in r["instances"]}
            if not standbys or states == {"standby"}:
                return
        time.sleep(0.02)
    raise RuntimeError("pool did not go back to zero" + (f" and {standbys} paused standby" if standbys else ""))


def _start_summon(bench: Any, name: str, backend: str, start: str, idle: str, extra_host: str = "") -> tuple[Any, int, int]:
    port, admin = bl.free_port(), bl.free_port()
    cfg = bench.tmp / f"{name}.toml"
    cfg.write_text(f"""
[proxy]
listen = "127.0.0.1:{port}"
admin = "127.0.0.1:{admin}"
[images]
dir = "{ROOT / 'images'}"
[events]
path = "{bench.tmp / (name + '-events.db')}"
[[host]]
name = "h"
backend = "{backend}"
slots = 4
{extra_host}
[[route]]
name = "cold"
path = "/"
image = "decks"
idle_timeout = "{idle}"
boot_timeout = "120s"
start = "{start}"
""")
    summon = ROOT / ".venv" / "bin" / "summon"
    proc = bench.procs.start(name, [str(summon), "serve", "-c", str(cfg)], cwd=str(ROOT))
    if not bl.wait_port("127.0.0.1", admin, timeout=30):
        raise RuntimeError(f"summon did not start: {proc.output_tail()}")
    return proc, port, admin


def section_cold(bench: Any) -> dict[str, Any]:
    runs = 20 if not getattr(bench.args, "quick", False) else 8
    image = load_image(ROOT / "images", "decks")
    bench.log(f"cold start (process backend): {runs} direct starts, then {runs} cold requests through summon")
    direct = [direct_start_to_ready(image.unix_command) for _ in range(runs)]
    proc, port, admin = _start_summon(bench, "summon-cold", "process", "boot", "100ms")
    through: list[float] = []
    try:
        for _ in range(runs):
            _wait_cold(admin)
            seconds, status = ttfb(port)
            if status != 200:
                raise RuntimeError(f"cold request answered {status}")
            through.append(seconds)
    finally:
        bench.procs.stop(proc)
    d, s = bl.median(direct), bl.median(through)
    assert d is not None and s is not None
    overhead_ms = (s - d) * 1000
    status = bl.check_goal(overhead_ms, "<", GOAL_COLD_OVERHEAD_MS)
    bench.log(f"  direct start-to-ready median {d * 1000:.2f} ms; through summon TTFB median {s * 1000:.2f} ms")
    bench.log(f"  summon cold-start overhead {overhead_ms:.2f} ms   goal < {GOAL_COLD_OVERHEAD_MS} ms   {status}")
    return {
        "runs": runs,
        "direct_start_to_ready_ms": [round(x * 1000, 3) for x in direct],
        "summon_ttfb_ms": [round(x * 1000, 3) for x in through],
        "direct_median_ms": round(d * 1000, 3),
        "summon_median_ms": round(s * 1000, 3),
        "overhead_ms": round(overhead_ms, 3),
        "goal": {"overhead_ms_below": GOAL_COLD_OVERHEAD_MS, "status": status},
    }


class RawLibvirt:
    """Boot or restore with the driver alone (no proxy), timed to the first HTTP 200.

    It keeps its own event loop and driver between starts, so its starts can alternate
    with cold requests through summon: on a shared machine both then see the same noise."""

    def __init__(self, kind: str) -> None:
        from proxy.backends.libvirt import LibvirtBackend
        from proxy.config import Host, Route

        self.kind = kind
        self.loop = asyncio.new_event_loop()
        self.backend = LibvirtBackend("qemu:///system")
        self.image = load_image(ROOT / "images", "decks")
        self.route = Route(name="rawbench", image="decks", start=kind)
        self.host = Host(name="h", region="local", backend="libvirt", uri="qemu:///system")
        self.rss_kib: int | None = None
        self.paused_rss_kib: int | None = None  # resume: a standby's, paused
        self.runs = 0
        if kind == "restore":
            from proxy.backends.base import InstanceSpec

            self.loop.run_until_complete(self.backend.save_snapshot(
                InstanceSpec("snap", self.route, self.host, self.image, "boot")))

        self.phases: list[dict[str, float]] = []

    def start_to_ready(self) -> float:
        return self.loop.run_until_complete(self._one())

    async def _one(self) -> float:
        from proxy.backends.base import InstanceSpec
        from proxy.engine.fleet import boot_phases

        self.runs += 1
        if self.kind == "resume":
            return await self._resume_one()
        t0, m0 = time.perf_counter(), time.monotonic()
        handle = await self.backend.start(InstanceSpec(f"raw{self.kind}{self.runs}", self.route, self.host,
                                                       self.image, self.kind))
        while _http_status(handle.address.port, timeout=0.1) != 200:  # short: a guest not up yet can hang a connection
            await asyncio.sleep(0.002)
        seconds = time.perf_counter() - t0
        self.phases.append(boot_phases(m0, self.backend.boot_marks(handle), time.monotonic()))
        if self.rss_kib is None:
            await asyncio.sleep(2.0)
            self.rss_kib = _qemu_rss_kib(str(handle.detail.get("domain", "")))
        await self.backend.stop(handle)
        return seconds

    async def _resume_one(self) -> float:
        """A standby as summon makes one (boot, first 200, suspend), then timed: resume to
        the first 200, polled every 2 ms."""
        from proxy.backends.base import InstanceSpec

        handle = await self.backend.start(InstanceSpec(f"rawresume{self.runs}", self.route, self.host,
                                                       self.image, "boot"))
        try:
            self.backend.boot_marks(handle)  # stop reading its console: the boot is not what is timed
            while _http_status(handle.address.port, timeout=0.1) != 200:
                await asyncio.sleep(0.01)
            await self.backend.pause(handle)
            await asyncio.sleep(VM_SETTLE_S)
            if self.paused_rss_kib is None:
                self.paused_rss_kib = _qemu_rss_kib(str(handle.detail.get("domain", "")))
            t0, m0 = time.perf_counter(), time.monotonic()
            await self.backend.resume(handle)
            m1 = time.monotonic()
            while _http_status(handle.address.port, timeout=0.1) != 200:
                await asyncio.sleep(0.002)
            seconds = time.perf_counter() - t0
            self.phases.append({"resume": m1 - m0, "first_response": time.monotonic() - m1})
            return seconds
        finally:
            await self.backend.stop(handle)

    def close(self) -> None:
        self.loop.run_until_complete(self.backend.close())
        self.loop.close()


class Floor:
    """What this machine allows on the same path: a guest that does nothing, and QEMU alone.

    `idle()` boots the image's kernel with its command line and an initramfs whose PID 1
    marks itself, copies the kernel's hand-over line and powers off (reboots, on a kernel
    without ACPI: the domain's on_reboot destroys it the same way): its phases up to
    ``init`` are the floor of a boot's; ``poweroff`` is from that mark until the domain is
    gone. `paused()` creates the domain paused (no guest code runs) and destroys it:
    libvirt and QEMU's own start. Uses the driver's own XML and console reading."""

    INIT = (b"#!/bin/busybox sh\n"
            b"echo '<2>summon-mark: init' > /dev/kmsg\n"
            b"/bin/busybox mount -t proc proc /proc\n"
            b"/bin/busybox dmesg | /bin/busybox grep -m1 'Run /init as init process'\n"
            b"[ -d /proc/acpi ] || /bin/busybox reboot -f\n"  # no ACPI (the minimal kernel): no poweroff
            b"/bin/busybox poweroff -f\n")

    def __init__(self) -> None:
        from proxy.backends.libvirt import LibvirtBackend
        from proxy.images.build import BUSYBOX, S_IFCHR, S_IFDIR, S_IFREG, Entry, write_initramfs

        self.loop = asyncio.new_event_loop()
        self.backend = LibvirtBackend("qemu:///system")
        self.image = load_image(ROOT / "images", "decks")
        self.initrd = self.image.dir / "build" / "floor.cpio.gz"  # where QEMU may read, like the KVM probe's
        write_initramfs(self.initrd, [
            Entry("bin/busybox", S_IFREG | 0o755, BUSYBOX.read_bytes()), Entry("init", S_IFREG | 0o755, self.INIT),
            Entry("dev/console", S_IFCHR | 0o600, rdev=(5, 1)), Entry("dev/kmsg", S_IFCHR | 0o644, rdev=(1, 11)),
            Entry("proc", S_IFDIR | 0o755),
        ])
        self.runs = 0

    def idle(self) -> dict[str, float]:
        return self.loop.run_until_complete(self._idle())

    def paused(self) -> dict[str, float]:
        return self.loop.run_until_complete(self._paused())

    def _domain(self, kind: str) -> tuple[Any, str]:
        from proxy.backends.libvirt_xml import domain_name

        self.runs += 1
        name = domain_name(f"floor-{kind}", f"{os.getpid()}-{self.runs}")
        params = self.backend._params(self.image, name, name, "qemu", bl.free_port(), "floor")
        return replace(params, initrd=self.initrd), name

    async def _idle(self) -> dict[str, float]:
        from proxy.backends.base import Handle
        from proxy.backends.libvirt_xml import domain_xml
        from proxy.engine.fleet import boot_phases

        params, name = self._domain("idle")
        self.backend.console_dir.mkdir(parents=True, exist_ok=True)
        conn = self.backend._connection()
        t0 = time.monotonic()
        dom = conn.createXML(domain_xml(params), 0)
        self.backend._note_boot(name, params, t0, time.monotonic(), restored=False)
        try:
            deadline = t0 + 60
            while time.monotonic() < deadline:
                try:
                    if not dom.isActive():
                        break
                except Exception:  # noqa: BLE001 - gone: that is what we wait for
                    break
                await asyncio.sleep(0.002)
            gone = time.monotonic()
            marks = self.backend.boot_marks(Handle(name, _addr(params.host_port), self.loop.create_future(),
                                                   {"domain": name}))
        finally:
            try:
                dom.destroy()
            except Exception:  # noqa: BLE001 - powered off already, as it should
                pass
            if params.console_log is not None:
                params.console_log.unlink(missing_ok=True)
        phases = boot_phases(t0, marks, gone)
        phases["poweroff"] = phases.pop("first_response")
        return phases

    async def _paused(self) -> dict[str, float]:
        import libvirt

        from proxy.backends.libvirt import qemu_exec_time
        from proxy.backends.libvirt_xml import domain_xml

        params, name = self._domain("paused")
        conn = self.backend._connection()
        t0 = time.monotonic()
        dom = conn.createXML(domain_xml(params), libvirt.VIR_DOMAIN_START_PAUSED)
        t1 = time.monotonic()
        exec_at = qemu_exec_time(name)
        dom.resume()  # the floor of a standby's wake-up: libvirt and QEMU's resume alone
        t2 = time.monotonic()
        dom.destroy()
        if params.console_log is not None:
            params.console_log.unlink(missing_ok=True)
        if exec_at is None or not t0 <= exec_at <= t1:
            return {"create_paused": t1 - t0, "resume": t2 - t1}
        return {"libvirt_create": exec_at - t0, "qemu_up": t1 - exec_at, "create_paused": t1 - t0, "resume": t2 - t1}

    def close(self) -> None:
        self.loop.run_until_complete(self.backend.close())
        self.loop.close()


def _addr(port: int) -> Any:
    from proxy.config import Address

    return Address("127.0.0.1", port)


def phase_medians(runs: list[dict[str, float]]) -> dict[str, float]:
    """p50 (the median, as `summon stats` would show it: nearest rank) of each phase, in order."""
    from proxy.observe.stats import percentile, phase_rank

    names = sorted({n for r in runs for n in r}, key=phase_rank)
    out = {}
    for n in names:
        p50 = percentile([r[n] for r in runs if n in r], 50)
        if p50 is not None:
            out[n] = round(p50 * 1000, 1)
    return out


def until_medians(runs: list[dict[str, float]]) -> dict[str, float]:
    """p50 of the time from the start to the end of each phase (ms): robust to a phase one
    run lacks (the next one then covers it), where per-phase figures are not."""
    from proxy.observe.stats import percentile, phase_rank

    sums: dict[str, list[float]] = {}
    for r in runs:
        total = 0.0
        for name in sorted(r, key=phase_rank):
            total += r[name]
            sums.setdefault(name, []).append(total)
    return {n: round((percentile(v, 50) or 0.0) * 1000, 1) for n, v in sums.items()}


def summon_ready(db: Path) -> list[tuple[float, dict[str, float]]]:
    """Each cold start's `ready` event, in order: its duration (the summons to the first
    answer, on summon's clock) and its phases."""
    from proxy.observe.events import EventReader

    events = EventReader(db, readonly=True).query()
    return [(e.duration_s or 0.0, dict(e.detail["phases"])) for e in events
            if e.kind == "ready" and isinstance(e.detail.get("phases"), dict)]


def own_ms(ttfbs: list[float], ready: list[tuple[float, dict[str, float]]]) -> list[float]:
    """summon's own share of each cold start, on its own clock (ms): the client's time to
    first byte less the ready event's duration (what is left is the request reaching the
    engine and the first answer reaching the client), plus the `prepare` phase (summon
    readying the driver's call). The driver is not in it and the guest only by the gap
    between its response head and body (summon holds a fixed-length head until its body
    starts), so it is an upper bound that, unlike a difference of medians with the raw
    driver, does not move with their noise.
    Requests and events pair in order: each cold request made exactly one start."""
    if len(ttfbs) != len(ready):
        return []
    return [round((t - d + p.get("prepare", 0.0)) * 1000, 2) for t, (d, p) in zip(ttfbs, ready, strict=True)]


def phases_report(bench: Any, through_runs: list[dict[str, float]], raw_runs: list[dict[str, float]],
                  floor_runs: list[dict[str, float]], paused_runs: list[dict[str, float]]) -> dict[str, Any]:
    """One row per phase (p50, ms): through summon, raw, the floor and the ratio to it;
    then the same from the start to the end of each phase."""
    through, raw = phase_medians(through_runs), phase_medians(raw_runs)
    floor, paused = phase_medians(floor_runs), phase_medians(paused_runs)
    floors = {**floor, **{k: v for k, v in paused.items() if k in ("libvirt_create", "qemu_up", "resume")}}
    if "create_paused" in paused:  # a restore is at least a QEMU started paused (then its RAM read in)
        floors["restore"] = paused["create_paused"]
    through_until, floor_until = until_medians(through_runs), until_medians(floor_runs)
    rows = {}
    bench.log(f"  {'phase':<16}{'summon':>9}{'raw':>9}{'floor':>9}{'x floor':>9}   {'until':>7}{'floor':>7}{'x floor':>9}")
    for name in [*through, *(n for n in raw if n not in through)]:
        f = floors.get(name)
        r = bl.ratio(through.get(name), f) if f else None
        fu = floor_until.get(name)
        ru = bl.ratio(through_until.get(name), fu) if fu else None
        rows[name] = {"summon_ms": through.get(name), "raw_ms": raw.get(name), "floor_ms": f, "over_floor": r,
                      "summon_until_ms": through_until.get(name), "floor_until_ms": fu, "until_over_floor": ru}
        bench.log(f"  {name:<16}{_ms(through.get(name)):>9}{_ms(raw.get(name)):>9}{_ms(f):>9}"
                  f"{(f'{r:.2f}' if r is not None else '-'):>9}   {_ms(through_until.get(name)):>7}{_ms(fu):>7}"
                  f"{(f'{ru:.2f}' if ru is not None else '-'):>9}")
    bench.log(f"  floor: idle guest {floor} ms; created paused {paused} ms")
    return {"by_phase": rows, "floor_idle_ms": floor, "floor_paused_ms": paused}


def _ratio_text(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def _ms1(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


def _qemu_rss_kib(domain: str) -> int | None:
    out = subprocess.run(["pgrep", "-f", f"guest={domain}"], capture_output=True, text=True).stdout.split()
    for pid in out:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        except OSError:
            continue
    return None


def bench_kernels() -> list[str]:
    """The kernels `cold_vm` measures, one after the other in the same run:
    ``$SUMMON_BENCH_KERNELS`` (e.g. ``packaged,minimal``), else the packaged one and, where
    it can be built here (linux-source-6.1 installed; compiled once, then cached), the
    minimal one."""
    raw = os.environ.get("SUMMON_BENCH_KERNELS", "")
    if raw:
        return [k.strip() for k in raw.split(",") if k.strip()]
    from proxy.images import minimal
    from proxy.images.build import package_version

    return ["packaged"] + ([] if minimal.missing_packages(package_version) else ["minimal"])


def bench_vm_kinds() -> list[str]:
    """The start modes `cold_vm` measures: ``$SUMMON_BENCH_VM_KINDS`` (e.g. ``resume``),
    else all three."""
    raw = [k.strip() for k in os.environ.get("SUMMON_BENCH_VM_KINDS", "").split(",") if k.strip()]
    unknown = sorted(set(raw) - set(VM_KINDS))
    if unknown:
        raise SystemExit(f"SUMMON_BENCH_VM_KINDS: unknown start mode(s) {', '.join(unknown)}"
                         f" (known: {', '.join(VM_KINDS)})")
    return [k for k in VM_KINDS if k in raw] if raw else list(VM_KINDS)


def section_cold_vm(bench: Any) -> dict[str, Any]:
    """The packaged kernel's figures at the top level (as before the minimal kernel), each
    other kernel's under ``kernels``; the build left in images/decks/build is the first's."""
    try:
        import libvirt  # noqa: F401

        from proxy.backends.libvirt import libvirt_available
    except ImportError:
        return {"skipped": "libvirt-python is not installed"}
    subprocess.run(["bash", str(ROOT / "scripts" / "start-libvirt.sh")], check=False)
    reason = libvirt_available("qemu:///system")
    if reason:
        return {"skipped": reason}
    kernels = bench_kernels()
    out: dict[str, Any] = {}
    for kernel in [*kernels[1:], kernels[0]]:
        bench.log(f"cold_vm: the {kernel} kernel")
        build = subprocess.run([str(ROOT / ".venv/bin/summon"), "images", "build", "decks", "--kernel", kernel],
                               cwd=ROOT, capture_output=True, text=True)
        if build.returncode != 0:
            part: dict[str, Any] = {"skipped": f"image build failed: {build.stderr[-500:]}"}
        else:
            part = _cold_vm_one(bench, kernel)
        part["kernel"] = kernel
        if kernel == kernels[0]:
            out.update(part)
        else:
            out.setdefault("kernels", {})[kernel] = part
    if len(kernels) > 1:
        bench.log(f"  {'kernel':<10}{'boot':>9}{'restore':>9}{'resume':>9}{'idle RSS':>10}   (through summon, p50 ms)")
        for kernel in kernels:
            k = out if kernel == kernels[0] else out["kernels"][kernel]
            if "skipped" in k:
                bench.log(f"  {kernel:<10} skipped: {k['skipped'][:200]}")
                continue
            bench.log(f"  {kernel:<10}" + "".join(f"{k.get(kind, {}).get('summon_median_ms', '-')!s:>9}"
                                                  for kind in VM_KINDS)
                      + f"{k.get('boot', {}).get('idle_vm_rss_mib')!s:>10}")
    return out


def _cold_vm_one(bench: Any, kernel: str) -> dict[str, Any]:
    """boot, restore and resume of the decks image as built now (see `section_cold_vm`);
    each kernel's summon keeps its own event log, whose `ready` events are its phases."""
    runs = 10 if not getattr(bench.args, "quick", False) else 3
    if os.environ.get("SUMMON_BENCH_RUNS", "").isdigit():
        runs = int(os.environ["SUMMON_BENCH_RUNS"])
    result: dict[str, Any] = {"runs": runs, "image": load_image(ROOT / "images", "decks").ref}
    floor_idle: list[dict[str, float]] = []
    floor_paused: list[dict[str, float]] = []
    kinds = bench_vm_kinds()
    for kind in kinds:
        bench.log(f"cold start (libvirt, start={kind}): {runs} raw driver starts alternating with"
                  f" {runs} cold requests through summon")
        standbys = 1 if kind == "resume" else 0
        proc, port, admin = _start_summon(bench, f"summon-vm-{kernel}-{kind}", "libvirt", kind, "200ms",
                                          'uri = "qemu:///system"')
        raw_driver = RawLibvirt(kind)
        floor = Floor() if kind == "boot" else None
        raw: list[float] = []
        through: list[float] = []
        try:
            for i in range(runs):
                # Each start, raw or through summon, begins with no other VM alive (but a
                # resume route's paused standby) and a pause after the last one was
                # destroyed: a QEMU being torn down (its memory freed) slows the restore
                # next to it by some 100 ms. Who goes first swaps every round, so a drift
                # of the shared machine within a round falls on both alike.
                for is_raw in (True, False) if i % 2 == 0 else (False, True):
                    _wait_cold(admin, timeout=180, standbys=standbys)
                    time.sleep(VM_SETTLE_S)
                    if is_raw:
                        raw.append(raw_driver.start_to_ready())
                        continue
                    seconds, status = ttfb(port)
                    if status != 200:
                        raise RuntimeError(f"cold VM request answered {status}: {proc.output_tail()}")
                    through.append(seconds)
                if floor is not None:  # the floor in the same run, between the same starts
                    _wait_cold(admin, timeout=120)
                    time.sleep(VM_SETTLE_S)
                    floor_idle.append(floor.idle())
                    time.sleep(VM_SETTLE_S)
                    floor_paused.append(floor.paused())
        finally:
            raw_driver.close()
            if floor is not None:
                floor.close()
            bench.procs.stop(proc, grace=30)
        r, s = bl.median(raw), bl.median(through)
        result[kind] = {"raw_ms": [round(x * 1000, 1) for x in raw], "summon_ms": [round(x * 1000, 1) for x in through],
                        "raw_median_ms": round((r or 0) * 1000, 1), "summon_median_ms": round((s or 0) * 1000, 1),
                        "overhead_ms": round(((s or 0) - (r or 0)) * 1000, 1)}
        if raw_driver.rss_kib is not None:
            result[kind]["idle_vm_rss_mib"] = round(raw_driver.rss_kib / 1024, 1)
        if raw_driver.paused_rss_kib is not None:
            result[kind]["paused_vm_rss_mib"] = round(raw_driver.paused_rss_kib / 1024, 1)
        bench.log(f"  raw median {result[kind]['raw_median_ms']} ms, through summon {result[kind]['summon_median_ms']} ms,"
                  f" overhead {result[kind]['overhead_ms']} ms")
        ready = summon_ready(bench.tmp / f"summon-vm-{kernel}-{kind}-events.db")
        own = own_ms(through, ready)
        result[kind]["own_ms"] = own
        result[kind]["own_median_ms"] = bl.median(own)
        bench.log(f"  summon's own time (its clock: the request to the engine, the first answer to the client,"
                  f" preparing the driver's call) median {result[kind]['own_median_ms']} ms"
                  + ("" if own else f" (not paired: {len(through)} requests, {len(ready)} ready events)"))
        result[kind]["phases"] = phases_report(bench, [p for _, p in ready], raw_driver.phases, floor_idle,
                                               floor_paused)
    boot_ms = result["boot"]["summon_median_ms"] if "boot" in result else None
    for kind in kinds:  # against the default start mode (boot), same run
        result[kind]["over_boot"] = bl.ratio(result[kind]["summon_median_ms"], boot_ms)
    ratio = result["restore"]["over_boot"] if "restore" in result else None
    result["restore_over_boot"] = ratio
    rss = result.get("boot", {}).get("idle_vm_rss_mib")
    result["goals"] = {
        "restore_over_boot": {"value": ratio, "goal": f"<= {GOAL_RESTORE_RATIO}",
                              "status": bl.check_goal(ratio, "<=", GOAL_RESTORE_RATIO)},
        "overhead_ms": {kind: {"value": result[kind]["overhead_ms"], "goal": f"<= {GOAL_VM_OVERHEAD_MS}",
                               "status": bl.check_goal(result[kind]["overhead_ms"], "<=", GOAL_VM_OVERHEAD_MS)}
                        for kind in kinds},
        "own_ms": {kind: {"value": result[kind]["own_median_ms"], "goal": f"<= {GOAL_VM_OVERHEAD_MS}",
                          "status": bl.check_goal(result[kind]["own_median_ms"], "<=", GOAL_VM_OVERHEAD_MS)}
                   for kind in kinds},
        "summon_ms": {kind: {"value": result[kind]["summon_median_ms"], "goal": f"<= {GOAL_VM_MS[kind]:g}",
                             "status": bl.check_goal(result[kind]["summon_median_ms"], "<=", GOAL_VM_MS[kind])}
                      for kind in kinds},
        "idle_vm_rss_mib": {"value": rss, "goal": f"<= {GOAL_VM_RSS_MIB:g}",
                            "status": bl.check_goal(rss, "<=", GOAL_VM_RSS_MIB)},
    }
    bench.log(f"  {'start':<9}{'summon':>9}{'raw':>9}{'overhead':>10}{'own':>7}{'x boot':>8}{'goal':>8}")
    for kind in kinds:
        k, g = result[kind], result["goals"]["summon_ms"][kind]
        bench.log(f"  {kind:<9}{k['summon_median_ms']:>9}{k['raw_median_ms']:>9}{k['overhead_ms']:>10}"
                  f"{_ms1(k['own_median_ms']):>7}"
                  f"{_ratio_text(k['over_boot']):>8}{g['goal']:>10} {g['status']}")
    bench.log(f"  idle VM RSS {rss} MiB (goal <= {GOAL_VM_RSS_MIB:g}); paused standby"
              f" {result.get('resume', {}).get('paused_vm_rss_mib')} MiB; restore/boot ratio {ratio}")
    return result


if __name__ == "__main__":  # pragma: no cover - quick manual run
    print(shlex.join(sys.argv), os.getcwd())
