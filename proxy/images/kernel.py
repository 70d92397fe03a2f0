"""The kernel a microVM boots: Debian's bzImage as it is, or the ELF inside it (PVH).

Why PVH: a bzImage starts in real mode under SeaBIOS's linuxboot ROM, then its
decompressor unpacks the kernel proper (Debian's cloud kernel: 53 MB, LZ4) before the
kernel runs. Under TCG that decompression is paid in emulated instructions on every
boot. The ELF ``vmlinux`` inside the bzImage carries a PVH entry point (a Xen ELF note,
``XEN_ELFNOTE_PHYS32_ENTRY``, when the kernel has CONFIG_PVH): QEMU's ``-kernel`` loads
such an ELF straight into guest memory and enters it in 32-bit protected mode, so
neither the real-mode setup nor the decompressor runs.

`extract_vmlinux` finds the payload through the boot protocol header (``setup_sects``,
``payload_offset``, ``payload_length``), decompresses it (gzip and xz here, zstd and lz4
with their command-line tools, as the modules are) and refuses an ELF without the note.
The result depends only on the bzImage's bytes, so a rebuild gets the same digest.
"""

from __future__ import annotations

import gzip
import lzma
import struct
import subprocess
from collections.abc import Callable

from ..errors import ImageError

FORMATS = ("bzimage", "pvh")  # `[targets.x86_64] kernel_format`
XEN_ELFNOTE_PHYS32_ENTRY = 18
_MAGICS = (
    (b"\x1f\x8b", "gzip"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"\x02\x21\x4c\x18", "lz4"),  # the legacy frame the kernel's build writes
)
TOOLS = {"zstd": ["zstd", "-dc", "--memory=2048MB"], "lz4": ["lz4", "-dc"]}
TOOL_PACKAGES = {"zstd": "zstd", "lz4": "lz4"}

Run = Callable[..., "subprocess.CompletedProcess[bytes]"]


def payload(bzimage: bytes) -> tuple[str, bytes]:
    """(compression, compressed kernel) of a bzImage (boot protocol 2.08 or later)."""
    if len(bzimage) < 0x250 or bzimage[0x202:0x206] != b"HdrS":
        raise ImageError("the kernel is not a bzImage (no HdrS boot header)")
    version = struct.unpack_from("<H", bzimage, 0x206)[0]
    if version < 0x208:
        raise ImageError(f"the kernel's boot protocol {version >> 8}.{version & 0xff} has no payload fields (2.08+)")
    setup_sects = bzimage[0x1F1] or 4
    offset, length = struct.unpack_from("<II", bzimage, 0x248)
    start = (setup_sects + 1) * 512 + offset
    data = bzimage[start:start + length]
    for magic, name in _MAGICS:
        if data.startswith(magic):
            return name, data
    raise ImageError(f"the kernel's payload is compressed in a way summon does not know (starts {data[:6].hex()})")


def extract_vmlinux(bzimage: bytes, run: Run = subprocess.run) -> tuple[bytes, str]:
    """(the uncompressed ELF kernel, its compression); raises ImageError without a PVH entry."""
    how, data = payload(bzimage)
    if how != "gzip":
        data = data[:-4]  # the kernel's build appends the uncompressed size (scripts/Makefile.lib size_append)
    try:
        if how == "gzip":
            elf = gzip.decompress(data)
        elif how == "xz":
            elf = lzma.decompress(data)
        else:
            r = run(TOOLS[how], input=data, capture_output=True, check=True, timeout=120)
            elf = r.stdout
    except FileNotFoundError as exc:
        raise ImageError(f"the kernel is {how}-compressed: install {TOOL_PACKAGES[how]} to unpack it") from exc
    except (OSError, EOFError, lzma.LZMAError, subprocess.SubprocessError) as exc:
        raise ImageError(f"cannot decompress the kernel ({how}): {exc}") from exc
    if not has_pvh_entry(elf):
        raise ImageError("the kernel has no PVH entry point (CONFIG_PVH): boot it as a bzImage")
    return elf, how


def has_pvh_entry(elf: bytes) -> bool:
    """Is there a ``Xen`` note of type PHYS32_ENTRY in a PT_NOTE segment of this ELF64?"""
    if elf[:4] != b"\x7fELF" or len(elf) < 64 or elf[4] != 2 or elf[5] != 1:
        return False
    phoff, = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(phnum):
        base = phoff + i * phentsize
        if base + 56 > len(elf):
            return False
        p_type, _flags, p_offset, _va, _pa, p_filesz = struct.unpack_from("<IIQQQQ", elf, base)
        if p_type != 4:  # PT_NOTE
            continue
        pos, end = p_offset, min(p_offset + p_filesz, len(elf))
        while pos + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", elf, pos)
            name = elf[pos + 12:pos + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and ntype == XEN_ELFNOTE_PHYS32_ENTRY:
                return True
            pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False
