"""The minimal microVM kernel: compiled from Debian's linux-source-6.1 with a small config.

Why: under TCG the packaged cloud kernel is most of a cold start (its init alone about
1.5 s) and of an idle VM's memory (its 46 MiB ELF, loaded into the guest and mapped by
QEMU). A kernel with only what the guest uses (`kernels/minimal.config`: PVH entry,
8250 console with printk times, initramfs, virtio-net-pci built in, IPv4) is a few MiB
and has nothing to probe. It is opt-in (`summon images build --kernel minimal`, or
``kernel_source = "minimal"`` in the recipe's ``[targets.x86_64]``): the default stays the
packaged kernel, so a fresh machine needs no compiler.

Compiled once per input: the inputs (`KernelInputs`: the source package's version, the
fragment's sha256, gcc's and binutils' versions, the recipe of the compile itself,
`KERNEL_BUILDER`) hash to a digest, and the result is cached under that digest in
`cache_dir()` (outside the repo), so a second build copies it. The compile is
``make allnoconfig KCONFIG_ALLCONFIG=<fragment>`` (everything not named is off), a check
that every fragment line survived Kconfig's dependency resolution, then ``nice -n 19 make
-jNCPU vmlinux`` with the build's timestamp, user, host and version fixed (the kernel's
reproducible-builds knobs), and the ELF stripped as the kernel's own bzImage build strips
it (``objcopy -R .comment -S``). A `rebuild` compiles again without the cache and compares.
The resolved .config is inside the kernel (CONFIG_IKCONFIG, not exposed in /proc), so
`check_record` can prove, from the kernel file alone, which config it was built with.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import BuildSetupError, ImageError
from .kernel import has_pvh_entry

SOURCE_PACKAGE = "linux-source-6.1"
SOURCE_TARBALL = Path("/usr/src/linux-source-6.1.tar.xz")
FRAGMENT = Path(__file__).with_name("kernels") / "minimal.config"
# What the compile needs besides the source (checked before it starts, named if missing):
# gcc/make/binutils, flex and bison (Kconfig's parser), bc (timeconst.h), libelf-dev
# (objtool: x86_64 always builds it, for uaccess validation), xz-utils (the source tarball).
BUILD_PACKAGES = ("gcc", "make", "binutils", "flex", "bison", "bc", "libelf-dev", "xz-utils")
KERNEL_BUILDER = "summon-minimal-kernel/1"  # the compile below; bump when it would give other bytes
SOURCES = ("packaged", "minimal")  # `--kernel`, `[targets.x86_64] kernel_source`
# The kernel's reproducible-builds knobs (Documentation/kbuild/reproducible-builds.rst):
# fixed, so the banner is the same on every machine; SOURCE_DATE_EPOCH is not used here,
# so an image's epoch does not force a recompile.
BUILD_ENV = {
    "KBUILD_BUILD_TIMESTAMP": "Thu Jan  1 00:00:00 UTC 1970",
    "KBUILD_BUILD_USER": "summon",
    "KBUILD_BUILD_HOST": "summon",
    "KBUILD_BUILD_VERSION": "1",
    "LC_ALL": "C",
    "TZ": "UTC",
}
JOBS = os.cpu_count() or 2  # the bytes do not depend on it (so it is not among the inputs)
COMPILE_TIMEOUT_S = 3 * 3600.0

Run = Callable[..., "subprocess.CompletedProcess[str]"]


@dataclass(frozen=True)
class KernelInputs:
    """Everything the compile's bytes depend on; `digest` names the cache entry."""

    linux_source: str  # the source package's version, e.g. 6.1.192-3
    config_fragment_sha256: str
    gcc: str  # first line of `gcc --version` (Debian's revision is in it)
    binutils: str  # first line of `ld --version`
    builder: str = KERNEL_BUILDER

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class MinimalKernel:
    """A compiled kernel: the stripped ELF (PVH entry), its .config, what it was built from."""

    vmlinux: Path
    config: Path
    release: str  # e.g. 6.1.192-summon-minimal
    inputs: KernelInputs
    config_sha256: str
    cached: bool  # taken from the cache, not compiled now
    compile_s: float  # how long the compile took (the cached entry's, when cached)

    def record(self) -> dict[str, Any]:
        """What the manifest's ``[build].minimal_kernel`` keeps."""
        return {"linux_source": f"{SOURCE_PACKAGE} {self.inputs.linux_source}",
                "config_fragment_sha256": self.inputs.config_fragment_sha256,
                "config_sha256": self.config_sha256, "gcc": self.inputs.gcc, "binutils": self.inputs.binutils,
                "builder": self.inputs.builder, "input_digest": self.inputs.digest,
                "build_env": " ".join(f"{k}={v}" for k, v in BUILD_ENV.items())}


