"""Real microVMs through `summon serve`: cold request answered by a VM, orphans reaped
after a SIGKILL, a tampered initrd refused. Slow (TCG boots take seconds); runs in CI."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.test_orphans import get_through_outside_destroys, reaped_events, restart_storm, start_at_once
from tests.helpers.paths import REPO
from tests.helpers.summon_proc import Summon, http_get, wait_for
from tests.helpers.vm_images import URI, copy_decks, libvirt_up, on_host, summon_domains, vm_marks

pytestmark = vm_marks(400)

HOST = f"""
[[host]]
name = "vm"
backend = "libvirt"
uri = "{URI}"
slots = 2
kvm_probe = false
"""

ROUTE = """
[[route]]
name = "decks"
path = "/"
image = "decks"
boot_timeout = "120s"
idle_timeout = "10m"
"""


@pytest.fixture(scope="module")
def vm_images() -> Iterator[Path]:
    """The decks image with a marker only the VM's copy of the site carries."""
    from proxy.images.build import build_image

    libvirt_up()
    root = copy_decks("summon-vm-e2e-", marker="served-by-microvm")
    build_image(root / "decks", print)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def kinds(db: Path) -> list[str]:
    with sqlite3.connect(db) as c:
        return [r[0] for r in c.execute("select kind from events order by id")]


def ready_detail(db: Path, timeout_s: float = 10.0) -> dict:
    """The first `ready` event's detail (it may land just after the response)."""
    deadline = time.time() + timeout_s
    while True:
        with sqlite3.connect(db) as c:
            row = c.execute("select detail from events where kind = 'ready' order by id limit 1").fetchone()
        if row is not None or time.time() > deadline:
            assert row is not None, "no ready event"
            return dict(json.loads(row[0]))
        time.sleep(0.1)


def make_summon(tmp: Path, images: Path) -> Summon:
    return on_host(Summon(tmp, ROUTE), images, HOST)


def test_cold_request_is_answered_by_a_vm_and_orphans_are_reaped(tmp_path: Path, vm_images: Path) -> None:
    before = set(summon_domains())
    s = make_summon(tmp_path, vm_images).start()
    try:
        t0 = time.time()
        status, _, body = http_get(s.port, "/", timeout=150)
        assert status == 200, body[:300]
        assert b"served-by-microvm" in body  # only the VM's initramfs has this page
        print(f"cold request through a booted VM: {time.time() - t0:.1f}s")
        ready = ready_detail(s.events)
        phases = ready["phases"]
        print(f"phases: {phases}")
        # the driver's own and PID 1's marks are always there (the kernel's need a believable guest clock)
        assert {"prepare", "qemu_up", "init", "network", "first_response"} <= set(phases)
        assert all(v >= 0 for v in phases.values())
        assert ready["image"] == "decks"
        shown = subprocess.run([str(REPO / ".venv" / "bin" / "summon"), "stats", "-c", str(s.config)],
                               capture_output=True, text=True, timeout=60)
        assert "boot phases, p50 in ms" in shown.stdout and "network" in shown.stdout, shown.stdout + shown.stderr
        ids = [i["id"] for i in s.instances()]
        # only this summon's domains: other summons may share the machine's libvirtd
        mine = {d for d in set(summon_domains()) - before if any(d.endswith(i) for i in ids)}
        assert len(mine) == 1 and len(ids) == 1, "virsh list should show the summoned VM"
    finally:
        s.stop(signal.SIGKILL)  # no drain: the VM outlives summon
    assert mine <= set(summon_domains()), "the domain should still be running after SIGKILL"
    (tmp_path / "again").mkdir()
    s2 = make_summon(tmp_path / "again", vm_images).start()
    try:
        deadline = time.time() + 60
        while time.time() < deadline and mine & set(summon_domains()):
            time.sleep(0.5)
        assert not mine & set(summon_domains()), "a restarted summon must reap the orphan domain"
    finally:
        s2.stop()
    assert "reaped" in kinds(s2.events)


