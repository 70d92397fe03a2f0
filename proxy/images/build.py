"""Build the x86_64 microVM of an image: Debian's cloud kernel + a reproducible initramfs.

Why this shape: the smallest thing that boots under QEMU/libvirt and serves HTTP is a
stock virtio kernel (linux-image-cloud-amd64) and an initramfs whose PID 1 is a shell
script that loads the virtio network modules and then *becomes* busybox httpd. No disk,
no init system, no package manager inside the guest.

Reproducibility: same inputs must give the same digests, or pinning by digest is
meaningless. So the newc cpio archive is written here byte by byte: entries in sorted
order, uid/gid 0, modes 0755/0644, every mtime SOURCE_DATE_EPOCH (0 unless the builder
is given one; it is recorded), inode numbers assigned in order; gzip with mtime 0 and no
file name. `build_site_initramfs` is the reusable part (any directory served as /site).

`assemble` is the one function that turns inputs (a kernel tree, busybox, a site, the
guest port, the epoch) into artefacts: `build_image` feeds it what is installed now,
`rebuild.py` what a manifest recorded, so a rebuild runs exactly the build's code.
`BUILDER` names the archive layout; it changes whenever `assemble` would produce other
bytes from the same inputs, and a rebuild refuses a manifest built by another.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.metadata
import lzma
import os
import re
import shutil
import subprocess
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from ..errors import ImageError
from .manifest import BUILD_DIR, content_digest, manifest_digest, read_manifest, write_built_manifest

# Load order matters: each module needs the ones before it (see modules.dep).
VIRTIO_NET_MODULES = (
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "failover",
    "net_failover",
    "virtio_net",
)
BUSYBOX = Path("/bin/busybox")
KERNEL_GLOB = "vmlinuz-*-cloud-amd64"
CMDLINE = "console=ttyS0 quiet panic=-1"
MEMORY_MIB = 128

S_IFDIR, S_IFREG, S_IFCHR = 0o040000, 0o100000, 0o020000


@dataclass(frozen=True)
class Entry:
    """One file, directory or device node of the initramfs (path without leading /)."""

    path: str
    mode: int  # including the S_IF* type bits
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


@dataclass(frozen=True)
class Kernel:
    release: str  # e.g. 6.1.0-56-cloud-amd64
    vmlinuz: Path
    modules: Path  # /lib/modules/<release>


def pack_newc(entries: Iterable[Entry], mtime: int = 0) -> bytes:
    """A newc ("070701") cpio archive with every field that could vary fixed (mtime: the epoch)."""
    out = bytearray()
    by_path = {e.path.strip("/"): e for e in entries}
    for path in list(by_path):  # add missing parent directories
        parts = path.split("/")
        for i in range(1, len(parts)):
            by_path.setdefault("/".join(parts[:i]), Entry("/".join(parts[:i]), S_IFDIR | 0o755))
    ino = 0
    for path in sorted(by_path):
        e = by_path[path]
        ino += 1
        _newc_record(out, path, e.mode, e.data, ino, 2 if e.mode & S_IFDIR == S_IFDIR else 1, e.rdev, mtime)
    _newc_record(out, "TRAILER!!!", 0, b"", 0, 1, (0, 0), 0)
    return bytes(out)


def _newc_record(out: bytearray, name: str, mode: int, data: bytes, ino: int, nlink: int, rdev: tuple[int, int],
                 mtime: int) -> None:
    raw_name = name.encode() + b"\0"
    fields = (ino, mode, 0, 0, nlink, mtime, len(data), 0, 0, rdev[0], rdev[1], len(raw_name), 0)
    out += b"070701" + b"".join(b"%08X" % f for f in fields) + raw_name
    out += b"\0" * (-len(out) % 4)
    out += data
    out += b"\0" * (-len(out) % 4)


def write_initramfs(out: Path, entries: Iterable[Entry], mtime: int = 0) -> str:
    """Pack, gzip (mtime 0) and atomically write; return the sha256 hex of the file."""
    return _write_initramfs(out, entries, mtime)[0]


def _write_initramfs(out: Path, entries: Iterable[Entry], mtime: int) -> tuple[str, str]:
    """(sha256 of the .cpio.gz, sha256 of the cpio inside): the second tells, when a
    rebuild differs, whether the archive or only its compression did."""
    cpio = pack_newc(entries, mtime)
    blob = gzip_bytes(cpio)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp.write_bytes(blob)
    os.replace(tmp, out)
    return hashlib.sha256(blob).hexdigest(), hashlib.sha256(cpio).hexdigest()


def gzip_bytes(data: bytes) -> bytes:
    """gzip with no file name, mtime 0, level 9: the bytes depend on `data` and zlib only."""
    return gzip.compress(data, compresslevel=9, mtime=0)


def tree_entries(src: Path, prefix: str) -> list[Entry]:
    """Regular files of `src` under `prefix`, world-readable (httpd runs as root, but be plain)."""
    entries = [Entry(prefix, S_IFDIR | 0o755)]
    for p in sorted(src.rglob("*")):
        rel = f"{prefix}/{p.relative_to(src).as_posix()}"
        if p.is_dir():
            entries.append(Entry(rel, S_IFDIR | 0o755))
        elif p.is_file():
            entries.append(Entry(rel, S_IFREG | 0o644, p.read_bytes()))
    return entries


def init_script(guest_port: int, modules: Iterable[str]) -> str:
    """PID 1: mount, load virtio-net, configure QEMU user networking, exec httpd."""
    mods = " ".join(modules)
    return f"""#!/bin/busybox sh
