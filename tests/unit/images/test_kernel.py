"""Unpacking a bzImage's ELF kernel for a PVH boot, on hand-made images."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import pytest

from proxy.errors import ImageError
from proxy.images.build import Inputs, Kernel, assemble
from proxy.images.kernel import XEN_ELFNOTE_PHYS32_ENTRY, extract_vmlinux, has_pvh_entry, payload


def elf(notes: list[tuple[bytes, int, bytes]]) -> bytes:
    """An ELF64 header, one PT_NOTE program header, then the notes."""
    body = b""
    for name, ntype, desc in notes:
        n = name + b"\0"
        body += struct.pack("<III", len(n), len(desc), ntype) + n.ljust((len(n) + 3) // 4 * 4, b"\0")
        body += desc.ljust((len(desc) + 3) // 4 * 4, b"\0")
    ehdr = bytearray(64)
    ehdr[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<Q", ehdr, 0x20, 64)  # e_phoff
    struct.pack_into("<HH", ehdr, 0x36, 56, 1)  # e_phentsize, e_phnum
    phdr = struct.pack("<IIQQQQQQ", 4, 0, 64 + 56, 0, 0, len(body), len(body), 4)
    return bytes(ehdr) + phdr + body


def bzimage(compressed: bytes, version: int = 0x20F) -> bytes:
    setup_sects = 1
    img = bytearray((setup_sects + 1) * 512)
    img[0x1F1] = setup_sects
    img[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", img, 0x206, version)
    struct.pack_into("<II", img, 0x248, 16, len(compressed))
    return bytes(img) + b"\0" * 16 + compressed + b"trailing"


PVH = elf([(b"Xen", 6, b"linux\0"), (b"Xen", XEN_ELFNOTE_PHYS32_ENTRY, struct.pack("<Q", 0x1000850))])


def test_the_elf_inside_a_gzip_bzimage_is_unpacked_when_it_has_a_pvh_entry() -> None:
    got, how = extract_vmlinux(bzimage(gzip.compress(PVH, mtime=0)))
    assert (got, how) == (PVH, "gzip")


def test_an_elf_without_the_note_is_refused() -> None:
    plain = elf([(b"Xen", 6, b"linux\0"), (b"GNU", 3, b"buildid")])
    assert not has_pvh_entry(plain) and has_pvh_entry(PVH)
    with pytest.raises(ImageError, match="no PVH entry"):
        extract_vmlinux(bzimage(gzip.compress(plain)))


def test_lz4_goes_through_the_tool_without_the_size_the_build_appends() -> None:
    seen = []

    class Done:
        stdout = PVH

    def run(argv: list[str], input: bytes, **_kw: object) -> Done:  # noqa: A002 - subprocess.run's name
        seen.append((argv[0], input))
        return Done()

    body = b"\x02\x21\x4c\x18" + b"frames" + struct.pack("<I", len(PVH))
    assert extract_vmlinux(bzimage(body), run=run) == (PVH, "lz4")  # type: ignore[arg-type]
    assert seen == [("lz4", b"\x02\x21\x4c\x18frames")]


def test_not_a_bzimage_or_unknown_compression() -> None:
    with pytest.raises(ImageError, match="not a bzImage"):
        payload(b"\0" * 4096)
    with pytest.raises(ImageError, match="2.08"):
        payload(bzimage(b"", version=0x206))
    with pytest.raises(ImageError, match="does not know"):
        payload(bzimage(b"BZh91AY"))


def fake_kernel(tmp: Path, image: bytes) -> Kernel:
    from proxy.images.build import VIRTIO_NET_MODULES

    mods = tmp / "modules"
    (mods / "kernel").mkdir(parents=True)
    (mods / "modules.dep").write_text("".join(f"kernel/{m}.ko:\n" for m in VIRTIO_NET_MODULES))
    for m in VIRTIO_NET_MODULES:
        (mods / "kernel" / f"{m}.ko").write_bytes(b"\x7fELF module " + m.encode())
    (tmp / "vmlinuz").write_bytes(image)
    return Kernel("6.1.0-test", tmp / "vmlinuz", mods)


def test_assemble_writes_the_pvh_elf_or_the_bzimage_as_asked(tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_text("hi")
    image = bzimage(gzip.compress(PVH, mtime=0))
    kernel = fake_kernel(tmp_path, image)
    pvh = assemble(Inputs(kernel, Path("/bin/busybox"), site, kernel_format="pvh"), tmp_path / "a")
    assert pvh.kernel.name == "vmlinux" and pvh.kernel.read_bytes() == PVH
    bz = assemble(Inputs(kernel, Path("/bin/busybox"), site, kernel_format="bzimage"), tmp_path / "b")
    assert bz.kernel.name == "vmlinuz" and bz.kernel.read_bytes() == image
    assert bz.initrd_sha256 == pvh.initrd_sha256  # the initramfs does not depend on the kernel's format
    with pytest.raises(ImageError, match="kernel_format 'elf'"):
        assemble(Inputs(kernel, Path("/bin/busybox"), site, kernel_format="elf"), tmp_path / "c")
