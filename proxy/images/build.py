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
from typing import Any

from ..errors import BuildSetupError, ImageError
from .kernel import FORMATS, TOOL_PACKAGES, extract_vmlinux, has_pvh_entry, payload
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
# The guest has one serial port, no PS/2 mouse or PnP devices, one PCI bus and a TSC it
# can trust (TCG), and nothing that needs the crypto self-tests at boot: so the kernel is
# told not to probe or test them. `quiet`: printing the boot log costs ~5% more QEMU CPU.
# Kept because it pays (median of 7 alternating boots under TCG, create to the first 200,
# wall / QEMU CPU: 2.98 / 2.69 s -> 2.53 / 2.24 s; with the PVH entry 2.39 / 2.26 s ->
# 2.17 / 1.97 s), nearly all of it in the kernel's own init.
CMDLINE = ("console=ttyS0 quiet panic=-1 8250.nr_uarts=1 i8042.noaux i8042.nopnp i8042.dumbkbd tsc=reliable"
           " no_timer_check noreplace-smp pci=lastbus=0 cryptomgr.notests")
MEMORY_MIB = 128
# The minimal kernel's defaults (see `minimal`), from boots under TCG here (medians of 5-7,
# round robin): the guest touches ~30 MiB whatever its size (128, 64, 48, 32 MiB: idle
# RSS 112 MiB each, boot 1.43-1.46 s), so 48 MiB costs nothing and counts 48, not 128, against
# a host's standby budget. TCG's translation buffer is left at QEMU's default: 16 MiB
# (`tb_cache_mib = 16`) took 17 MiB off the RSS and ~0.1 s off a boot (1.35 vs 1.45 s)
# but made a paused standby's resume 90 ms instead of 22 (the boot's translations are
# flushed, so the first request translates again); 8 MiB slowed boots (1.68 s, some 5 s).
# Same command line as the packaged kernel.
MINIMAL_MEMORY_MIB = 48
MINIMAL_CMDLINE = CMDLINE
MINIMAL_TB_CACHE_MIB = 0
KERNEL_FORMAT = "pvh"  # the default `kernel_format` (see `kernel`): no decompressor per boot
KERNEL_FILES = {"bzimage": "vmlinuz", "pvh": "vmlinux"}

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


def init_script(guest_port: int, modules: Iterable[str], builtin: bool = False) -> str:
    """PID 1: mount, load virtio-net, configure QEMU user networking, run httpd.

    `builtin`: the kernel has its drivers built in (the minimal kernel): no module loop.

    It marks its progress on the console (`proxy.backends.console` reads the marks): a
    line written to /dev/kmsg at level 2 passes ``quiet`` and carries the kernel's
    clock, so the marks and the kernel's own lines share one clock. ``init`` first,
    ``network`` once eth0 is configured, ``listening`` once httpd holds its socket (seen
    in /proc/net/tcp, read with shell builtins: no process per look). The kernel's
    hand-over line is copied from the ring buffer to the console in the background, as
    soon as PID 1 runs: after the server starts it could land after the first response,
    when the driver reads the console."""
    mods = " ".join(modules)
    port_hex = f"{guest_port:04X}"
    load = "" if builtin else f"""for m in {mods}; do
  [ -f /lib/modules/$m.ko ] && insmod /lib/modules/$m.ko
done
"""
    return f"""#!/bin/busybox sh
# PID 1 of a summon microVM. If httpd ever exits, so does this script: the kernel panics
# (panic=-1 reboots, libvirt's on_reboot=destroy removes the domain) and the proxy sees
# the instance die.
echo "<2>summon-mark: init" > /dev/kmsg
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
(dmesg | grep -m1 "Run /init as init process") &
{load}i=0
while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 100 ]; do sleep 0.05; i=$((i+1)); done
ip link set lo up
ip addr add 10.0.2.15/24 dev eth0
ip link set eth0 up
ip route add default via 10.0.2.2
echo "<2>summon-mark: network" > /dev/kmsg
httpd -f -p {guest_port} -h /site &
httpd=$!
listening() {{  # httpd listens on :: when the kernel has IPv6, else on 0.0.0.0
  for f in /proc/net/tcp6 /proc/net/tcp; do
    [ -e $f ] || continue
    while read -r _ local _ state _; do
      [ "$state" = 0A ] && [ "${{local##*:}}" = {port_hex} ] && return 0
    done < $f
  done
  return 1
}}
i=0
until listening || [ $i -ge 2000 ]; do sleep 0.002; i=$((i+1)); done
echo "<2>summon-mark: listening" > /dev/kmsg
wait $httpd
"""


