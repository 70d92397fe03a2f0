"""The per-arch parts of the microVM builder that need no Debian mirror: --arch parsing,
the module load order, a kernel tree without modules.dep, and that building one arch
keeps the other's target from the previous build of the same recipe."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from proxy.errors import ImageError
from proxy.images.build import (
    AARCH64_MODULES,
    Kernel,
    check_load_order,
    module_depends,
    module_index,
    parse_arches,
)
from proxy.images.manifest import load_image, read_manifest_file, write_manifest
from tests.helpers.paths import REPO


def ko(depends: str) -> bytes:
    """Enough of a module for its .modinfo: NUL-separated key=value strings."""
    return b"\x7fELF...\0license=GPL\0depends=" + depends.encode() + b"\0vermagic=6.1\0"


def test_parse_arches() -> None:
    assert parse_arches("all") == ["x86_64", "aarch64"]
    assert parse_arches("aarch64") == ["aarch64"]
    assert parse_arches("x86_64, aarch64") == ["x86_64", "aarch64"]
    with pytest.raises(ValueError, match="unknown arch 'arm64'"):
        parse_arches("arm64")


def test_load_order_follows_each_modules_depends() -> None:
    assert module_depends(ko("virtio,virtio_ring")) == ["virtio", "virtio_ring"]
    assert module_depends(ko("")) == []
    check_load_order([("virtio_ring", ko("")), ("virtio", ko("")), ("virtio_mmio", ko("virtio,virtio_ring"))])
    with pytest.raises(ImageError, match="virtio_net needs net_failover loaded before it"):
        check_load_order([("virtio", ko("")), ("virtio_ring", ko("")), ("virtio_net", ko("net_failover,virtio"))])


def test_a_kernel_tree_from_a_deb_has_no_modules_dep_and_is_indexed_by_walking(tmp_path: Path) -> None:
    mods = tmp_path / "lib" / "modules" / "6.1.0-1-cloud-arm64"
    for rel in ("kernel/drivers/virtio/virtio_mmio.ko", "kernel/drivers/net/virtio_net.ko", "kernel/net/x/a-b.ko.xz"):
        (mods / rel).parent.mkdir(parents=True, exist_ok=True)
        (mods / rel).write_bytes(b"")
    where = module_index(Kernel("6.1.0-1-cloud-arm64", tmp_path / "vmlinuz", mods))
    assert where["virtio_mmio"] == "kernel/drivers/virtio/virtio_mmio.ko" and where["a_b"] == "kernel/net/x/a-b.ko.xz"
    with pytest.raises(ImageError, match="is the kernel"):
        module_index(Kernel("nope", tmp_path / "vmlinuz", tmp_path / "none"))
    assert "virtio_mmio" in AARCH64_MODULES and AARCH64_MODULES.index("virtio") < AARCH64_MODULES.index("virtio_mmio")


@pytest.mark.skipif(not list(Path("/boot").glob("vmlinuz-*-cloud-amd64")), reason="linux-image-cloud-amd64 not installed")
def test_building_x86_keeps_the_aarch64_target_of_the_previous_build(tmp_path: Path) -> None:
    from proxy.images.build import build_image

    images = tmp_path / "images"
    shutil.copytree(REPO / "images" / "decks", images / "decks", ignore=shutil.ignore_patterns("build"))
    build_image(images / "decks", lambda _line: None)
    built = images / "decks" / "build" / "image.toml"
    manifest = read_manifest_file(built)
    arm = images / "decks" / "build" / "aarch64"  # what an aarch64 build would have left
    arm.mkdir()
    (arm / "vmlinuz").write_bytes(b"arm64 Image")
    (arm / "initrd.cpio.gz").write_bytes(b"arm64 initrd")
    manifest["targets"]["aarch64"] = {
        "kernel": "build/aarch64/vmlinuz", "kernel_sha256": hashlib.sha256(b"arm64 Image").hexdigest(),
        "initrd": "build/aarch64/initrd.cpio.gz", "initrd_sha256": hashlib.sha256(b"arm64 initrd").hexdigest(),
        "cmdline": "console=ttyAMA0", "memory_mib": 128, "guest_port": 80,
    }
    manifest["build"]["aarch64"] = {"kernel_release": "6.1.0-1-cloud-arm64"}
    write_manifest(images / "decks" / "build", manifest)
    build_image(images / "decks", lambda _line: None, arches=("x86_64",))
    image = load_image(images, "decks")
    assert image.targets() == ["aarch64", "unix", "x86_64"]
    image.verify("aarch64")
    assert image.manifest["build"]["aarch64"] == {"kernel_release": "6.1.0-1-cloud-arm64"}
    assert image.manifest["build"]["kernel_release"].endswith("-cloud-amd64")
