"""Rebuild an image version from its manifest alone, bit for bit, or say why it cannot.

Why: the manifest is the artefact; the built kernel and initramfs are a cache of it. A
node that never built the image (a fresh clone, a security-minded user reading the
manifest first) recreates them from what `[build]` recorded and gets the same digests,
or is told exactly which input differs. Nothing is substituted silently.

What a manifest records and where each input comes from:

- the kernel and its modules: ``linux-image-<kernel_release>`` at the recorded version,
  the installed files when dpkg has that version, else the .deb of that version fetched
  with ``apt-get download`` and unpacked with ``dpkg-deb -x`` (no root, nothing installed);
- busybox: ``busybox-static`` at the recorded version, the same way;
- the site: the image dir's site when its content digest is the recorded one, else the
  tree the image store kept;
- the layout: `build.BUILDER` must be the recorded builder; the cpio mtimes are the
  recorded ``source_date_epoch``; guest_port from ``[targets.<arch>]``.

Each microVM target is rebuilt on its own (`target`): x86_64's record is at the top of
``[build]``, another arch's in ``[build].<arch>`` (aarch64: its arm64 packages, which are
always fetched as ``PACKAGE:arm64`` .debs and unpacked, never taken from this machine's own
installed ones, even at the same version).

A recorded package version that apt can no longer supply is reported with the version
that would be used instead (`Unavailable`); the rebuild refuses unless the caller allows
substitutes, and then the digests say what that changed.
"""

from __future__ import annotations

import gzip
import hashlib
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ImageError
from . import build as ib
from .manifest import content_digest
from .store import Store


@dataclass(frozen=True)
class Unavailable:
    """A recorded package version that cannot be had; `instead` is what would be used."""

    package: str
    recorded: str
    instead: str | None  # None: no version at all

    def __str__(self) -> str:
        alt = f"would use {self.instead} instead" if self.instead else "no version of it is available"
        return f"{self.package} {self.recorded} is recorded but can no longer be installed; {alt}"


@dataclass
class Outcome:
    """What a rebuild found: one line per artefact, and the differences (empty: identical)."""

    lines: list[str] = field(default_factory=list)
    differences: list[str] = field(default_factory=list)
    unavailable: list[Unavailable] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)  # inputs that cannot be had at all
    artefacts: ib.Artefacts | None = None

    @property
    def identical(self) -> bool:
        return not self.differences and not self.unavailable and not self.refused


# --- packages ---------------------------------------------------------------------------

Run = Callable[[list[str], Path | None], subprocess.CompletedProcess[str]]