def cache_dir() -> Path:
    """``$SUMMON_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/summon/kernels`` (``~/.cache``): not
    the repo, so a clean checkout or `git clean` keeps it, and worktrees share it."""
    if os.environ.get("SUMMON_KERNEL_CACHE"):
        return Path(os.environ["SUMMON_KERNEL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "summon" / "kernels"


def _first_line(argv: list[str], run: Run) -> str:
    try:
        r = run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return ""
    return r.stdout.splitlines()[0].strip() if r.returncode == 0 and r.stdout.strip() else ""


def toolchain(run: Run = subprocess.run) -> tuple[str, str]:
    """(gcc, binutils) as their --version's first line; ("", "") for one that is absent."""
    return _first_line(["gcc", "--version"], run), _first_line(["ld", "--version"], run)


def fragment_lines(text: str) -> list[str]:
    """The ``CONFIG_X=value`` lines of a fragment (comments and blanks dropped)."""
    return [ln.strip() for ln in text.splitlines() if ln.strip().startswith("CONFIG_")]


def missing_config(fragment: str, config: str) -> list[str]:
    """Fragment lines Kconfig did not keep (an unmet dependency turns a symbol off)."""
    have = set(ln.strip() for ln in config.splitlines())
    return [ln for ln in fragment_lines(fragment) if ln not in have]


def embedded_config(elf: bytes) -> bytes | None:
    """The .config CONFIG_IKCONFIG put in the kernel (gzip between IKCFG_ST and IKCFG_ED)."""
    start = elf.find(b"IKCFG_ST")
    if start < 0:
        return None
    end = elf.find(b"IKCFG_ED", start)
    if end < 0:
        return None
    try:
        return gzip.decompress(elf[start + 8:end])
    except (OSError, EOFError):
        return None


def missing_packages(installed: Callable[[str], str], names: tuple[str, ...] = (SOURCE_PACKAGE, *BUILD_PACKAGES)
                     ) -> list[str]:
    return [p for p in names if installed(p) == "unknown"]


def require_packages(installed: Callable[[str], str]) -> None:
    """Raise `BuildSetupError` naming the apt-get line when the compile cannot run here."""
    missing = missing_packages(installed)
    if missing:
        raise BuildSetupError(f"the minimal kernel is compiled here and needs {', '.join(missing)}: "
                              f"apt-get install {' '.join(missing)} (or run scripts/setup.sh)")


def inputs_here(installed: Callable[[str], str], fragment: Path = FRAGMENT, run: Run = subprocess.run
                ) -> KernelInputs:
    """The inputs of a minimal kernel built on this machine now."""
    require_packages(installed)
    try:
        frag = fragment.read_bytes()
    except OSError as exc:
        raise ImageError(f"cannot read the kernel config fragment {fragment}: {exc.strerror or exc}") from exc
    gcc, ld = toolchain(run)
    return KernelInputs(installed(SOURCE_PACKAGE), hashlib.sha256(frag).hexdigest(), gcc, ld)


@contextmanager
def _locked(path: Path | None) -> Iterator[None]:
    """flock `path` for the block (None: no lock)."""
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def cached(inputs: KernelInputs, cache: Path) -> MinimalKernel | None:
    entry = cache / inputs.digest
    try:
        info = json.loads((entry / "info.json").read_text())
        vmlinux, config = entry / "vmlinux", entry / "config"
        if hashlib.sha256(config.read_bytes()).hexdigest() != info["config_sha256"]:
            return None
        if hashlib.sha256(vmlinux.read_bytes()).hexdigest() != info["vmlinux_sha256"]:
            return None  # a damaged entry is compiled again, never used
    except (OSError, ValueError, KeyError):
        return None
    return MinimalKernel(vmlinux, config, str(info["release"]), inputs, str(info["config_sha256"]), True,
                         float(info.get("compile_s", 0.0)))


def obtain(inputs: KernelInputs, progress: Callable[[str], None], cache: Path | None = None,
           source_tarball: Path = SOURCE_TARBALL, fragment: Path = FRAGMENT, fresh_in: Path | None = None,
           run: Run = subprocess.run) -> MinimalKernel:
    """The kernel of `inputs`: from the cache, else compiled (and cached).

    `fresh_in`: compile into this directory whatever the cache holds, and cache nothing
    (what a rebuild does, to show the bytes come from the inputs). The compile runs under
    the lock file ``$SUMMON_BUILD_LOCK`` when set (a machine that serialises CPU-heavy
    work), and under a per-digest lock in the cache, so two builds never compile the same
    kernel at once."""
    cache = cache or cache_dir()
    if fresh_in is None and (hit := cached(inputs, cache)) is not None:
        progress(f"minimal kernel {hit.release} from the cache {hit.vmlinux.parent} (input digest "
                 f"{inputs.digest[:16]}...; compiled in {hit.compile_s:.0f}s)")
        return hit
    with _locked(cache / f"{inputs.digest}.lock" if fresh_in is None else None):
        if fresh_in is None and (hit := cached(inputs, cache)) is not None:
            return hit  # another build compiled it while this one waited
        src = _source_tree(inputs.linux_source, source_tarball, cache, progress, run)
        work = fresh_in or cache / f".build-{inputs.digest[:16]}-{os.getpid()}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        lock = Path(os.environ["SUMMON_BUILD_LOCK"]) if os.environ.get("SUMMON_BUILD_LOCK") else None
        with _locked(lock):
            t0 = time.monotonic()
            vmlinux, config, release = _compile(src, work, fragment, progress, run)
            compile_s = time.monotonic() - t0
        config_sha = hashlib.sha256(config.read_bytes()).hexdigest()
        if fresh_in is not None:
            return MinimalKernel(vmlinux, config, release, inputs, config_sha, False, compile_s)
        entry = cache / inputs.digest
        tmp = cache / f".{inputs.digest}.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        shutil.copyfile(vmlinux, tmp / "vmlinux")
        shutil.copyfile(config, tmp / "config")
        (tmp / "info.json").write_text(json.dumps({
            **asdict(inputs), "release": release, "config_sha256": config_sha, "compile_s": round(compile_s, 1),
            "vmlinux_sha256": hashlib.sha256((tmp / "vmlinux").read_bytes()).hexdigest()}, indent=1))
        shutil.rmtree(entry, ignore_errors=True)
        os.replace(tmp, entry)
        shutil.rmtree(work, ignore_errors=True)
        progress(f"cached the minimal kernel in {entry}")
        out = cached(inputs, cache)
        if out is None:
            raise ImageError(f"the kernel just cached in {entry} does not read back")
        return MinimalKernel(out.vmlinux, out.config, out.release, inputs, out.config_sha256, False, compile_s)


def _source_tree(version: str, tarball: Path, cache: Path, progress: Callable[[str], None], run: Run) -> Path:
    """The unpacked source of linux-source-6.1 `version`, unpacked once under the cache."""
    root = cache / "src" / f"{SOURCE_PACKAGE}_{version}".replace(":", "%3a")
    tree = root / SOURCE_PACKAGE
    if (tree / "Makefile").is_file():
        return tree
    if not tarball.is_file():
        raise BuildSetupError(f"{tarball} is missing: apt-get install {SOURCE_PACKAGE}={version}")
    progress(f"unpacking {tarball} into {root}")
    tmp = root.with_name(f".{root.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _check(run(["tar", "-xJf", str(tarball), "-C", str(tmp)], capture_output=True, text=True, timeout=1800),
           "unpacking the kernel source")
    shutil.rmtree(root, ignore_errors=True)
    os.replace(tmp, root)
    return tree


def _check(r: subprocess.CompletedProcess[str], what: str) -> None:
    if r.returncode != 0:
        raise ImageError(f"{what} failed (exit {r.returncode}): {(r.stderr or r.stdout).strip()[-600:]}")


def _compile(src: Path, work: Path, fragment: Path, progress: Callable[[str], None],
             run: Run) -> tuple[Path, Path, str]:
    env = {**os.environ, **BUILD_ENV}
    make = ["nice", "-n", "19", "make", "-C", str(src), f"O={work}"]
    r = run([*make, "allnoconfig", f"KCONFIG_ALLCONFIG={fragment.absolute()}"], capture_output=True, text=True,
            env=env, timeout=600)
    _check(r, "make allnoconfig")
    config = work / ".config"
    lost = missing_config(fragment.read_text(), config.read_text())
    if lost:
        raise ImageError(f"{fragment}: Kconfig did not keep {', '.join(lost)} (a dependency is not enabled)")
    progress(f"compiling the minimal kernel in {work} (nice -n 19 make -j{JOBS} vmlinux; minutes on a small machine)")
    log = work / "build.log"
    with log.open("w") as f:
        r = run([*make, f"-j{JOBS}", "vmlinux"], stdout=f, stderr=subprocess.STDOUT, text=True, env=env,
                timeout=COMPILE_TIMEOUT_S)
    if r.returncode != 0:
        tail = log.read_text(errors="replace")[-1500:]
        raise ImageError(f"compiling the kernel failed (exit {r.returncode}; {log}):\n{tail}")
    stripped = work / "vmlinux.summon"
    _check(run(["objcopy", "-R", ".comment", "-S", str(work / "vmlinux"), str(stripped)], capture_output=True,
               text=True, timeout=120), "objcopy")
    if not has_pvh_entry(stripped.read_bytes()):
        raise ImageError(f"{stripped} has no PVH entry point: is CONFIG_PVH in {fragment}?")
    release = (work / "include" / "config" / "kernel.release").read_text().strip()
    return stripped, config, release


def check_record(record: dict[str, Any], packages: dict[str, Any], kernel_elf: bytes, initrd_paths: list[str],
                 fragment_text: str | None) -> tuple[list[str], list[str]]:
    """(problems, notes) of a minimal kernel's manifest record against its artefacts.

    Problems: a missing input, an input digest that is not the digest of the recorded
    inputs, a kernel whose embedded .config is not the recorded one or lacks a line of the
    fragment, an initramfs that carries modules. `fragment_text`: the committed fragment
    when its digest is the recorded one (else None, and a note says so)."""
    problems: list[str] = []
    notes: list[str] = []
    need = ("linux_source", "config_fragment_sha256", "config_sha256", "gcc", "binutils", "builder", "input_digest")
    absent = [k for k in need if not isinstance(record.get(k), str) or not record.get(k)]
    if absent:
        return [f"[build].minimal_kernel does not record {', '.join(absent)}"], notes
    version = str(record["linux_source"]).removeprefix(f"{SOURCE_PACKAGE} ")
    if packages.get(SOURCE_PACKAGE) != version:
        problems.append(f"[build].packages records {SOURCE_PACKAGE} {packages.get(SOURCE_PACKAGE)!r}, "
                        f"[build].minimal_kernel {version!r}")
    inputs = KernelInputs(version, str(record["config_fragment_sha256"]), str(record["gcc"]), str(record["binutils"]),
                          str(record["builder"]))
    if inputs.digest != record["input_digest"]:
        problems.append(f"[build].minimal_kernel.input_digest {record['input_digest'][:16]}... is not the digest "
                        f"of the inputs recorded next to it ({inputs.digest[:16]}...)")
    config = embedded_config(kernel_elf)
    if config is None:
        problems.append("the kernel carries no .config (CONFIG_IKCONFIG): not a minimal kernel summon built")
    else:
        if hashlib.sha256(config).hexdigest() != record["config_sha256"]:
            problems.append(f"the kernel's own .config has sha256:{hashlib.sha256(config).hexdigest()}, the "
                            f"manifest records sha256:{record['config_sha256']}")
        if fragment_text is not None:
            lost = missing_config(fragment_text, config.decode(errors="replace"))
            if lost:
                problems.append(f"the kernel's .config lacks {', '.join(lost)} of the fragment")
    if fragment_text is None:
        notes.append(f"built from a config fragment with sha256:{record['config_fragment_sha256'][:16]}..., not the "
                     f"one in {FRAGMENT} (it changed since: build again to use it)")
    mods = [p for p in initrd_paths if p.startswith("lib/modules") or p.endswith((".ko", ".ko.xz", ".ko.zst"))]
    if mods:
        problems.append(f"the initramfs of a minimal-kernel image carries modules: {', '.join(mods[:5])}")
    return problems, notes