@pytest.mark.timeout(900)
def test_twenty_sigkill_restarts_leave_no_domain_behind(tmp_path: Path, vm_images: Path) -> None:
    """The issue's race with VMs: summon killed with SIGKILL while its VM serves (or boots)
    and started again at once, before the killed process is reaped (a zombie, whose pid
    an orphan check by pid takes for alive), 20 times. Every VM the killed summons left is
    destroyed, each with a `reaped` event, and only the running summon's VM is left."""
    prefix = f"summon-orphans-{os.getpid()}-"

    summon = make_summon(tmp_path, vm_images)  # one config, restarted as is: the same ports
    summon.config.write_text(summon.config.read_text().replace('name = "decks"', f'name = "orphans-{os.getpid()}"'))

    def up() -> Summon:
        return start_at_once(summon)

    def started() -> set[str]:
        return {n for n in summon_domains() if n.startswith(prefix)}

    t0 = time.monotonic()
    s, served, left, zombies = restart_storm(20, up, started, lambda i: i % 4 == 3)
    try:
        assert len(served) == 15 and len(left) == 20, (served, left)
        assert get_through_outside_destroys(s.port)[0] == 200
        deadline = time.monotonic() + 60
        while started() & left and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not started() & left, "domains of killed summons still run"
        assert len(started()) == len(s.instances()) == 1
        print(f"20 SIGKILL restarts with a VM up or booting: {time.monotonic() - t0:.0f}s")
    finally:
        s.stop()
        for z in zombies:
            z.wait(10)
    assert not started(), "the last summon's SIGTERM stops its VM"
    reaped = [r for r in reaped_events(s.events) if str(r["instance"]).startswith(prefix)]
    # A summon killed inside createXML makes libvirtd fail that start and destroy the
    # domain itself (measured: "shutting down, reason=failed"): those may be no one's to
    # reap. Every VM that had served was reaped, each reaping one event; at most one per
    # killed summon (a domain made just before the kill may never have been seen in `left`).
    assert served <= {str(r["instance"]) for r in reaped}, reaped
    assert len({r["instance"] for r in reaped}) <= 20, reaped
    assert len(reaped) == len({r["instance"] for r in reaped}), reaped
    qemu = subprocess.run(["pgrep", "-f", f"guest={prefix}"], capture_output=True, text=True).stdout
    assert not qemu.split(), f"qemu processes left: {qemu}"


def test_tampered_initrd_is_refused_with_a_clear_message(tmp_path: Path, vm_images: Path) -> None:
    tampered = Path(tempfile.mkdtemp(prefix="summon-vm-tamper-", dir="/var/tmp"))
    try:
        tampered.chmod(0o755)
        shutil.copytree(vm_images / "decks", tampered / "decks")
        initrd = tampered / "decks" / "build" / "initrd.cpio.gz"
        before = set(summon_domains())
        s = make_summon(tmp_path, tampered).start()
        # tampered after start-up (serve refuses to start on a bad digest: test_preflight.py)
        with initrd.open("ab") as f:
            f.write(b"\0")
        try:
            status, headers, body = http_get(s.port, "/", timeout=60)
            assert status == 503 and int(headers["retry-after"]) >= 1
            assert b"does not match its digest" in body and b"initrd" in body
        finally:
            s.stop()
        assert "failed" in kinds(s.events)
        pid = f"{s.proc.pid:x}" if s.proc is not None else "?"  # instance ids (so domain names) begin with it
        made = [d for d in set(summon_domains()) - before if pid in d]  # other summons may share libvirtd
        assert not made, "a tampered image must not get as far as a domain"
    finally:
        shutil.rmtree(tampered, ignore_errors=True)


def domain_state(name: str) -> str:
    return subprocess.run(["virsh", "-c", URI, "domstate", name], capture_output=True, text=True).stdout.strip()


def test_cold_request_on_a_resume_route_is_answered_by_a_resumed_standby(tmp_path: Path, vm_images: Path) -> None:
    """`start = "resume"`: a booted-then-paused VM waits (virsh says paused); the cold
    request wakes it instead of booting, the `ready` event says so with the measured
    resume to first 200, and the pool boots its next standby in the background."""
    s = make_summon(tmp_path, vm_images)
    s.config.write_text(s.config.read_text().replace('idle_timeout = "10m"\n',
                                                     'idle_timeout = "10m"\nstart = "resume"\nstandbys = 1\n'))
    s.start()
    parked: dict | None = None
    try:
        def standby() -> list[dict]:
            return [i for i in s.instances() if i["state"] == "standby"]

        (parked,) = wait_for(standby, timeout=180, step=0.5) or [None]
        assert parked is not None, "no paused standby after 180 s"
        (dom,) = [d for d in summon_domains() if d.endswith(parked["id"])]
        assert domain_state(dom) == "paused"
        totals = s.status()["totals"]["standby"]
        assert totals["instances"] == 1 and totals["memory_mib"] > 0
        print(f"paused standby RSS: {parked.get('rss_mib')} MiB")
        t0 = time.monotonic()
        status, _, body = http_get(s.port, "/", timeout=60)
        took = time.monotonic() - t0
        assert status == 200 and b"served-by-microvm" in body
        assert domain_state(dom) == "running"
        ready = ready_detail(s.events)
        assert ready["start"] == "resume" and set(ready["phases"]) == {"resume", "first_response"}, ready
        with sqlite3.connect(s.events) as c:
            (instance, duration), = c.execute("select instance, duration_s from events where kind = 'ready'")
        assert instance == parked["id"], "the standby answered, nothing was booted for the request"
        print(f"resumed standby: first 200 after {took * 1000:.0f} ms at the client, "
              f"{duration * 1000:.0f} ms resume to first 200 in the event, phases {ready['phases']}")
        refilled = wait_for(lambda: [i for i in standby() if i["id"] != parked["id"]], timeout=180, step=0.5)
        assert refilled, "the pool did not boot its next standby"
    finally:
        s.stop()
    assert parked is None or not [d for d in summon_domains() if d.endswith(parked["id"])], \
        "SIGTERM stops the VMs, paused ones too"
