"""The minimal kernel's config, cache, manifest record, verify and rebuild, on fakes.

No compile here: `obtain` is replaced by a fake that writes an ELF with a PVH note and an
embedded .config (as CONFIG_IKCONFIG lays it out). The real compile and boot are in
tests/e2e/test_vm_minimal_kernel.py.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from proxy.errors import BuildSetupError, ImageError
from proxy.images import minimal as mk
from proxy.images.build import build_image
from proxy.images.kernel import XEN_ELFNOTE_PHYS32_ENTRY
from proxy.images.manifest import load_image
from proxy.images.rebuild import read_newc
from tests.helpers.paths import REPO
from tests.unit.images.test_kernel import elf

FRAGMENT_TEXT = mk.FRAGMENT.read_text()
RESOLVED = "# resolved\n" + "\n".join(mk.fragment_lines(FRAGMENT_TEXT)) + "\nCONFIG_X86=y\n"


def kernel_elf(config: str = RESOLVED) -> bytes:
    """An ELF with a PVH note and CONFIG_IKCONFIG's markers around the gzipped .config."""
    return elf([(b"Xen", XEN_ELFNOTE_PHYS32_ENTRY, b"\0" * 4)]) + b"IKCFG_ST" + gzip.compress(
        config.encode(), mtime=0) + b"IKCFG_ED"


def inputs(**kw: str) -> mk.KernelInputs:
    base = {"linux_source": "6.1.192-3", "config_fragment_sha256": hashlib.sha256(FRAGMENT_TEXT.encode()).hexdigest(),
            "gcc": "gcc (Debian 12.2.0-14) 12.2.0", "binutils": "GNU ld (GNU Binutils for Debian) 2.40"}
    return mk.KernelInputs(**{**base, **kw})


def fake_obtain(calls: list[mk.KernelInputs], config: str = RESOLVED) -> Any:
    def obtain(inp: mk.KernelInputs, progress: Any, cache: Path | None = None, fresh_in: Path | None = None,
               **_kw: Any) -> mk.MinimalKernel:
        calls.append(inp)
        d = (fresh_in or cache or Path("/nonexistent")) / "out"
        d.mkdir(parents=True, exist_ok=True)
        (d / "vmlinux").write_bytes(kernel_elf(config))
        (d / "config").write_text(config)
        return mk.MinimalKernel(d / "vmlinux", d / "config", "6.1.192-summon-minimal", inp,
                                hashlib.sha256(config.encode()).hexdigest(), False, 1.0)
    return obtain


def copy_decks(tmp_path: Path) -> Path:
    images = tmp_path / "images"
    shutil.copytree(REPO / "images" / "decks", images / "decks", ignore=shutil.ignore_patterns("build"))
    return images


@pytest.fixture
def minimal_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, list[mk.KernelInputs]]:
    calls: list[mk.KernelInputs] = []
    monkeypatch.setattr(mk, "obtain", fake_obtain(calls))
    monkeypatch.setattr(mk, "inputs_here", lambda _installed: inputs())
    images = copy_decks(tmp_path)
    build_image(images / "decks", lambda _line: None, kernel_source="minimal", kernel_cache=tmp_path / "cache")
    return images, calls


# --- config ------------------------------------------------------------------------------


def test_the_fragment_names_what_the_guest_needs() -> None:
    lines = set(mk.fragment_lines(FRAGMENT_TEXT))
    for need in ("CONFIG_PVH=y", "CONFIG_VIRTIO_NET=y", "CONFIG_VIRTIO_PCI=y", "CONFIG_SERIAL_8250_CONSOLE=y",
                 "CONFIG_PRINTK_TIME=y", "CONFIG_BLK_DEV_INITRD=y", "CONFIG_RD_GZIP=y", "CONFIG_DEVTMPFS=y",
                 "CONFIG_BINFMT_SCRIPT=y", "CONFIG_INET=y", "CONFIG_IKCONFIG=y"):
        assert need in lines
    assert not any(ln.startswith("CONFIG_MODULES=") for ln in lines), "drivers are built in: no modules"


def test_lines_kconfig_dropped_are_named() -> None:
    assert mk.missing_config(FRAGMENT_TEXT, RESOLVED) == []
    dropped = RESOLVED.replace("CONFIG_PVH=y\n", "# CONFIG_PVH is not set\n")
    assert mk.missing_config(FRAGMENT_TEXT, dropped) == ["CONFIG_PVH=y"]