# PID 1 of a summon microVM. If httpd ever exits, the kernel panics (panic=-1 reboots,
# libvirt's on_reboot=destroy removes the domain) and the proxy sees the instance die.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in {mods}; do
  [ -f /lib/modules/$m.ko ] && insmod /lib/modules/$m.ko
done
i=0
while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 100 ]; do sleep 0.05; i=$((i+1)); done
ip link set lo up
ip addr add 10.0.2.15/24 dev eth0
ip link set eth0 up
ip route add default via 10.0.2.2
echo "summon: httpd on :{guest_port}"
exec httpd -f -p {guest_port} -h /site
"""


def module_files(kernel: Kernel, names: Iterable[str] = VIRTIO_NET_MODULES) -> list[tuple[str, bytes]]:
    """(name, uncompressed .ko bytes) for each module, found through modules.dep."""
    dep = kernel.modules / "modules.dep"
    try:
        lines = dep.read_text().splitlines()
    except OSError as exc:
        raise ImageError(f"cannot read {dep}: is the kernel {kernel.release} installed? ({exc})") from exc
    where: dict[str, str] = {}
    for line in lines:
        rel = line.split(":", 1)[0]
        m = re.match(r"(.*/)?([^/]+)\.ko(\.xz|\.zst|\.gz)?$", rel)
        if m:
            where[m.group(2).replace("-", "_")] = rel
    out = []
    for name in names:
        if name not in where:
            raise ImageError(f"kernel module {name} not found in {dep}")
        raw = (kernel.modules / where[name]).read_bytes()
        if where[name].endswith(".xz"):
            raw = lzma.decompress(raw)
        elif where[name].endswith(".gz"):
            raw = gzip.decompress(raw)
        elif where[name].endswith(".zst"):
            raw = subprocess.run(["zstd", "-dc", str(kernel.modules / where[name])], capture_output=True, check=True).stdout
        out.append((name, raw))
    return out


def vm_entries(site: Path, kernel: Kernel | None, guest_port: int = 80, busybox: Path = BUSYBOX) -> list[Entry]:
    """Everything in the microVM's root: busybox, /init, modules (if a kernel), /site."""
    try:
        bb = busybox.read_bytes()
    except OSError as exc:
        raise ImageError(f"cannot read {busybox}: install busybox-static ({exc})") from exc
    mods = module_files(kernel) if kernel else []
    entries = [
        Entry("bin/busybox", S_IFREG | 0o755, bb),
        Entry("init", S_IFREG | 0o755, init_script(guest_port, [n for n, _ in mods]).encode()),
        Entry("dev/console", S_IFCHR | 0o600, rdev=(5, 1)),
        Entry("proc", S_IFDIR | 0o755),
        Entry("sys", S_IFDIR | 0o755),
        Entry("tmp", S_IFDIR | 0o1777),
        Entry("lib/modules", S_IFDIR | 0o755),
    ]
    entries += [Entry(f"lib/modules/{n}.ko", S_IFREG | 0o644, data) for n, data in mods]
    return entries + tree_entries(site, "site")


