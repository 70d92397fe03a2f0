"""The image store: objects by digest, old versions served by pin, verified reads, gc, diff,
and the rebuild's refusals. No kernel needed: builds here are faked with small files (the
real build and rebuild are in tests/e2e/test_image_rebuild.py)."""

from __future__ import annotations

import argparse
import gzip
import hashlib
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from proxy.config import load
from proxy.errors import ConfigError, ImageError
from proxy.images.build import S_IFREG, Entry, pack_newc
from proxy.images.manifest import load_image, manifest_digest, read_manifest, write_built_manifest
from proxy.images.rebuild import Outcome, Packages, apt_versions, diff_initrd, rebuild
from proxy.images.store import Build, Store
from proxy.images.versions import diff_manifests, gc
from tests.helpers.paths import REPO


def copy_decks(tmp_path: Path) -> Path:
    images = tmp_path / "images"
    shutil.copytree(REPO / "images" / "decks", images / "decks", ignore=shutil.ignore_patterns("build"))
    return images


def fake_build(images: Path, kernel: bytes, built_at: float = 1.0) -> str:
    """What `summon images build` does, with a made-up kernel: store, build/, a build record."""
    d = images / "decks"
    store = Store(images / ".store")
    recipe = read_manifest(d)
    (d / "build").mkdir(exist_ok=True)
    tmp = d / "build" / ".k"
    tmp.write_bytes(kernel)
    h = store.put_file(tmp)
    tmp.unlink()
    (d / "build" / "vmlinuz").unlink(missing_ok=True)
    os.link(store.object_path(h), d / "build" / "vmlinuz")
    built = read_manifest(d)
    built["targets"]["x86_64"] = {"kernel": "build/vmlinuz", "kernel_sha256": h}
    built["build"] = {"recipe_digest": manifest_digest(recipe)}
    version = store.put_version(built, d)
    write_built_manifest(d, built)
    store.record(Build("decks", version, manifest_digest(recipe), built_at))
    return version


def bump(path: Path) -> None:
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10_000_000))