def module_files(kernel: Kernel, names: Iterable[str] = VIRTIO_NET_MODULES) -> list[tuple[str, bytes]]:
    """(name, uncompressed .ko bytes) for each module, found through modules.dep."""
    dep = kernel.modules / "modules.dep"
    where = module_index(kernel)
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


def module_index(kernel: Kernel) -> dict[str, str]:
    """Module name -> path under /lib/modules/<release>, from modules.dep when the kernel is
    installed, else from the tree itself: a kernel unpacked from its .deb (a foreign
    architecture's) has no modules.dep, because depmod runs in the package's postinst."""
    dep = kernel.modules / "modules.dep"
    try:
        rels = [line.split(":", 1)[0] for line in dep.read_text().splitlines()]
    except FileNotFoundError:
        if not (kernel.modules / "kernel").is_dir():
            raise ImageError(f"cannot read {dep}: is the kernel {kernel.release} installed?") from None
        rels = sorted(p.relative_to(kernel.modules).as_posix() for p in (kernel.modules / "kernel").rglob("*.ko*"))
    except OSError as exc:
        raise ImageError(f"cannot read {dep}: is the kernel {kernel.release} installed? ({exc})") from exc
    where: dict[str, str] = {}
    for rel in rels:
        m = re.match(r"(.*/)?([^/]+)\.ko(\.xz|\.zst|\.gz)?$", rel)
        if m:
            where[m.group(2).replace("-", "_")] = rel
    return where


def module_depends(ko: bytes) -> list[str]:
    """The ``depends=`` of a module's .modinfo (what modprobe would load first)."""
    m = re.search(rb"(?:^|\0)depends=([^\0]*)\0", ko)
    return [d.replace("-", "_") for d in m.group(1).decode().split(",") if d] if m else []


def check_load_order(mods: list[tuple[str, bytes]]) -> None:
    """busybox insmod resolves nothing: each module's dependencies must come before it."""
    loaded: set[str] = set()
    for name, raw in mods:
        missing = [d for d in module_depends(raw) if d not in loaded]
        if missing:
            raise ImageError(f"kernel module {name} needs {', '.join(missing)} loaded before it")
        loaded.add(name)


def vm_entries(site: Path, kernel: Kernel | None, guest_port: int = 80, busybox: Path = BUSYBOX,
               modules: Iterable[str] = VIRTIO_NET_MODULES) -> list[Entry]:
    """Everything in the microVM's root: busybox, /init, modules (if a kernel), /site.

    No `modules` at all (the minimal kernel, drivers built in): no /lib/modules and an
    /init that loads nothing."""
    builtin = not tuple(modules)
    try:
        bb = busybox.read_bytes()
    except OSError as exc:
        raise ImageError(f"cannot read {busybox}: install busybox-static ({exc})") from exc
    mods = module_files(kernel, modules) if kernel and not builtin else []
    check_load_order(mods)
    entries = [
        Entry("bin/busybox", S_IFREG | 0o755, bb),
        Entry("init", S_IFREG | 0o755, init_script(guest_port, [n for n, _ in mods], builtin).encode()),
        Entry("dev/console", S_IFCHR | 0o600, rdev=(5, 1)),
        Entry("dev/kmsg", S_IFCHR | 0o644, rdev=(1, 11)),  # PID 1's first mark, before devtmpfs
        Entry("proc", S_IFDIR | 0o755),
        Entry("sys", S_IFDIR | 0o755),
        Entry("tmp", S_IFDIR | 0o1777),
    ]
    if not builtin:
        entries.append(Entry("lib/modules", S_IFDIR | 0o755))
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
    modules: tuple[str, ...] = VIRTIO_NET_MODULES
    kernel_format: str = KERNEL_FORMAT  # "pvh": the ELF inside the bzImage (see `kernel`)
    kernel_source: str = "packaged"  # "minimal": `kernel.vmlinuz` is the compiled ELF (see `minimal`)


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
    if inputs.kernel_format not in FORMATS:
        raise ImageError(f"kernel_format {inputs.kernel_format!r}: use one of {', '.join(FORMATS)}")
    if inputs.kernel_source == "minimal" and inputs.kernel_format != "pvh":
        raise ImageError("the minimal kernel is built as an ELF with a PVH entry: kernel_format must be \"pvh\"")
    out.mkdir(parents=True, exist_ok=True)
    vmlinuz = out / KERNEL_FILES[inputs.kernel_format]
    tmp = out / f".{vmlinuz.name}.tmp"
    try:
        if inputs.kernel_source == "minimal":
            elf = inputs.kernel.vmlinuz.read_bytes()
            if not has_pvh_entry(elf):
                raise ImageError(f"{inputs.kernel.vmlinuz} is not an ELF kernel with a PVH entry point")
            tmp.write_bytes(elf)
        elif inputs.kernel_format == "pvh":
            tmp.write_bytes(extract_vmlinux(inputs.kernel.vmlinuz.read_bytes())[0])
        else:
            shutil.copyfile(inputs.kernel.vmlinuz, tmp)
    except OSError as exc:
        raise ImageError(f"cannot read the kernel {inputs.kernel.vmlinuz}: {exc.strerror or exc}") from exc
    os.replace(tmp, vmlinuz)
    kernel_sha = hashlib.sha256(vmlinuz.read_bytes()).hexdigest()
    initrd = out / "initrd.cpio.gz"
    entries = vm_entries(inputs.site, inputs.kernel, inputs.guest_port, inputs.busybox, inputs.modules)
    initrd_sha, cpio_sha = _write_initramfs(initrd, entries, inputs.source_date_epoch)
    return Artefacts(vmlinuz, kernel_sha, initrd, initrd_sha, cpio_sha)


