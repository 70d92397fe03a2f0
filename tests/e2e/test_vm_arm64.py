"""An arm64 microVM answers a cold request through `summon serve` (slow, TCG).

The image is built from Debian's arm64 packages (`summon images build --arch aarch64`);
`make test` installs what that needs (scripts/setup-arm64.sh, as root); where it could not
(not root, or no mirror with arm64) the test is skipped, saying which. qemu-system-aarch64
emulates the CPU under TCG on an x86 host: the boot-to-first-200 is printed (the README's
figure)."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.paths import REPO
from tests.helpers.summon_proc import Summon, http_get
from tests.helpers.vm_images import MISSING, URI, copy_decks, libvirt_up, on_host, summon_domains, vm_marks

_arm_missing = MISSING + [x for x in ("qemu-system-aarch64",) if shutil.which(x) is None]

pytestmark = vm_marks(300, _arm_missing, hint="(`make test` installs it as root: scripts/setup-arm64.sh)")

HOSTS = f"""
[[host]]
name = "board"
region = "edge"
backend = "libvirt"
uri = "{URI}"
arch = "aarch64"
slots = 1
kvm_probe = false
"""

ROUTE = """
[[route]]
name = "decks"
path = "/"
image = "decks"
boot_timeout = "150s"
idle_timeout = "10m"
"""


@pytest.fixture(scope="module")
def arm_images() -> Iterator[Path]:
    """decks built for aarch64 only, with a marker only the VM's copy of the site carries."""
    yield from _built(("aarch64",))


@pytest.fixture(scope="module")
def both_images() -> Iterator[Path]:
    """decks built for both arches."""
    yield from _built(("x86_64", "aarch64"))


def _built(arches: tuple[str, ...]) -> Iterator[Path]:
    from proxy.errors import ImageError
    from proxy.images.build import build_image

    libvirt_up("aarch64")
    root = copy_decks("summon-vm-arm64-", marker="served-by-arm64")
    try:
        t0 = time.monotonic()
        try:
            build_image(root / "decks", print, arches=arches)
        except ImageError as exc:
            if "architecture" in str(exc) or "apt" in str(exc):
                pytest.skip(f"cannot fetch Debian's arm64 packages: {exc}")
            raise
        print(f"arm64 image built in {time.monotonic() - t0:.1f}s")
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_a_cold_request_is_answered_by_an_arm64_microvm(tmp_path: Path, arm_images: Path) -> None:
    from proxy.images.manifest import load_image

    image = load_image(arm_images, "decks")
    assert image.targets() == ["aarch64", "unix"]  # no x86_64: only the board can run it
    s = Summon(tmp_path, ROUTE)
    on_host(s, arm_images, HOSTS)
    before = set(summon_domains())
    s.start()
    try:
        t0 = time.monotonic()
        status, _, body = http_get(s.port, "/", timeout=200)
        cold = time.monotonic() - t0
        assert status == 200, body[:300]
        assert b"served-by-arm64" in body
        print(f"arm64 (TCG) cold request, boot to first 200 through summon: {cold:.1f}s")
        (inst,) = s.instances()
        assert inst["host"] == "board" and inst["arch"] == "aarch64"
        shown = subprocess.run([sys.executable, "-m", "proxy.cli", "status", "-c", str(s.config)],
                               capture_output=True, text=True, timeout=30, cwd=REPO).stdout
        assert any("board" in line and "aarch64" in line for line in shown.splitlines()), shown
        mine = [d for d in set(summon_domains()) - before if d.endswith(inst["id"])]
        assert len(mine) == 1
        xml = subprocess.run(["virsh", "-c", URI, "dumpxml", mine[0]], capture_output=True, text=True,
                             check=True).stdout
        assert "arch='aarch64'" in xml and "machine='virt" in xml  # libvirt expands virt to virt-7.2
        t1 = time.monotonic()
        status, _, _ = http_get(s.port, "/", timeout=30)
        assert status == 200
        print(f"arm64 warm request: {(time.monotonic() - t1) * 1000:.0f} ms")
    finally:
        s.stop(signal.SIGTERM)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and set(summon_domains()) - before:
        time.sleep(0.5)
    assert not (set(summon_domains()) - before) & set(mine), "summon's stop must destroy its arm64 domain"


SPILL_HOSTS = f"""
[[region]]
name = "edge"
nearest = ["eu", "us"]
[[region]]
name = "us"
[[region]]
name = "eu"
[[host]]
name = "board"
region = "edge"
backend = "libvirt"
uri = "{URI}"
arch = "aarch64"
slots = 1
kvm_probe = false
[[host]]
name = "far"
region = "us"
backend = "libvirt"
uri = "{URI}"
slots = 2
kvm_probe = false
[[host]]
name = "near"
region = "eu"
backend = "libvirt"
uri = "{URI}"
slots = 2
kvm_probe = false
"""


def test_an_image_with_both_arches_spills_from_the_full_board_to_the_nearest_x86_host(
        tmp_path: Path, both_images: Path) -> None:
    """Two warm replicas wanted, the board has one slot: the second goes to eu (edge's
    nearest), not us, and boots the image's x86_64 target there."""
    s = Summon(tmp_path, ROUTE.replace('idle_timeout = "10m"', 'idle_timeout = "10m"\nmin_replicas = 2'))
    on_host(s, both_images, SPILL_HOSTS)
    before = set(summon_domains())
    s.start()
    try:
        t0 = time.monotonic()
        deadline = t0 + 200
        while time.monotonic() < deadline:
            insts = s.instances()
            if len(insts) == 2 and all(i["state"] == "ready" for i in insts):
                break
            time.sleep(0.5)
        print(f"both replicas ready in {time.monotonic() - t0:.1f}s")
        placed = sorted((i["host"], i["arch"], i["region"], i["state"]) for i in s.instances())
        assert placed == [("board", "aarch64", "edge", "ready"), ("near", "x86_64", "eu", "ready")], placed
        for inst in s.instances():  # each answers on its own forwarded port
            host, port = inst["address"].rsplit(":", 1)
            status, _, body = http_get(int(port), "/", timeout=30)
            assert status == 200 and b"served-by-arm64" in body
        status, _, _ = http_get(s.port, "/", timeout=30)
        assert status == 200
    finally:
        s.stop(signal.SIGTERM)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and set(summon_domains()) - before:
        time.sleep(0.5)


def test_the_arm64_target_rebuilds_bit_for_bit_from_its_manifest(both_images: Path) -> None:
    """`rebuild --arch aarch64 --check`: the arm64 .debs the manifest records, fetched again
    (never this machine's amd64 busybox at the same version), give the same digests."""
    r = subprocess.run([sys.executable, "-m", "proxy.cli", "images", "--images-dir", str(both_images), "rebuild",
                        "decks", "--arch", "aarch64", "--check"], capture_output=True, text=True, timeout=240, cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "busybox-static 1:" in r.stdout and "_arm64.deb" in r.stdout
    assert "same     aarch64 kernel" in r.stdout and "same     aarch64 initrd" in r.stdout
    assert "rebuilds bit for bit (aarch64;" in r.stdout