def test_objects_are_named_by_digest_written_whole_and_shared(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    a = store.put_bytes(b"hello")
    assert a == hashlib.sha256(b"hello").hexdigest()
    src = tmp_path / "f"
    src.write_bytes(b"hello")
    assert store.put_file(src) == a  # the same bytes twice: one object
    assert [p.name for p in store.objects.iterdir()] == [a], "no temp file is left behind"
    with pytest.raises(ImageError, match="expected sha256:0{64}.*not stored"):
        store.put_file(src, expect="0" * 64)
    assert [p.name for p in store.objects.iterdir()] == [a]


def test_reads_are_verified_and_a_damaged_object_is_replaced(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    h = store.put_bytes(b"payload")
    store.object_path(h).write_bytes(b"paylaod")
    with pytest.raises(ImageError, match="does not match its digest"):
        store.read_object(h)
    with pytest.raises(ImageError, match="does not match its digest"):
        store.verify_object(h)
    store.put_bytes(b"payload")  # a writer does not trust a damaged object it finds
    assert store.read_object(h) == b"payload"
    with pytest.raises(ImageError, match="has no object"):
        store.read_object("1" * 64)


def test_a_pinned_older_version_is_served_from_the_store(tmp_path: Path) -> None:
    images = copy_decks(tmp_path)
    v1 = fake_build(images, b"kernel one" * 100)
    v2 = fake_build(images, b"kernel two" * 100)
    assert v1 != v2
    latest = load_image(images, "decks")
    assert latest.digest == v2 and latest.file == images / "decks" / "build" / "image.toml"
    old = load_image(images, f"decks@{v1}")  # build/ no longer holds it: the store does
    assert old.digest == v1 and old.dir == (images / ".store" / "versions" / v1.removeprefix("sha256:")).absolute()
    assert old.path("x86_64", "kernel").read_bytes() == b"kernel one" * 100
    old.verify("x86_64")
    old.verify("unix")  # the site, laid out from the store's tree
    assert old.unix_command(1)[-1] == str(old.dir / "site")
    assert load_image(images, f"decks@{v2}").dir == (images / "decks").absolute()  # the latest: build/ itself
    missing = "sha256:" + "e" * 64
    with pytest.raises(ImageError, match=f"pinned to {missing}.*image store .* does not hold"):
        load_image(images, f"decks@{missing}")


def test_store_location_is_a_parameter(tmp_path: Path) -> None:
    images = copy_decks(tmp_path)
    v1 = fake_build(images, b"k1" * 100)
    fake_build(images, b"k2" * 100)
    moved = tmp_path / "elsewhere"
    shutil.move(images / ".store", moved)
    with pytest.raises(ImageError, match="does not hold"):
        load_image(images, f"decks@{v1}")
    assert load_image(images, f"decks@{v1}", store=moved).digest == v1


def test_a_tampered_stored_artefact_is_refused_when_laid_out(tmp_path: Path) -> None:
    images = copy_decks(tmp_path)
    v1 = fake_build(images, b"kernel one" * 100)
    fake_build(images, b"kernel two" * 100)
    store = Store(images / ".store")
    manifest = store.manifest(v1)
    obj = store.object_path(manifest["targets"]["x86_64"]["kernel_sha256"])
    obj.write_bytes(b"kernel ONE" * 100)
    with pytest.raises(ImageError, match="does not match its digest"):
        load_image(images, f"decks@{v1}")
    assert not store.version_dir(v1).exists(), "nothing of a refused version is laid out"


def test_a_tampered_stored_manifest_is_refused(tmp_path: Path) -> None:
    images = copy_decks(tmp_path)
    v1 = fake_build(images, b"kernel one" * 100)
    fake_build(images, b"kernel two" * 100)
    p = Store(images / ".store").object_path(v1)
    p.write_bytes(p.read_bytes().replace(b"kernel", b"kernal"))
    with pytest.raises(ImageError, match="does not match its digest"):
        load_image(images, f"decks@{v1}")


def test_gc_keeps_pins_current_and_recent_and_says_what_it_removed(tmp_path: Path) -> None:
    images = copy_decks(tmp_path)
    v = [fake_build(images, f"kernel {i}".encode() * 100, built_at=float(i)) for i in range(4)]
    store = Store(images / ".store")
    dry = gc(store, pinned={v[0]}, current={v[3]}, keep=2, dry_run=True)
    assert dry.removed_versions == [v[1]] and store.has(v[1])
    load_image(images, f"decks@{v[1]}")  # laid out, then collected
    result = gc(store, pinned={v[0]}, current={v[3]}, keep=2)
    assert result.removed_versions == [v[1]]
    assert result.removed_objects == 2  # its manifest and its kernel; the site is shared
    assert sorted(result.kept_versions) == sorted([v[0], v[2], v[3]])
    assert not store.has(v[1]) and not store.version_dir(v[1]).exists()
    with pytest.raises(ImageError, match="does not hold"):
        load_image(images, f"decks@{v[1]}")
    for kept in (v[0], v[2]):
        load_image(images, f"decks@{kept}").verify("x86_64")
    assert [b.digest for b in store.builds("decks")] == v, "the history keeps every build"


def test_diff_names_settings_packages_and_files(tmp_path: Path) -> None:
    images = copy_decks(tmp_path)
    v1 = fake_build(images, b"k1" * 100)
    site = images / "decks" / "site" / "about.html"
    site.write_text(site.read_text() + "<p>more</p>")
    recipe = images / "decks" / "image.toml"
    from proxy.images.manifest import content_digest

    text = recipe.read_text()
    old_digest = read_manifest(images / "decks")["targets"]["unix"]["content_sha256"]
    recipe.write_text(text.replace(old_digest, content_digest(images / "decks" / "site")))
    bump(recipe)
    v2 = fake_build(images, b"k2" * 100)
    store = Store(images / ".store")
    lines = diff_manifests(store.manifest(v1), store.manifest(v2), store)
    assert any(line.startswith("~ targets.x86_64.kernel_sha256:") for line in lines)
    assert any(line.startswith("~ targets.unix.content_sha256:") for line in lines)
    assert "    [targets.unix].content: ~ about.html" in lines
    assert diff_manifests(store.manifest(v1), store.manifest(v1)) == []


def test_diff_initrd_names_the_entries(tmp_path: Path) -> None:
    a = gzip.compress(pack_newc([Entry("init", S_IFREG | 0o755, b"one"), Entry("site/a", S_IFREG | 0o644, b"x")]))
    b = gzip.compress(pack_newc([Entry("init", S_IFREG | 0o755, b"two"), Entry("site/b", S_IFREG | 0o644, b"x")]))
    assert diff_initrd(a, b) == ["~ init: content differ", "- site/a (only in the recorded initrd)",
                                 "+ site/b (only in the rebuilt initrd)"]
    c = pack_newc([Entry("init", S_IFREG | 0o755, b"one"), Entry("site/a", S_IFREG | 0o644, b"x")], mtime=5)
    assert diff_initrd(a, c)[0].endswith("mtime differ")


def _madison(versions: dict[str, list[str]]):  # type: ignore[no-untyped-def]
    def run(argv: list[str], cwd: Path | None) -> subprocess.CompletedProcess[str]:
        assert argv[:2] == ["apt-cache", "madison"], argv
        pkg = argv[2]
        out = "".join(f" {pkg} | {v} | http://deb.debian.org/debian bookworm/main amd64 Packages\n"
                      for v in versions.get(pkg, []))
        return subprocess.CompletedProcess(argv, 0, out, "")
    return run


def test_apt_versions_parses_madison() -> None:
    run = _madison({"busybox-static": ["1:1.36", "1:1.35"]})
    assert apt_versions("busybox-static", run) == ["1:1.36", "1:1.35"]
    assert apt_versions("nope", run) == []


def test_an_unavailable_recorded_version_is_named_with_its_substitute(tmp_path: Path) -> None:
    run = _madison({"busybox-static": ["1:1.36"]})
    out = Outcome()
    pk = Packages(tmp_path, run=run, installed=lambda p: "1:1.35")
    assert pk.root("busybox-static", "1:1.30", out) is None
    assert [str(u) for u in out.unavailable] == [
        "busybox-static 1:1.30 is recorded but can no longer be installed; would use 1:1.35 instead"]
    out = Outcome()
    pk = Packages(tmp_path, run=run, installed=lambda p: "unknown")
    assert pk.root("busybox-static", "1:1.30", out) is None
    assert "would use 1:1.36 instead" in str(out.unavailable[0])
    out = Outcome()
    assert Packages(tmp_path, run=run, installed=lambda p: "1:1.30").root("busybox-static", "1:1.30", out) == Path("/")
    assert not out.unavailable


def test_rebuild_refuses_what_it_cannot_have(tmp_path: Path) -> None:
    images = copy_decks(tmp_path)
    fake_build(images, b"k" * 100)
    built = read_manifest(images / "decks" / "build")
    built["build"].update(builder="summon-microvm/0", kernel_release="6.1.0-1-cloud-amd64", packages={})
    out = rebuild(built, images / "decks", Store(images / ".store"), tmp_path / "work", run=_madison({}))
    assert not out.identical and out.artefacts is None
    assert any("built by summon-microvm/0" in r for r in out.refused)
    assert any("does not record linux-image-6.1.0-1-cloud-amd64" in r for r in out.refused)
    (images / "decks" / "site" / "index.html").write_text("changed")
    built["build"]["site_sha256"] = "a" * 64
    out = rebuild(built, images / "decks", Store(images / ".store"), tmp_path / "work2", run=_madison({}))
    assert any(f"the site sha256:{'a' * 64} is neither" in r for r in out.refused)


def test_cli_history_diff_gc(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from proxy.cli.images import add_parsers

    images = copy_decks(tmp_path)
    v1 = fake_build(images, b"k1" * 100, built_at=1_700_000_000.0)
    v2 = fake_build(images, b"k2" * 100, built_at=1_700_000_060.0)
    parser = argparse.ArgumentParser()
    add_parsers(parser.add_subparsers(dest="command"))

    def run(*argv: str) -> tuple[int, str]:
        args = parser.parse_args(["images", "--images-dir", str(images), *argv])
        rc = args.func(args)
        return rc, capsys.readouterr().out

    rc, out = run("history", "decks")
    assert rc == 0
    rows = out.splitlines()[1:]
    assert rows[0].startswith("2023-11-14 22:13:20  build    " + v1[:24]) and "[current]" not in rows[0]
    assert rows[1].startswith("2023-11-14 22:14:20  build    " + v2[:24]) and rows[1].endswith("[current]")
    rc, out = run("diff", f"decks@{v1}", "decks")
    assert rc == 0 and "~ targets.x86_64.kernel_sha256:" in out and out.startswith(f"--- decks@{v1}\n+++ decks@{v2}")
    rc, out = run("gc", "--keep", "1")
    assert rc == 0 and f"removed version {v1}" in out and "kept 1 version(s)" in out
    rc, out = run("history", "decks")
    assert "[collected]" in out.splitlines()[1]


def test_config_images_store(tmp_path: Path) -> None:
    cfg = tmp_path / "summon.toml"
    cfg.write_text('[images]\ndir = "imgs"\n')
    assert load(cfg).images_store == tmp_path / "imgs" / ".store"
    cfg.write_text('[images]\ndir = "imgs"\nstore = "/var/lib/summon/store"\n')
    assert load(cfg).images_store == Path("/var/lib/summon/store")
    cfg.write_text('[images]\nstore = 3\nstor = "x"\n')
    with pytest.raises(ConfigError) as info:
        load(cfg)
    text = [str(p) for p in info.value.problems]
    assert f"{cfg}:2: [images].store: expected a path string" in text
    assert f"{cfg}:3: [images]: unknown key 'stor' (known: announce_urls, dir, follow, follow_every, follow_retry, pull_token_env, store)" in text


def test_a_foreign_arch_rebuild_takes_only_that_arch_s_debs(tmp_path: Path) -> None:
    """arm64's busybox-static at the very version installed for amd64 is still not "/"."""
    calls: list[list[str]] = []

    def run(argv: list[str], cwd: Path | None) -> subprocess.CompletedProcess[str]:
        calls.append(argv)
        if argv[:2] == ["apt-cache", "madison"]:
            return _madison({"busybox-static:arm64": ["1:1.35"]})(argv, cwd)
        return subprocess.CompletedProcess(argv, 1, "", "no network in unit tests")

    out = Outcome()
    pk = Packages(tmp_path, run=run, installed=lambda p: "1:1.35", foreign="arm64")
    with pytest.raises(ImageError, match=r"apt-get download busybox-static:arm64=1:1.35 failed"):
        pk.root("busybox-static", "1:1.35", out)
    assert ["apt-cache", "madison", "busybox-static:arm64"] in calls
    out = Outcome()
    assert Packages(tmp_path, run=run, foreign="arm64").root("busybox-static", "1:1.30", out) is None
    assert str(out.unavailable[0]).startswith("busybox-static:arm64 1:1.30 is recorded")


def test_rebuilding_an_arch_the_manifest_was_not_built_for_says_so(tmp_path: Path) -> None:
    images = copy_decks(tmp_path)
    fake_build(images, b"k" * 100)
    built = read_manifest(images / "decks" / "build")
    with pytest.raises(ImageError, match=r"no \[build\]\.aarch64 and \[targets\.aarch64\].*--arch aarch64"):
        rebuild(built, images / "decks", Store(images / ".store"), tmp_path / "w", run=_madison({}), target="aarch64")
    built["targets"]["aarch64"] = {"kernel": "build/aarch64/vmlinuz", "kernel_sha256": "0" * 64}
    built["build"]["aarch64"] = {"kernel_release": "6.1.0-1-cloud-arm64", "packages": {}, "modules": ["virtio"]}
    out = rebuild(built, images / "decks", Store(images / ".store"), tmp_path / "w2", run=_madison({}),
                  target="aarch64")
    assert any("[build].aarch64.packages does not record linux-image-6.1.0-1-cloud-arm64" in r for r in out.refused)
    assert any("[build].modules of aarch64 is ['virtio']" in r for r in out.refused)