def build_site_initramfs(site: Path, out: Path, kernel: Kernel | None = None, guest_port: int = 80) -> str:
    """Reusable: an initramfs serving directory `site` as / on `guest_port`. Returns sha256 hex."""
    if not site.is_dir():
        raise ImageError(f"site directory {site} does not exist")
    return write_initramfs(out, vm_entries(site, kernel, guest_port))


def find_kernel(boot: Path = Path("/boot"), modules_root: Path = Path("/lib/modules")) -> Kernel:
    """The newest installed Debian cloud kernel (linux-image-cloud-amd64)."""
    found = sorted(boot.glob(KERNEL_GLOB), key=lambda p: [int(x) if x.isdigit() else x for x in re.split(r"[.-]", p.name)])
    if not found:
        raise ImageError(f"no {boot}/{KERNEL_GLOB}: install linux-image-cloud-amd64")
    release = found[-1].name.removeprefix("vmlinuz-")
    return Kernel(release, found[-1], modules_root / release)


def package_version(package: str) -> str:
    try:
        r = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return r.stdout.strip() if r.returncode == 0 and r.stdout.strip() else "unknown"


def summon_version() -> str:
    try:
        return importlib.metadata.version("summon")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


@dataclass(frozen=True)
class Inputs:
    """Everything `assemble` reads: with the same inputs it writes the same bytes."""

    kernel: Kernel
    busybox: Path
    site: Path
    guest_port: int = 80
    source_date_epoch: int = 0


@dataclass(frozen=True)
class Artefacts:
    kernel: Path
    kernel_sha256: str
    initrd: Path
    initrd_sha256: str
    initrd_cpio_sha256: str


def assemble(inputs: Inputs, out: Path) -> Artefacts:
    """Write out/vmlinuz and out/initrd.cpio.gz from `inputs`; return their digests."""
    if not inputs.site.is_dir():
        raise ImageError(f"site directory {inputs.site} does not exist")
    out.mkdir(parents=True, exist_ok=True)
    vmlinuz = out / "vmlinuz"
    tmp = out / ".vmlinuz.tmp"
    try:
        shutil.copyfile(inputs.kernel.vmlinuz, tmp)
    except OSError as exc:
        raise ImageError(f"cannot read the kernel {inputs.kernel.vmlinuz}: {exc.strerror or exc}") from exc
    os.replace(tmp, vmlinuz)
    kernel_sha = hashlib.sha256(vmlinuz.read_bytes()).hexdigest()
    initrd = out / "initrd.cpio.gz"
    entries = vm_entries(inputs.site, inputs.kernel, inputs.guest_port, inputs.busybox)
    initrd_sha, cpio_sha = _write_initramfs(initrd, entries, inputs.source_date_epoch)
    return Artefacts(vmlinuz, kernel_sha, initrd, initrd_sha, cpio_sha)


BUILDER = "summon-microvm/1"  # the layout `assemble` writes; bump when its bytes change
KERNEL_PACKAGE = "linux-image-{release}"  # the package holding vmlinuz and the modules
BUSYBOX_PACKAGE = "busybox-static"