BUILDER = "summon-microvm/2"  # the layout `assemble` writes; bump when its bytes change
KERNEL_PACKAGE = "linux-image-{release}"  # the package holding vmlinuz and the modules
BUSYBOX_PACKAGE = "busybox-static"


@dataclass(frozen=True)
class Arch:
    """One guest architecture: its manifest target, Debian's name for it, what /init loads."""

    target: str  # the manifest's [targets.<target>] and a host's `arch`
    debian: str  # dpkg's architecture name
    modules: tuple[str, ...]  # in load order (checked against each module's depends=)
    cmdline: str
    build_dir: str  # under the image dir (x86_64 keeps build/ itself, as before arm64 existed)


# QEMU's `virt` machine has both virtio-mmio slots and a PCIe host bridge (built in:
# CONFIG_PCI_HOST_GENERIC); the NIC is virtio-net-pci as on x86, virtio_mmio is loaded too
# so the same initramfs also finds an mmio NIC. Its console is the PL011 UART, ttyAMA0.
AARCH64_MODULES = (
    "virtio_ring",
    "virtio",
    "virtio_mmio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "failover",
    "net_failover",
    "virtio_net",
)
ARCHES = {
    "x86_64": Arch("x86_64", "amd64", VIRTIO_NET_MODULES, CMDLINE, BUILD_DIR),
    "aarch64": Arch("aarch64", "arm64", AARCH64_MODULES, "console=ttyAMA0 quiet panic=-1", f"{BUILD_DIR}/aarch64"),
}


def native_arch() -> str:
    """The target this machine's own kernel and busybox are for."""
    return {"amd64": "x86_64", "x86_64": "x86_64", "arm64": "aarch64", "aarch64": "aarch64"}.get(os.uname().machine,
                                                                                                  os.uname().machine)


def parse_arches(value: str) -> list[str]:
    """`--arch`: x86_64, aarch64, a comma list of them, or all."""
    names = list(ARCHES) if value == "all" else [a.strip() for a in value.split(",") if a.strip()]
    bad = [a for a in names if a not in ARCHES]
    if bad or not names:
        raise ValueError(f"unknown arch {', '.join(bad) or value!r}: use {', '.join(ARCHES)} or all")
    return names


def _run(argv: list[str], cwd: Path | None = None, timeout: float = 300) -> str:
    try:
        r = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ImageError(f"{argv[0]} failed: {exc}") from exc
    if r.returncode != 0:
        raise ImageError(f"`{' '.join(argv)}` failed: {(r.stderr or r.stdout).strip()[-400:]}")
    return r.stdout


@dataclass(frozen=True)
class Foreign:
    """A foreign architecture's kernel and busybox, unpacked from Debian's packages."""

    kernel: Kernel
    busybox: Path
    packages: dict[str, str]  # package -> version