def _run(argv: list[str], cwd: Path | None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return subprocess.CompletedProcess(argv, 127, "", str(exc))


def apt_versions(package: str, run: Run = _run) -> list[str]:
    """Versions apt can fetch, newest first (from `apt-cache madison`)."""
    r = run(["apt-cache", "madison", package], None)
    if r.returncode != 0:
        return []
    out: list[str] = []
    for line in r.stdout.splitlines():
        parts = [p.strip() for p in line.split("|")]
        if len(parts) >= 2 and parts[0] == package and parts[1] not in out:
            out.append(parts[1])
    return out


@dataclass
class Packages:
    """Where each package's files come from: `/` when installed at the recorded version,
    else a directory the .deb was unpacked into."""

    workdir: Path
    allow_substitutes: bool = False
    run: Run = _run
    installed: Callable[[str], str] = ib.package_version
    notes: list[str] = field(default_factory=list)
    foreign: str | None = None  # dpkg's name of a foreign arch (arm64): only its .debs will do

    def root(self, package: str, version: str, out: Outcome) -> Path | None:
        have = "unknown" if self.foreign else self.installed(package)
        if have == version:
            self.notes.append(f"{package} {version}: installed")
            return Path("/")
        available = apt_versions(self._apt(package), self.run)
        use = version if version in available else None
        if use is None:
            instead = have if have != "unknown" else (available[0] if available else None)
            out.unavailable.append(Unavailable(self._apt(package), version, instead))
            if not self.allow_substitutes or instead is None:
                return None
            self.notes.append(f"{self._apt(package)}: SUBSTITUTED {instead} for the recorded {version}")
            if instead == have:
                return Path("/")
            use = instead
        return self._unpack(package, use)

    def _apt(self, package: str) -> str:
        return f"{package}:{self.foreign}" if self.foreign else package

    def _unpack(self, package: str, version: str) -> Path | None:
        dl = self.workdir / "debs" / (self.foreign or "native")
        dl.mkdir(parents=True, exist_ok=True)
        r = self.run(["apt-get", "download", f"{self._apt(package)}={version}"], dl)
        debs = sorted(dl.glob(f"{package}_*.deb"))
        if r.returncode != 0 or not debs:
            raise ImageError(f"apt-get download {self._apt(package)}={version} failed: {(r.stderr or r.stdout).strip()[-300:]}")
        root = self.workdir / "roots" / f"{package}_{version}_{self.foreign or 'native'}".replace(":", "%3a")
        root.mkdir(parents=True, exist_ok=True)
        x = self.run(["dpkg-deb", "-x", str(debs[-1]), str(root)], None)
        if x.returncode != 0:
            raise ImageError(f"dpkg-deb -x {debs[-1]} failed: {x.stderr.strip()[-300:]}")
        self.notes.append(f"{package} {version}: unpacked from {debs[-1].name}")
        return root


# --- the rebuild ------------------------------------------------------------------------


def rebuild(manifest: dict[str, Any], image_dir: Path, store: Store, out_dir: Path,
            allow_substitutes: bool = False, run: Run = _run,
            installed: Callable[[str], str] = ib.package_version, target: str = "x86_64",
            progress: Callable[[str], None] = lambda _line: None,
            compile_kernel: Callable[..., Any] | None = None) -> Outcome:
    """Recreate the artefacts of microVM target `target` (x86_64, aarch64) that `manifest`
    records into `out_dir`; compare digests. A minimal kernel is compiled again
    (`compile_kernel`, default `minimal.obtain` without its cache): minutes."""
    out = Outcome()
    b = manifest.get("build")
    t = manifest.get("targets", {}).get(target)
    arch = ib.ARCHES.get(target)
    if arch is None:
        raise ImageError(f"{target!r} is not a microVM target (use {', '.join(ib.ARCHES)})")
    rec = b if target == "x86_64" else (b.get(target) if isinstance(b, dict) else None)
    if not isinstance(b, dict) or not isinstance(t, dict) or not isinstance(rec, dict):
        where = "[build]" if target == "x86_64" else f"[build].{target}"
        raise ImageError(f"image {manifest.get('name')!r}: the manifest has no {where} and [targets.{target}] "
                         f"(it was never built for {target}: `summon images build --arch {target}` first)")
    builder = str(b.get("builder", ib.BUILDER))  # manifests before `builder` was recorded used layout 1
    if builder != ib.BUILDER:
        out.refused.append(f"built by {builder}; this summon builds {ib.BUILDER} (use a summon of that version)")
    now_with = f"summon {ib.summon_version()}"
    if b.get("built_with") and b["built_with"] != now_with:
        out.lines.append(f"note: built with {b['built_with']}, rebuilding with {now_with} (both {builder})")
    release = str(rec.get("kernel_release", ""))
    packages = rec.get("packages", {}) if isinstance(rec.get("packages"), dict) else {}
    if target == "x86_64" and rec.get("kernel_source") == "minimal":
        return _rebuild_minimal(manifest, rec, t, image_dir, store, out_dir, out, allow_substitutes, run, installed,
                                progress, compile_kernel)
    kpkg, bpkg = ib.KERNEL_PACKAGE.format(release=release), ib.BUSYBOX_PACKAGE
    for p in (kpkg, bpkg):
        if p not in packages:
            out.refused.append(f"[build]{'' if target == 'x86_64' else '.' + target}.packages does not record {p}")
    modules = rec.get("modules")
    if modules is not None and list(modules) != list(arch.modules):
        out.refused.append(f"[build].modules of {target} is {modules}; this builder loads {list(arch.modules)}")
    site = _site(manifest, image_dir, store, out_dir / "site-from-store", out)
    if out.refused:
        return out
    foreign = None if target == ib.native_arch() else arch.debian
    pk = Packages(out_dir / "packages", allow_substitutes, run, installed, foreign=foreign)
    kroot = pk.root(kpkg, str(packages[kpkg]), out)
    broot = pk.root(bpkg, str(packages[bpkg]), out)
    out.lines += pk.notes
    if kroot is None or broot is None or site is None:
        return out
    kernel = ib.Kernel(release, kroot / "boot" / f"vmlinuz-{release}", kroot / "lib" / "modules" / release)
    inputs = ib.Inputs(kernel, broot / "bin" / "busybox", site, int(t.get("guest_port", 80)),
                       int(b.get("source_date_epoch", 0)), modules=arch.modules,
                       kernel_format=str(rec.get("kernel_format", "bzimage")))
    art = out.artefacts = ib.assemble(inputs, out_dir / "artefacts" / target)
    tag = "" if target == "x86_64" else f"{target} "
    _compare(out, f"{tag}kernel", str(t.get("kernel_sha256")), art.kernel_sha256)
    _compare(out, f"{tag}initrd", str(t.get("initrd_sha256")), art.initrd_sha256)
    if "initrd_cpio_sha256" in rec:
        _compare(out, f"{tag}initrd (the cpio inside the gzip)", str(rec["initrd_cpio_sha256"]), art.initrd_cpio_sha256)
    if art.initrd_sha256 != t.get("initrd_sha256"):
        old = _recorded_initrd(t, image_dir, store)
        if old is not None:
            out.differences += [f"  {d}" for d in diff_initrd(old, art.initrd.read_bytes())]
    return out


def _rebuild_minimal(manifest: dict[str, Any], rec: dict[str, Any], t: dict[str, Any], image_dir: Path, store: Store,
                     out_dir: Path, out: Outcome, allow_substitutes: bool, run: Run, installed: Callable[[str], str],
                     progress: Callable[[str], None], compile_kernel: Callable[..., Any] | None) -> Outcome:
    """x86_64 with the minimal kernel: the same source package, fragment and toolchain,
    compiled again from scratch (never from the cache), then the same `assemble`."""
    from . import minimal as mk

    raw = rec.get("minimal_kernel")
    record: dict[str, Any] = raw if isinstance(raw, dict) else {}
    packages = rec.get("packages", {}) if isinstance(rec.get("packages"), dict) else {}
    for p in (mk.SOURCE_PACKAGE, ib.BUSYBOX_PACKAGE):
        if p not in packages:
            out.refused.append(f"[build].packages does not record {p}")
    if list(rec.get("modules") or []):
        out.refused.append(f"[build].modules is {rec['modules']}; the minimal kernel loads none")
    need = ("config_fragment_sha256", "config_sha256", "gcc", "binutils", "builder")
    if absent := [k for k in need if not record.get(k)]:
        out.refused.append(f"[build].minimal_kernel does not record {', '.join(absent)}")
    if out.refused:
        return out
    if record["builder"] != mk.KERNEL_BUILDER:
        out.refused.append(f"the kernel was compiled by {record['builder']}; this summon compiles "
                           f"{mk.KERNEL_BUILDER} (use a summon of that version)")
    try:
        frag = mk.FRAGMENT.read_bytes()
    except OSError as exc:
        frag = b""
        out.refused.append(f"cannot read {mk.FRAGMENT}: {exc}")
    if frag and hashlib.sha256(frag).hexdigest() != record["config_fragment_sha256"]:
        out.refused.append(f"{mk.FRAGMENT} has sha256:{hashlib.sha256(frag).hexdigest()}; the kernel was built from "
                           f"sha256:{record['config_fragment_sha256']} (check out the summon it was built with)")
    gcc, ld = mk.toolchain()
    for what, have, want in (("gcc", gcc, record["gcc"]), ("binutils", ld, record["binutils"])):
        if have != want:  # a compiler cannot be fetched as a .deb and unpacked: it must be installed
            out.refused.append(f"{what} here is {have or 'absent'!r}, the kernel was compiled with {want!r}")
    missing = mk.missing_packages(installed, mk.BUILD_PACKAGES)
    if missing:
        out.refused.append(f"compiling the kernel needs {', '.join(missing)}: apt-get install {' '.join(missing)}")
    site = _site(manifest, image_dir, store, out_dir / "site-from-store", out)
    if out.refused or site is None:
        return out
    pk = Packages(out_dir / "packages", allow_substitutes, run, installed)
    src_version = str(packages[mk.SOURCE_PACKAGE])
    sroot = pk.root(mk.SOURCE_PACKAGE, src_version, out)
    broot = pk.root(ib.BUSYBOX_PACKAGE, str(packages[ib.BUSYBOX_PACKAGE]), out)
    out.lines += pk.notes
    if sroot is None or broot is None:
        return out
    use_version = installed(mk.SOURCE_PACKAGE) if sroot == Path("/") else src_version
    inputs = mk.KernelInputs(use_version, record["config_fragment_sha256"], gcc, ld)
    progress(f"compiling the minimal kernel again ({mk.SOURCE_PACKAGE} {use_version}, input digest "
             f"{inputs.digest[:16]}...): not from the cache")
    compile_kernel = compile_kernel or mk.obtain
    built = compile_kernel(inputs, progress, cache=out_dir / "kernel-cache", fresh_in=out_dir / "kernel-build",
                           source_tarball=sroot / str(mk.SOURCE_TARBALL).lstrip("/"))
    _compare(out, "kernel .config", str(record["config_sha256"]), built.config_sha256)
    kernel = ib.Kernel(built.release, built.vmlinux, Path("/nonexistent"))
    inputs_ = ib.Inputs(kernel, broot / "bin" / "busybox", site, int(t.get("guest_port", 80)),
                        int(manifest["build"].get("source_date_epoch", 0)), modules=(), kernel_format="pvh",
                        kernel_source="minimal")
    art = out.artefacts = ib.assemble(inputs_, out_dir / "artefacts" / "x86_64")
    _compare(out, "kernel", str(t.get("kernel_sha256")), art.kernel_sha256)
    _compare(out, "initrd", str(t.get("initrd_sha256")), art.initrd_sha256)
    if "initrd_cpio_sha256" in rec:
        _compare(out, "initrd (the cpio inside the gzip)", str(rec["initrd_cpio_sha256"]), art.initrd_cpio_sha256)
    return out


def vm_targets(manifest: dict[str, Any]) -> list[str]:
    """The microVM targets a manifest has (what `rebuild --arch all` rebuilds)."""
    return [a for a in ib.ARCHES if isinstance(manifest.get("targets", {}).get(a), dict)]


def _compare(out: Outcome, what: str, recorded: str, actual: str) -> None:
    if recorded == actual:
        out.lines.append(f"same     {what} sha256:{actual}")
    else:
        out.lines.append(f"DIFFERS  {what}: recorded sha256:{recorded}, rebuilt sha256:{actual}")
        out.differences.append(f"{what}: recorded sha256:{recorded}, rebuilt sha256:{actual}")


def _site(manifest: dict[str, Any], image_dir: Path, store: Store, scratch: Path, out: Outcome) -> Path | None:
    """The site the manifest recorded: the image dir's if it matches, else the store's copy."""
    b = manifest["build"]
    unix = manifest.get("targets", {}).get("unix", {})
    recorded = str(b.get("site_sha256") or unix.get("content_sha256", ""))
    here = image_dir / str(unix.get("content", "site"))
    have = content_digest(here) if here.is_dir() else None
    if have == recorded:
        out.lines.append(f"same     site sha256:{recorded} ({here})")
        return here
    if recorded and store.has_tree(recorded):
        for rel, _size, hexd in store.tree(recorded):
            dest = scratch / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(store.read_object(hexd))
        scratch.mkdir(parents=True, exist_ok=True)
        out.lines.append(f"site sha256:{recorded} from the image store ({here} has "
                         f"{'sha256:' + have if have else 'nothing'})")
        return scratch
    out.refused.append(f"the site sha256:{recorded} is neither {here} (which has "
                       f"{'sha256:' + have if have else 'nothing'}) nor in the image store {store.root}")
    return None


def _recorded_initrd(x86: dict[str, Any], image_dir: Path, store: Store) -> bytes | None:
    want = str(x86.get("initrd_sha256", ""))
    try:
        if store.has(want):
            return store.read_object(want)
        p = image_dir / str(x86.get("initrd", ""))
        data = p.read_bytes() if p.is_file() else b""
        return data if data and hashlib.sha256(data).hexdigest() == want else None
    except (OSError, ImageError):
        return None


# --- what differs inside two initramfs ----------------------------------------------------


def read_newc(blob: bytes) -> dict[str, tuple[int, int, str]]:
    """path -> (mode, mtime, sha256 of the data) of a newc archive (gzipped or not)."""
    if blob[:2] == b"\x1f\x8b":
        blob = gzip.decompress(blob)
    out: dict[str, tuple[int, int, str]] = {}
    pos = 0
    while pos + 110 <= len(blob) and blob[pos:pos + 6] == b"070701":
        f = [int(blob[pos + 6 + 8 * i: pos + 14 + 8 * i], 16) for i in range(13)]
        mode, mtime, size, namesize = f[1], f[5], f[6], f[11]
        name_start = pos + 110
        name = blob[name_start:name_start + namesize - 1].decode(errors="replace")
        data_start = name_start + namesize + (-(110 + namesize) % 4)
        data = blob[data_start:data_start + size]
        pos = data_start + size + (-size % 4)
        if name == "TRAILER!!!":
            break
        out[name] = (mode, mtime, hashlib.sha256(data).hexdigest())
    return out


def diff_initrd(old: bytes, new: bytes, limit: int = 20) -> list[str]:
    """Human lines naming the entries that differ between two initramfs archives."""
    a, b = read_newc(old), read_newc(new)
    lines: list[str] = []
    for path in sorted(set(a) | set(b)):
        if path not in b:
            lines.append(f"- {path} (only in the recorded initrd)")
        elif path not in a:
            lines.append(f"+ {path} (only in the rebuilt initrd)")
        elif a[path] != b[path]:
            what = [n for n, x, y in zip(("mode", "mtime", "content"), a[path], b[path], strict=True) if x != y]
            lines.append(f"~ {path}: {', '.join(what)} differ")
    if len(lines) > limit:
        lines = lines[:limit] + [f"... and {len(lines) - limit} more"]
    return lines


def scratch_dir() -> tempfile.TemporaryDirectory[str]:
    return tempfile.TemporaryDirectory(prefix="summon-rebuild-")


def keep(out: Outcome, store: Store) -> None:
    """Put rebuilt artefacts into the store (only after they matched the record)."""
    if out.artefacts is None or not out.identical:
        raise ImageError("refusing to store artefacts that differ from the manifest")
    for p, want in ((out.artefacts.kernel, out.artefacts.kernel_sha256), (out.artefacts.initrd, out.artefacts.initrd_sha256)):
        store.put_file(p, expect=want)

