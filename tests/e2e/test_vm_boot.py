"""Real microVMs: build the decks image, boot it under libvirt/QEMU, fetch /, stop; restore.

Skipped only when libvirt/QEMU are not installed; where they are (CI), libvirtd is
started if needed and these tests must pass.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.backends.base import InstanceSpec
from proxy.config import Host, Route
from proxy.images.manifest import Image, load_image
from tests.helpers.paths import REPO
from tests.helpers.vm_images import URI, vm_marks

pytestmark = vm_marks(240)


@pytest.fixture(scope="module")
def decks() -> Iterator[Image]:
    """The decks image, built into a directory QEMU (user libvirt-qemu) can read."""
    from proxy.backends.libvirt import libvirt_available
    from proxy.images.build import build_image
    from tests.helpers.vm_images import libvirt_daemons_up

    libvirt_daemons_up()
    reason = libvirt_available(URI)
    assert reason is None, reason
    root = Path(tempfile.mkdtemp(prefix="summon-vm-test-", dir="/var/tmp"))
    root.chmod(0o755)
    shutil.copytree(REPO / "images" / "decks", root / "decks", ignore=shutil.ignore_patterns("build"))
    t0 = time.monotonic()
    build_image(root / "decks", print)
    print(f"build: {time.monotonic() - t0:.2f}s")
    yield load_image(root, "decks")
    shutil.rmtree(root, ignore_errors=True)


def spec(image: Image, iid: str, start: str = "boot") -> InstanceSpec:
    route = Route(name="decks", path="/", image="decks", boot_timeout_s=60)
    return InstanceSpec(iid, route, Host("local", "local", "libvirt", URI), image, start=start)


def fetch(port: int, timeout_s: float = 60.0) -> tuple[bytes, float]:
    t0 = time.monotonic()
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as r:
                return r.read(), time.monotonic() - t0
        except OSError:
            if time.monotonic() - t0 > timeout_s:
                raise
            time.sleep(0.05)


def virsh_list() -> str:
    return subprocess.run(["virsh", "-c", URI, "list", "--name"], capture_output=True, text=True, check=True).stdout


def test_boot_fetch_stop(decks: Image) -> None:
    from proxy.backends.libvirt import LibvirtBackend

    index = (REPO / "images" / "decks" / "site" / "index.html").read_bytes()

    async def main() -> None:
        b = LibvirtBackend(URI, probe_kvm=True)
        t0 = time.monotonic()
        dtype = await b.domain_type(decks)
        print(f"domain type: {dtype} (probe {time.monotonic() - t0:.1f}s)")
        t0 = time.monotonic()
        h = await b.start(spec(decks, "boot1"))
        created = time.monotonic() - t0
        name = str(h.detail["domain"])
        assert name in virsh_list()
        body, waited = await asyncio.to_thread(fetch, h.address.port)
        print(f"create {created:.2f}s, boot-to-HTTP {created + waited:.2f}s")
        assert body == index
        assert not h.exited.done()
        marks = b.boot_marks(h)
        print(f"marks: {marks}")
        # the driver's, then PID 1's up to the network (httpd may answer before its mark lands)
        assert list(marks)[:1] == ["prepare"] and {"qemu_up", "init", "network"} <= set(marks)
        assert list(marks.values()) == sorted(marks.values())
        assert b.boot_marks(h) == {}  # read once: the console's tail is stopped
        t0 = time.monotonic()
        await b.stop(h)
        print(f"stop {time.monotonic() - t0:.2f}s")
        assert name not in virsh_list()
        await b.close()

    asyncio.run(main())


def test_snapshot_restore_two_instances(decks: Image) -> None:
    from proxy.backends.libvirt import LibvirtBackend

    index = (REPO / "images" / "decks" / "site" / "index.html").read_bytes()

    async def main() -> None:
        b = LibvirtBackend(URI, probe_kvm=True)
        t0 = time.monotonic()
        snap = await b.save_snapshot(spec(decks, "snap"))
        print(f"snapshot {snap} ({snap.stat().st_size >> 20} MiB) in {time.monotonic() - t0:.1f}s")
        assert decks.digest.removeprefix("sha256:") in snap.name
        assert await b.save_snapshot(spec(decks, "snap")) == snap  # reused, not rebuilt
        handles = []
        for iid in ("r1", "r2"):
            t0 = time.monotonic()
            h = await b.start(spec(decks, iid, start="restore"))
            body, waited = await asyncio.to_thread(fetch, h.address.port, 60)  # a bound, not a speed figure (bench: cold_vm)
            print(f"restore {iid}: restore-to-HTTP {time.monotonic() - t0:.2f}s (waited {waited:.2f}s for HTTP)")
            assert body == index and h.detail["start"] == "restore"
            handles.append(h)
        assert handles[0].address.port != handles[1].address.port
        for h in handles:  # both still answer while both run
            assert (await asyncio.to_thread(fetch, h.address.port, 20))[0] == index
        names = virsh_list()
        assert all(str(h.detail["domain"]) in names for h in handles)
        await b.close()
        names = virsh_list()
        assert not any(str(h.detail["domain"]) in names for h in handles)

    asyncio.run(main())


def cpu_shares(name: str) -> int:
    """A domain's cgroup CPU share, as libvirt reads it (cpu.shares, or cpu.weight on v2)."""
    import libvirt

    conn = libvirt.open(URI)
    try:
        return int(conn.lookupByName(name).schedulerParameters()["cpu_shares"])
    finally:
        conn.close()


def qemu_cgroup_shares(name: str) -> int | None:
    """The same, read by the kernel's files: the QEMU's cpu cgroup (v1: its domain's group
    above `emulator`), None where the cpu controller is not v1."""
    from proxy.backends.libvirt import QEMU_PID_DIR

    pid = int((QEMU_PID_DIR / f"{name}.pid").read_text())
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _n, controllers, path = line.split(":", 2)
        if "cpu" in controllers.split(","):
            group = Path("/sys/fs/cgroup") / controllers / path.lstrip("/")
            group = group.parent if group.name == "emulator" else group
            return int((group / "cpu.shares").read_text())
    return None


@pytest.mark.parametrize("start", ["boot", "restore"])
def test_a_background_start_has_the_least_cpu_share_until_foreground(decks: Image, start: str) -> None:
    """A pre-summon's domain is born with the least CPU share of libvirt's per-domain
    cgroup (QEMU's own nice would weigh nothing against the other domains' groups), the
    foreground gives it a normal domain's share, and the guest answers either way."""
    from dataclasses import replace

    from proxy.backends.libvirt import BACKGROUND_SHARES, LibvirtBackend, normal_cpu_shares

    normal = normal_cpu_shares()

    async def main() -> None:
        b = LibvirtBackend(URI, probe_kvm=True)
        try:
            plain = await b.start(spec(decks, f"fg{start}", start=start))  # a request's start: never lowered
            assert cpu_shares(str(plain.detail["domain"])) == normal
            h = await b.start(replace(spec(decks, f"bg{start}", start=start), background=True))
            name = str(h.detail["domain"])
            assert h.detail["start"] == start
            assert cpu_shares(name) == BACKGROUND_SHARES
            assert qemu_cgroup_shares(name) in (None, BACKGROUND_SHARES)
            await b.foreground(h.instance_id)
            assert cpu_shares(name) == normal and qemu_cgroup_shares(name) in (None, normal)
            await asyncio.to_thread(fetch, h.address.port, 60)
            await b.foreground(h.instance_id)  # once more: nothing left to do, no error
            assert cpu_shares(name) == normal
        finally:
            await b.close()

    asyncio.run(main())