def fetch_foreign(arch: Arch, cache: Path, progress: Callable[[str], None]) -> Foreign:
    """`apt-get download` the cloud kernel and busybox-static of `arch` and `dpkg-deb -x` them.

    Multiarch only lets apt *see* the packages; nothing is installed (no root needed once
    the architecture is added, which scripts/setup-arm64.sh does for `make image-arm64` and
    `make test`: a build never changes dpkg's configuration). Each .deb is unpacked once,
    into a directory named by its file."""
    if arch.debian not in _run(["dpkg", "--print-foreign-architectures"]).split():
        raise ImageError(f"dpkg does not know the {arch.debian} architecture: run `make image-{arch.debian}` as root "
                         f"(dpkg --add-architecture {arch.debian} && apt-get update) first")
    meta = f"linux-image-cloud-{arch.debian}:{arch.debian}"
    deps = re.findall(rf"Depends: (linux-image-\S+-cloud-{arch.debian})", _run(["apt-cache", "depends", meta]))
    if not deps:
        raise ImageError(f"apt knows no {meta} (apt-get update?)")
    kernel_pkg = deps[0].split(":")[0]
    debs = cache / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    progress(f"apt-get download {kernel_pkg}:{arch.debian} {BUSYBOX_PACKAGE}:{arch.debian} into {debs}")
    for old in debs.glob("*.deb"):
        old.unlink()  # apt-get download names files by version: only this run's may be picked below
    _run(["apt-get", "download", f"{kernel_pkg}:{arch.debian}", f"{BUSYBOX_PACKAGE}:{arch.debian}"], cwd=debs)
    roots: dict[str, Path] = {}
    packages: dict[str, str] = {}
    for deb in sorted(debs.glob("*.deb")):
        pkg = _run(["dpkg-deb", "-f", str(deb), "Package"]).strip()
        packages[pkg] = _run(["dpkg-deb", "-f", str(deb), "Version"]).strip()
        root = cache / "roots" / deb.stem
        if not root.is_dir():
            tmp = root.with_name(f".{root.name}.{os.getpid()}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            _run(["dpkg-deb", "-x", str(deb), str(tmp)])
            os.replace(tmp, root)
        roots[pkg] = root
    if kernel_pkg not in roots or BUSYBOX_PACKAGE not in roots:
        raise ImageError(f"apt-get download did not fetch {kernel_pkg} and {BUSYBOX_PACKAGE} for {arch.debian}")
    release = kernel_pkg.removeprefix("linux-image-")
    kroot = roots[kernel_pkg]
    kernel = Kernel(release, kroot / "boot" / f"vmlinuz-{release}", kroot / "lib" / "modules" / release)
    return Foreign(kernel, roots[BUSYBOX_PACKAGE] / "bin" / "busybox", packages)


def build_image(image_dir: Path, progress: Callable[[str], None], store: Path | None = None,
                source_date_epoch: int = 0, now: Callable[[], float] = time.time,
                arches: Iterable[str] = ("x86_64",), packages_dir: Path | None = None,
                kernel_source: str | None = None, kernel_cache: Path | None = None) -> str:
    """Build the microVM of each of `arches` into the image store; record them in build/image.toml.

    The artefacts go into the store (`store`, default ``<images dir>/.store``) by digest;
    build/ holds hard links to the latest build's objects and its manifest, so an
    unpinned route follows the latest build and every earlier one stays in the store.
    The recipe image.toml is only read, so building leaves a checkout as it was. Returns
    the version (the built manifest's digest).

    The native arch's kernel and busybox are the installed ones; a foreign arch's come
    from Debian's packages (`fetch_foreign`, unpacked under `packages_dir`, default
    ``<images dir>/.packages``). Building some arches keeps the others' targets from the
    previous build of the same recipe, so `--arch aarch64` after a plain build gives an
    image with both.

    `kernel_source` (``--kernel``; else the recipe's ``[targets.x86_64] kernel_source``,
    else "packaged"): "minimal" compiles (or takes from `kernel_cache`) the kernel of
    `minimal`, x86_64 only, and its initramfs carries no modules.
    """
    from .store import Build, Store, default_store, link_into

    t0 = time.monotonic()
    manifest = read_manifest(image_dir)
    recipe_digest = manifest_digest(manifest)
    unix = manifest.get("targets", {}).get("unix", {})
    site = image_dir / unix.get("content", "site")
    st = Store(store if store is not None else default_store(image_dir.parent))
    wanted = list(dict.fromkeys(arches))
    st.put_artefacts(manifest, image_dir)  # the recipe's own (the site) must be as recorded before build/ changes
    targets = dict(manifest.get("targets", {}))
    build_table = _carried_over(image_dir, manifest, recipe_digest, wanted, targets)
    for name in wanted:
        arch = ARCHES[name]
        recipe_t = manifest.get("targets", {}).get(name, {})
        source = _kernel_source(image_dir, name, recipe_t, kernel_source)
        minimal = source == "minimal"
        guest_port = int(recipe_t.get("guest_port", 80))
        memory = int(recipe_t.get("memory_mib", MINIMAL_MEMORY_MIB if minimal else MEMORY_MIB))
        cmdline = str(recipe_t.get("cmdline", MINIMAL_CMDLINE if minimal else arch.cmdline))
        # the PVH entry is x86's; other arches boot the packaged file as it is
        kernel_format = str(recipe_t.get("kernel_format", KERNEL_FORMAT if name == "x86_64" else "bzimage"))
        modules: tuple[str, ...] = () if minimal else arch.modules
        minimal_record: dict[str, Any] | None = None
        if minimal:
            from . import minimal as mk

            try:
                wanted_inputs = mk.inputs_here(package_version)
            except BuildSetupError as exc:
                if kernel_source is not None:  # asked for with --kernel
                    raise
                from ..config import key_line  # asked for by the recipe: say where

                recipe = image_dir / "image.toml"
                line = key_line(recipe, f"targets.{name}", key="kernel_source")
                raise BuildSetupError(f"{recipe}:{line}: [targets.{name}] kernel_source = \"minimal\": {exc}") from exc
            built = mk.obtain(wanted_inputs, progress, cache=kernel_cache)
            kernel, busybox = Kernel(built.release, built.vmlinux, Path("/nonexistent")), BUSYBOX
            minimal_record = built.record()
            packages = {mk.SOURCE_PACKAGE: built.inputs.linux_source, BUSYBOX_PACKAGE: package_version(BUSYBOX_PACKAGE),
                        **{p: package_version(p) for p in ("gcc", "binutils", "libelf-dev")}}
        elif name == native_arch():
            kernel, busybox = find_kernel(), BUSYBOX
            wanted_pkgs = [f"linux-image-cloud-{arch.debian}", KERNEL_PACKAGE.format(release=kernel.release),
                           BUSYBOX_PACKAGE]
            if kernel_format == "pvh":  # the tool that unpacked the kernel is an input too
                how = payload(kernel.vmlinuz.read_bytes())[0]
                wanted_pkgs += [TOOL_PACKAGES[how]] if how in TOOL_PACKAGES else []
            packages = {p: package_version(p) for p in wanted_pkgs}
        else:
            foreign = fetch_foreign(arch, packages_dir or image_dir.parent / ".packages" / arch.debian, progress)
            kernel, busybox, packages = foreign.kernel, foreign.busybox, foreign.packages
        progress(f"[{name}] kernel {kernel.release} from {kernel.vmlinuz}")
        progress(f"[{name}] packing initramfs: busybox, "
                 f"{f'{len(modules)} virtio modules' if modules else 'no modules (built in)'}, site {site}")
        out = image_dir / arch.build_dir
        staging = image_dir / BUILD_DIR / f".staging.{os.getpid()}"
        try:
            art = assemble(Inputs(kernel, busybox, site, guest_port, source_date_epoch, modules, kernel_format,
                                  source), staging)
            for src, fname in ((art.kernel, art.kernel.name), (art.initrd, "initrd.cpio.gz")):
                out.mkdir(parents=True, exist_ok=True)
                link_into(st.object_path(st.put_file(src)), out / fname)
            for other in set(KERNEL_FILES.values()) - {art.kernel.name}:
                (out / other).unlink(missing_ok=True)  # the other format's, from an earlier build
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        progress(f"[{name}] wrote {out / art.kernel.name} sha256:{art.kernel_sha256[:16]}... and {out / 'initrd.cpio.gz'} "
                 f"({(out / 'initrd.cpio.gz').stat().st_size // 1024} KiB) sha256:{art.initrd_sha256[:16]}...")
        targets[name] = {
            "kernel": f"{arch.build_dir}/{art.kernel.name}",
            "kernel_sha256": art.kernel_sha256,
            "kernel_format": kernel_format,
            "initrd": f"{arch.build_dir}/initrd.cpio.gz",
            "initrd_sha256": art.initrd_sha256,
            "cmdline": cmdline,
            "memory_mib": memory,
            "guest_port": guest_port,
        }
        tb_cache = int(recipe_t.get("tb_cache_mib", MINIMAL_TB_CACHE_MIB if minimal else 0))
        if tb_cache:  # TCG's translation buffer (QEMU's tb-size); absent: QEMU's default
            targets[name]["tb_cache_mib"] = tb_cache
        recorded = {
            "packages": packages,
            "kernel_release": kernel.release,
            "kernel_format": kernel_format,
            "modules": list(modules),
            "initrd_cpio_sha256": art.initrd_cpio_sha256,
        }
        if minimal_record is not None:  # only then: a packaged build's manifest keeps its shape
            recorded["kernel_source"] = source
            recorded["minimal_kernel"] = minimal_record
        if name == "x86_64":  # at the top of [build], where rebuild.py reads it
            build_table.update(recorded)
        else:
            build_table[name] = recorded
    manifest["targets"] = targets
    build_table.update({
        "site_sha256": content_digest(site),
        "source_date_epoch": source_date_epoch,
        "builder": BUILDER,
        "zlib": zlib.ZLIB_RUNTIME_VERSION,
        "built_with": f"summon {summon_version()}",
        "recipe_digest": recipe_digest,
    })
    manifest["build"] = build_table
    version = st.put_version(manifest, image_dir)  # the site's files and the manifest itself
    written = write_built_manifest(image_dir, manifest)
    st.record(Build(manifest["name"], version, recipe_digest, now(), "build"))
    progress(f"wrote {written} (from recipe {recipe_digest[:19]}...) in {time.monotonic() - t0:.2f}s")
    progress(f"stored {manifest['name']}@{version} in {st.root}")
    return version


_X86_BUILD_KEYS = ("packages", "kernel_release", "modules", "initrd_cpio_sha256", "kernel_format", "kernel_source",
                   "minimal_kernel")


def _kernel_source(image_dir: Path, target: str, recipe_t: dict[str, Any], override: str | None) -> str:
    """The kernel to build, packaged or minimal: `--kernel`, else the recipe's key (a bad value names its line)."""
    from ..config import key_line
    from . import minimal as mk

    recipe = image_dir / "image.toml"
    value = override if override is not None else recipe_t.get("kernel_source", "packaged")
    if value not in mk.SOURCES:
        if override is not None:
            raise BuildSetupError(f"--kernel {value!r}: use {' or '.join(mk.SOURCES)}")
        line = key_line(recipe, f"targets.{target}", key="kernel_source")
        raise BuildSetupError(f"{recipe}:{line}: [targets.{target}] kernel_source = {value!r}: use "
                              f"{' or '.join(repr(s) for s in mk.SOURCES)}")
    if value == "minimal" and target != "x86_64":
        if override is not None:
            raise BuildSetupError(f"--kernel minimal is built for x86_64 only, not {target}")
        line = key_line(recipe, f"targets.{target}", key="kernel_source")
        raise BuildSetupError(f"{recipe}:{line}: [targets.{target}] kernel_source = \"minimal\": the minimal "
                              f"kernel is built for x86_64 only")
    return str(value)


def _carried_over(image_dir: Path, recipe: dict[str, Any], recipe_digest: str, wanted: list[str],
                  targets: dict[str, Any]) -> dict[str, Any]:
    """The previous build's microVM targets not rebuilt now (into `targets`) and what [build]
    recorded of them; nothing when that build was of another recipe or another site."""
    from .manifest import built_manifest_file, read_manifest_file

    try:
        old = read_manifest_file(built_manifest_file(image_dir))
    except (ImageError, OSError):
        return {}
    old_build = old.get("build")
    site = image_dir / recipe.get("targets", {}).get("unix", {}).get("content", "site")
    if (not isinstance(old_build, dict) or old_build.get("recipe_digest") != recipe_digest
            or old_build.get("site_sha256") != (content_digest(site) if site.is_dir() else None)):
        return {}
    kept: dict[str, Any] = {}
    for name in ARCHES:
        table = old.get("targets", {}).get(name)
        if name in wanted or not isinstance(table, dict):
            continue
        targets[name] = table
        if name == "x86_64":
            kept.update({k: old_build[k] for k in _X86_BUILD_KEYS if k in old_build})
        elif isinstance(old_build.get(name), dict):
            kept[name] = old_build[name]
    return kept