def build_image(image_dir: Path, progress: Callable[[str], None], store: Path | None = None,
                source_date_epoch: int = 0, now: Callable[[], float] = time.time) -> str:
    """Build the microVM into the image store and record it in build/image.toml.

    The artefacts go into the store (`store`, default ``<images dir>/.store``) by digest;
    build/ holds hard links to the latest build's objects and its manifest, so an
    unpinned route follows the latest build and every earlier one stays in the store.
    The recipe image.toml is only read, so building leaves a checkout as it was. Returns
    the version (the built manifest's digest).
    """
    from .store import Build, Store, default_store, link_into

    t0 = time.monotonic()
    manifest = read_manifest(image_dir)
    recipe_digest = manifest_digest(manifest)
    unix = manifest.get("targets", {}).get("unix", {})
    site = image_dir / unix.get("content", "site")
    old_x86 = manifest.get("targets", {}).get("x86_64", {})
    guest_port = int(old_x86.get("guest_port", 80))
    memory = int(old_x86.get("memory_mib", MEMORY_MIB))
    cmdline = str(old_x86.get("cmdline", CMDLINE))
    st = Store(store if store is not None else default_store(image_dir.parent))

    st.put_artefacts(manifest, image_dir)  # the recipe's own (the site) must be as recorded before build/ changes
    kernel = find_kernel()
    progress(f"kernel {kernel.release} from {kernel.vmlinuz}")
    progress(f"packing initramfs: busybox, {len(VIRTIO_NET_MODULES)} virtio modules, site {site}")
    build = image_dir / BUILD_DIR
    staging = build / f".staging.{os.getpid()}"
    try:
        art = assemble(Inputs(kernel, BUSYBOX, site, guest_port, source_date_epoch), staging)
        for src, name in ((art.kernel, "vmlinuz"), (art.initrd, "initrd.cpio.gz")):
            link_into(st.object_path(st.put_file(src)), build / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    progress(f"wrote {build / 'vmlinuz'} sha256:{art.kernel_sha256[:16]}... and {build / 'initrd.cpio.gz'} "
             f"({(build / 'initrd.cpio.gz').stat().st_size // 1024} KiB) sha256:{art.initrd_sha256[:16]}...")

    targets = dict(manifest.get("targets", {}))
    targets["x86_64"] = {
        "kernel": f"{BUILD_DIR}/vmlinuz",
        "kernel_sha256": art.kernel_sha256,
        "initrd": f"{BUILD_DIR}/initrd.cpio.gz",
        "initrd_sha256": art.initrd_sha256,
        "cmdline": cmdline,
        "memory_mib": memory,
        "guest_port": guest_port,
    }
    packages = {p: package_version(p) for p in ("linux-image-cloud-amd64", KERNEL_PACKAGE.format(release=kernel.release),
                                                BUSYBOX_PACKAGE)}
    manifest["targets"] = targets
    manifest["build"] = {
        "packages": packages,
        "kernel_release": kernel.release,
        "modules": list(VIRTIO_NET_MODULES),
        "site_sha256": content_digest(site),
        "initrd_cpio_sha256": art.initrd_cpio_sha256,
        "source_date_epoch": source_date_epoch,
        "builder": BUILDER,
        "zlib": zlib.ZLIB_RUNTIME_VERSION,
        "built_with": f"summon {summon_version()}",
        "recipe_digest": recipe_digest,
    }
    version = st.put_version(manifest, image_dir)  # the site's files and the manifest itself
    written = write_built_manifest(image_dir, manifest)
    st.record(Build(manifest["name"], version, recipe_digest, now(), "build"))
    progress(f"wrote {written} (from recipe {recipe_digest[:19]}...) in {time.monotonic() - t0:.2f}s")
    progress(f"stored {manifest['name']}@{version} in {st.root}")
    return version
