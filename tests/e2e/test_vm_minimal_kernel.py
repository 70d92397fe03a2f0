"""The minimal kernel for real: compiled from linux-source-6.1 (or taken from the cache a
previous build left), built into the decks image, and booted through `summon serve` to
a 200 from the VM, with the boot's phases; then `summon images verify` on that image.

A cold compile takes minutes here (2 cores shared: 3.2-4.6 min at load average 1.5-3.4);
the cache (``~/.cache/summon/kernels``, or ``$SUMMON_KERNEL_CACHE``) makes every later
run a copy. `make test` installs what the compile needs (scripts/setup.sh).
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.images import minimal
from proxy.images.build import package_version
from tests.e2e.test_vm_e2e import make_summon, ready_detail
from tests.helpers.paths import REPO
from tests.helpers.summon_proc import http_get
from tests.helpers.vm_images import MISSING, copy_decks, libvirt_up, vm_marks

_missing = [*MISSING, *minimal.missing_packages(package_version)]

pytestmark = vm_marks(1800, _missing)  # a cold compile on a loaded 2-core machine, then a TCG boot


@pytest.fixture(scope="module")
def minimal_images() -> Iterator[Path]:
    from proxy.images.build import build_image

    libvirt_up()
    root = copy_decks("summon-vm-minimal-")
    t0 = time.monotonic()
    build_image(root / "decks", print, kernel_source="minimal")
    print(f"build with the minimal kernel: {time.monotonic() - t0:.1f}s")
    yield root
    shutil.rmtree(root, ignore_errors=True)


def test_the_minimal_kernel_boots_the_demo_image_through_summon(tmp_path: Path, minimal_images: Path) -> None:
    from proxy.images.manifest import load_image

    image = load_image(minimal_images, "decks")
    b = image.manifest["build"]
    assert b["kernel_source"] == "minimal" and b["modules"] == []
    assert image.path("x86_64", "kernel").stat().st_size < 20 << 20  # the cloud kernel's ELF is 46 MiB
    verified = subprocess.run([str(REPO / ".venv" / "bin" / "summon"), "images", "verify", "decks", "--images-dir",
                               str(minimal_images)], capture_output=True, text=True, timeout=120)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "and the minimal kernel inputs" in verified.stdout
    index = (REPO / "images" / "decks" / "site" / "index.html").read_bytes()
    s = make_summon(tmp_path, minimal_images).start()
    try:
        status, _, body = http_get(s.port, "/", timeout=150)
        assert status == 200 and body == index, body[:300]
        phases = ready_detail(s.events)["phases"]
        print(f"phases: {phases}")
        # PID 1's marks come through the minimal kernel's console as through the cloud kernel's
        assert {"prepare", "qemu_up", "init", "network", "first_response"} <= set(phases)
    finally:
        s.stop(signal.SIGTERM)