def test_the_embedded_config_is_read_back_from_the_kernel() -> None:
    assert mk.embedded_config(kernel_elf()) == RESOLVED.encode()
    assert mk.embedded_config(b"\x7fELF no config here") is None
    assert mk.embedded_config(b"IKCFG_ST not gzip IKCFG_ED") is None


def test_the_input_digest_changes_with_each_input_and_only_then() -> None:
    a = inputs()
    assert a.digest == inputs().digest
    others = [inputs(linux_source="6.1.193-1"), inputs(config_fragment_sha256="0" * 64), inputs(gcc="gcc 13"),
              inputs(binutils="GNU ld 2.41"), mk.KernelInputs(a.linux_source, a.config_fragment_sha256, a.gcc,
                                                              a.binutils, "summon-minimal-kernel/2")]
    assert len({a.digest, *(o.digest for o in others)}) == 6


def test_missing_packages_are_named_with_the_apt_line() -> None:
    have = {"gcc": "4:12.2.0-3", "make": "4.3-4.1", "binutils": "2.40-2", "bc": "1", "xz-utils": "5"}
    with pytest.raises(BuildSetupError) as e:
        mk.require_packages(lambda p: have.get(p, "unknown"))
    assert "apt-get install linux-source-6.1 flex bison libelf-dev" in str(e.value)
    mk.require_packages(lambda _p: "1")  # all there: nothing raised


def test_a_cached_kernel_is_used_and_a_damaged_one_is_not(tmp_path: Path) -> None:
    inp = inputs()
    entry = tmp_path / inp.digest
    entry.mkdir()
    (entry / "vmlinux").write_bytes(kernel_elf())
    (entry / "config").write_text(RESOLVED)
    (entry / "info.json").write_text(json.dumps({
        "release": "6.1.192-summon-minimal", "compile_s": 300.0,
        "config_sha256": hashlib.sha256(RESOLVED.encode()).hexdigest(),
        "vmlinux_sha256": hashlib.sha256(kernel_elf()).hexdigest()}))
    lines: list[str] = []
    hit = mk.obtain(inp, lines.append, cache=tmp_path, source_tarball=tmp_path / "absent.tar.xz")
    assert hit.cached and hit.vmlinux == entry / "vmlinux" and "from the cache" in lines[0]
    (entry / "vmlinux").write_bytes(b"damaged")
    assert mk.cached(inp, tmp_path) is None
    with pytest.raises(BuildSetupError, match="absent.tar.xz is missing: apt-get install linux-source-6.1"):
        mk.obtain(inp, lines.append, cache=tmp_path, source_tarball=tmp_path / "absent.tar.xz")


def test_the_cache_lives_outside_the_repo(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("SUMMON_KERNEL_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert mk.cache_dir() == tmp_path / "summon" / "kernels"
    monkeypatch.setenv("SUMMON_KERNEL_CACHE", str(tmp_path / "k"))
    assert mk.cache_dir() == tmp_path / "k"


# --- the build and its manifest ----------------------------------------------------------


def test_a_minimal_build_records_every_input_and_carries_no_modules(
        minimal_build: tuple[Path, list[mk.KernelInputs]]) -> None:
    images, calls = minimal_build
    image = load_image(images, "decks")
    b = image.manifest["build"]
    assert b["kernel_source"] == "minimal" and b["modules"] == [] and b["kernel_release"] == "6.1.192-summon-minimal"
    rec = b["minimal_kernel"]
    assert rec["linux_source"] == "linux-source-6.1 6.1.192-3" and b["packages"]["linux-source-6.1"] == "6.1.192-3"
    assert rec["config_fragment_sha256"] == hashlib.sha256(FRAGMENT_TEXT.encode()).hexdigest()
    assert rec["config_sha256"] == hashlib.sha256(RESOLVED.encode()).hexdigest()
    assert rec["gcc"].startswith("gcc") and rec["binutils"].startswith("GNU ld")
    assert rec["input_digest"] == calls[0].digest and "KBUILD_BUILD_TIMESTAMP=" in rec["build_env"]
    assert image.target("x86_64")["kernel_format"] == "pvh"
    image.verify("x86_64")
    entries = read_newc(image.path("x86_64", "initrd").read_bytes())
    assert not [p for p in entries if p.startswith("lib/modules") or p.endswith(".ko")]
    from proxy.images.build import init_script

    init = init_script(80, [], builtin=True)
    assert entries["init"][2] == hashlib.sha256(init.encode()).hexdigest()
    assert "insmod" not in init and "summon-mark: network" in init


def test_a_packaged_build_keeps_its_manifest_shape(tmp_path: Path) -> None:
    images = copy_decks(tmp_path)
    build_image(images / "decks", lambda _line: None)
    b = load_image(images, "decks").manifest["build"]
    assert "kernel_source" not in b and "minimal_kernel" not in b and b["modules"]


def test_a_bad_recipe_key_names_its_line_and_the_cli_exits_2(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    from proxy.cli.images import add_parsers

    images = copy_decks(tmp_path)
    recipe = images / "decks" / "image.toml"
    recipe.write_text(recipe.read_text() + '\n[targets.x86_64]\nmemory_mib = 64\nkernel_source = "tiny"\n')
    line = recipe.read_text().splitlines().index('kernel_source = "tiny"') + 1
    with pytest.raises(BuildSetupError, match=rf"image.toml:{line}: \[targets.x86_64\] kernel_source = 'tiny'"):
        build_image(images / "decks", lambda _line: None)
    parser = argparse.ArgumentParser()
    add_parsers(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["images", "build", "decks", "--images-dir", str(images)])
    assert args.func(args) == 2
    err = capsys.readouterr().err
    assert f"image.toml:{line}:" in err and "Traceback" not in err
    with pytest.raises(BuildSetupError, match="x86_64 only"):
        build_image(images / "decks", lambda _line: None, kernel_source="minimal", arches=("aarch64",))


def test_the_cli_names_the_missing_source_package_and_exits_2(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from proxy.cli.images import add_parsers
    from proxy.images import build as ib

    real = ib.package_version
    monkeypatch.setattr(ib, "package_version", lambda p: "unknown" if p == "linux-source-6.1" else real(p))
    images = copy_decks(tmp_path)
    parser = argparse.ArgumentParser()
    add_parsers(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["images", "build", "decks", "--kernel", "minimal", "--images-dir", str(images)])
    assert args.func(args) == 2
    err = capsys.readouterr().err
    assert "apt-get install linux-source-6.1" in err and "Traceback" not in err
    recipe = images / "decks" / "image.toml"
    recipe.write_text(recipe.read_text() + '\n[targets.x86_64]\nkernel_source = "minimal"\n')
    line = recipe.read_text().splitlines().index('kernel_source = "minimal"') + 1
    args = parser.parse_args(["images", "build", "decks", "--images-dir", str(images)])
    assert args.func(args) == 2
    err = capsys.readouterr().err
    assert f"image.toml:{line}: [targets.x86_64] kernel_source = \"minimal\": " in err
    assert "apt-get install linux-source-6.1" in err


# --- verify ------------------------------------------------------------------------------


def verify(images: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    from proxy.cli.images import add_parsers

    parser = argparse.ArgumentParser()
    add_parsers(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["images", "verify", "decks", "--images-dir", str(images)])
    return args.func(args), capsys.readouterr().out


def test_verify_checks_the_recorded_inputs(minimal_build: tuple[Path, list[mk.KernelInputs]],
                                           capsys: pytest.CaptureFixture[str]) -> None:
    images, _ = minimal_build
    rc, out = verify(images, capsys)
    assert rc == 0 and "ok   decks [x86_64] 2 artefact(s) and the minimal kernel inputs" in out


def test_check_record_finds_each_kind_of_mismatch() -> None:
    inp = inputs()
    good = mk.MinimalKernel(Path("v"), Path("c"), "r", inp, hashlib.sha256(RESOLVED.encode()).hexdigest(), False,
                            0).record()
    pk = {"linux-source-6.1": "6.1.192-3"}
    assert mk.check_record(good, pk, kernel_elf(), ["init", "bin/busybox"], FRAGMENT_TEXT) == ([], [])
    problems, _ = mk.check_record({**good, "gcc": "gcc 13"}, pk, kernel_elf(), [], FRAGMENT_TEXT)
    assert any("input_digest" in p for p in problems)
    problems, _ = mk.check_record(good, pk, kernel_elf(RESOLVED + "CONFIG_EXTRA=y\n"), [], FRAGMENT_TEXT)
    assert any("the kernel's own .config has" in p for p in problems)
    problems, _ = mk.check_record(good, pk, b"\x7fELF", [], FRAGMENT_TEXT)
    assert any("carries no .config" in p for p in problems)
    problems, _ = mk.check_record(good, pk, kernel_elf(), ["lib/modules/virtio_net.ko"], FRAGMENT_TEXT)
    assert any("carries modules" in p for p in problems)
    problems, _ = mk.check_record(good, {"linux-source-6.1": "6.1.100-1"}, kernel_elf(), [], FRAGMENT_TEXT)
    assert any("[build].packages records linux-source-6.1" in p for p in problems)
    problems, notes = mk.check_record(good, pk, kernel_elf(), [], None)
    assert problems == [] and "not the one in" in notes[0]
    problems, _ = mk.check_record({k: v for k, v in good.items() if k != "config_sha256"}, pk, kernel_elf(), [], None)
    assert problems == ["[build].minimal_kernel does not record config_sha256"]


def test_verify_fails_a_kernel_whose_config_is_not_the_recorded_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The built manifest claims one .config; a kernel built with another (same file
    digest recorded, so artefact verification alone passes) is caught by its own config."""
    calls: list[mk.KernelInputs] = []
    fake = fake_obtain(calls, RESOLVED + "CONFIG_SNEAKY=y\n")

    def lying(*a: Any, **kw: Any) -> mk.MinimalKernel:
        k = fake(*a, **kw)
        return mk.MinimalKernel(k.vmlinux, k.config, k.release, k.inputs,
                                hashlib.sha256(RESOLVED.encode()).hexdigest(), False, 1.0)
    monkeypatch.setattr(mk, "obtain", lying)
    monkeypatch.setattr(mk, "inputs_here", lambda _installed: inputs())
    images = copy_decks(tmp_path)
    build_image(images / "decks", lambda _line: None, kernel_source="minimal", kernel_cache=tmp_path / "cache")
    rc, out = verify(images, capsys)
    assert rc == 1 and "FAIL decks [x86_64]: the kernel's own .config has" in out


# --- rebuild -----------------------------------------------------------------------------


def test_rebuild_compiles_again_and_compares(minimal_build: tuple[Path, list[mk.KernelInputs]], tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from proxy.images import build as ib
    from proxy.images.rebuild import rebuild
    from proxy.images.store import Store

    images, calls = minimal_build
    image = load_image(images, "decks")
    monkeypatch.setattr(mk, "toolchain", lambda: (inputs().gcc, inputs().binutils))
    rec = image.manifest["build"]["packages"]
    installed = {**rec, **{p: "1" for p in mk.BUILD_PACKAGES}}
    out = rebuild(image.manifest, image.dir, Store(images / ".store"), tmp_path / "rb",
                  installed=lambda p: installed.get(p, ib.package_version(p)), compile_kernel=fake_obtain(calls))
    assert out.identical, out.lines + out.refused + out.differences
    assert calls[-1].digest == calls[0].digest
    assert any(line.startswith("same     kernel .config") for line in out.lines)
    # another compiler here: refused, never silently substituted
    monkeypatch.setattr(mk, "toolchain", lambda: ("gcc (Debian 13.2.0-1) 13.2.0", inputs().binutils))
    out = rebuild(image.manifest, image.dir, Store(images / ".store"), tmp_path / "rb2",
                  installed=lambda p: installed.get(p, ib.package_version(p)), compile_kernel=fake_obtain(calls))
    assert not out.identical and any("gcc here is" in r for r in out.refused)


def test_assemble_refuses_a_minimal_kernel_without_a_pvh_entry(tmp_path: Path) -> None:
    from proxy.images.build import Inputs, Kernel, assemble

    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_text("hi")
    (tmp_path / "vmlinux").write_bytes(b"\x7fELF not pvh")
    k = Kernel("r", tmp_path / "vmlinux", Path("/nonexistent"))
    with pytest.raises(ImageError, match="PVH"):
        assemble(Inputs(k, Path("/bin/busybox"), site, modules=(), kernel_source="minimal"), tmp_path / "o")
    with pytest.raises(ImageError, match="kernel_format must be"):
        assemble(Inputs(k, Path("/bin/busybox"), site, modules=(), kernel_format="bzimage", kernel_source="minimal"),
                 tmp_path / "o")
