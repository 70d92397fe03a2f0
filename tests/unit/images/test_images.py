"""Image manifests: loading, digests, pins, tamper detection, reproducible initramfs."""

from __future__ import annotations

import gzip
import os
import shutil
import time
from pathlib import Path

import pytest

from proxy.errors import ImageError
from proxy.images.build import S_IFREG, Entry, build_site_initramfs, pack_newc, write_initramfs
from proxy.images.manifest import (
    content_digest,
    dump_manifest,
    load_image,
    manifest_digest,
    read_manifest,
    write_built_manifest,
)
from tests.helpers.paths import REPO


def copy_decks(tmp_path: Path) -> Path:
    """The tests' own copy of the decks recipe (image.toml + site/), never the checkout's
    build/: whatever `make demo` or `summon images build` left there does not matter."""
    images = tmp_path / "images"
    shutil.copytree(REPO / "images" / "decks", images / "decks", ignore=shutil.ignore_patterns("build"))
    return images


def test_committed_decks_manifest_verifies(tmp_path: Path) -> None:
    images = copy_decks(tmp_path)
    image = load_image(images, "decks")
    assert image.name == "decks" and image.digest.startswith("sha256:")
    assert image.targets() == ["unix"], "the committed recipe carries no built target"
    image.verify("unix")  # the committed content_sha256 is the site's real digest
    cmd = image.unix_command(8123)
    assert cmd[:2] == ["busybox", "httpd"] and "127.0.0.1:8123" in cmd
    assert cmd[-1] == str((images / "decks" / "site").absolute())


def test_site_is_small_and_links_its_assets() -> None:
    site = REPO / "images" / "decks" / "site"
    assert sum(p.stat().st_size for p in site.rglob("*") if p.is_file()) < 50_000
    index = (site / "index.html").read_text()
    for asset in ("/style.css", "/logo.svg", "/rss.svg", "/chart.png", "/feed.xml", "/about.html"):
        assert asset in index and (site / asset.lstrip("/")).is_file()


def test_lookup_by_name_path_and_missing(tmp_path: Path) -> None:
    images = copy_decks(tmp_path)
    by_name = load_image(images, "decks")
    by_path = load_image(tmp_path / "elsewhere", str(images / "decks"))
    assert by_name.digest == by_path.digest
    with pytest.raises(ImageError, match="no image named 'nope'.*nope/image.toml"):
        load_image(images, "nope")
    with pytest.raises(ImageError, match="no image at"):
        load_image(images, "./missing/dir")
    with pytest.raises(ImageError, match="no target 'x86_64'.*images build"):
        by_name.target("x86_64")


def test_digest_ignores_formatting_but_not_content(tmp_path: Path) -> None:
    images = copy_decks(tmp_path)
    manifest = images / "decks" / "image.toml"
    before = load_image(images, "decks").digest
    manifest.write_text("# a new comment\n" + manifest.read_text())
    os.utime(manifest, ns=(time.time_ns(), time.time_ns() + 10_000_000))
    assert load_image(images, "decks").digest == before
    manifest.write_text(manifest.read_text().replace("health_path = \"/\"", "health_path = \"/about.html\""))
    os.utime(manifest, ns=(time.time_ns(), time.time_ns() + 20_000_000))
    assert load_image(images, "decks").digest != before


def test_pin(tmp_path: Path) -> None:
    images = copy_decks(tmp_path)
    digest = load_image(images, "decks").digest
    assert load_image(images, f"decks@{digest}").digest == digest
    wrong = "sha256:" + "0" * 64
    with pytest.raises(ImageError, match=f"pinned to {wrong} but .*image.toml has digest {digest}"):
        load_image(images, f"decks@{wrong}")
    with pytest.raises(ImageError, match="pin must look like"):
        load_image(images, "decks@latest")


def test_tampered_content_is_detected(tmp_path: Path) -> None:
    images = copy_decks(tmp_path)
    image = load_image(images, "decks")
    image.verify("unix")
    css = images / "decks" / "site" / "style.css"
    css.write_text(css.read_text() + "body{color:red}\n")
    os.utime(css, ns=(time.time_ns(), time.time_ns() + 10_000_000))  # a new mtime even on coarse clocks
    with pytest.raises(ImageError, match=r"site.*\[targets.unix\].content.*expected sha256:[0-9a-f]{64}, actual sha256:"):
        image.verify("unix")


def fake_build(d: Path, kernel: bytes = b"k" * 1000) -> dict:
    """What `summon images build` writes, without a kernel: build/vmlinuz + build/image.toml."""
    (d / "build").mkdir(exist_ok=True)
    (d / "build" / "vmlinuz").write_bytes(kernel)
    recipe = read_manifest(d)
    built = read_manifest(d)
    built["targets"]["x86_64"] = {"kernel": "build/vmlinuz", "kernel_sha256": content_digest_of(kernel)}
    built["build"] = {"recipe_digest": manifest_digest(recipe)}
    write_built_manifest(d, built)
    return built


def test_build_output_lives_beside_the_recipe_not_in_it(tmp_path: Path) -> None:
    """The recipe is never rewritten; a build/image.toml built from the recipe as it is now
    is the image, and one built from an older recipe is ignored with a reason."""
    images = copy_decks(tmp_path)
    d = images / "decks"
    recipe_text = (d / "image.toml").read_text()
    recipe = load_image(images, "decks")
    built = fake_build(d)
    assert (d / "image.toml").read_text() == recipe_text
    image = load_image(images, "decks")
    assert image.targets() == ["unix", "x86_64"] and image.file == d / "build" / "image.toml"
    assert image.digest != recipe.digest and image.manifest == built
    assert image.manifest["build"]["recipe_digest"] == recipe.digest
    assert image.target("unix") == recipe.target("unix")
    image.verify("x86_64")
    # the recipe changes after the build: the build no longer describes it
    (d / "image.toml").write_text(recipe_text.replace('health_path = "/"', 'health_path = "/about.html"'))
    os.utime(d / "image.toml", ns=(time.time_ns(), time.time_ns() + 10_000_000))
    stale = load_image(images, "decks")
    assert stale.targets() == ["unix"] and stale.file == d / "image.toml"
    with pytest.raises(ImageError, match=r"no target 'x86_64'.*images build decks.*build/image.toml was built from "
                                         r"another version of .*decks/image.toml"):
        stale.target("x86_64")
    fake_build(d)
    assert load_image(images, "decks").targets() == ["unix", "x86_64"]


def test_tampered_artefact_file_is_detected_despite_cache(tmp_path: Path) -> None:
    images = copy_decks(tmp_path)
    d = images / "decks"
    fake_build(d)
    image = load_image(images, "decks")
    image.verify("x86_64")
    image.verify("x86_64")  # cached
    (d / "build" / "vmlinuz").write_bytes(b"x" * 1000)  # same size
    os.utime(d / "build" / "vmlinuz", ns=(time.time_ns(), time.time_ns() + 10_000_000))
    with pytest.raises(ImageError, match=r"vmlinuz \(\[targets.x86_64\].kernel\).*expected sha256:"):
        image.verify("x86_64")
    (d / "build" / "vmlinuz").unlink()
    with pytest.raises(ImageError, match="vmlinuz is missing"):
        image.verify("x86_64")


def content_digest_of(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def test_content_digest_depends_on_names_and_bytes(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()
    (a / "x").write_text("ab")
    (a / "y").write_text("c")
    (b / "x").write_text("a")
    (b / "y").write_text("bc")
    assert content_digest(a) != content_digest(b)
    (b / "x").write_text("ab")
    (b / "y").write_text("c")
    assert content_digest(a) == content_digest(b)


def test_manifest_round_trips_through_writer(tmp_path: Path) -> None:
    import tomllib

    m = read_manifest(REPO / "images" / "decks")
    m["build"] = {"packages": {"busybox-static": "1:1.35", "linux-image-6.1.0-56-cloud-amd64": "6.1"}, "n": 1}
    assert tomllib.loads(dump_manifest(m)) == m


def test_newc_archive_is_well_formed() -> None:
    blob = pack_newc([Entry("a/b/file", S_IFREG | 0o644, b"hello")])
    assert blob.startswith(b"070701")
    assert blob.count(b"070701") == 4  # a, a/b, a/b/file, trailer
    assert b"TRAILER!!!" in blob and len(blob) % 4 == 0


def test_initramfs_is_reproducible(tmp_path: Path) -> None:
    site = tmp_path / "site"
    (site / "sub").mkdir(parents=True)
    (site / "index.html").write_text("<h1>hi</h1>")
    (site / "sub" / "x.css").write_text("a{}")
    d1 = build_site_initramfs(site, tmp_path / "one.cpio.gz")
    os.utime(site / "index.html", (0, 12345))  # mtimes must not matter
    time.sleep(0.01)
    d2 = build_site_initramfs(site, tmp_path / "two.cpio.gz")
    assert d1 == d2
    assert (tmp_path / "one.cpio.gz").read_bytes() == (tmp_path / "two.cpio.gz").read_bytes()
    raw = gzip.decompress((tmp_path / "one.cpio.gz").read_bytes())
    assert b"site/sub/x.css" in raw and b"httpd -f -p 80 -h /site &" in raw
    assert b"summon-mark: init" in raw and b"summon-mark: listening" in raw and b"dev/kmsg" in raw
    (site / "index.html").write_text("<h1>changed</h1>")
    assert build_site_initramfs(site, tmp_path / "three.cpio.gz") != d1


def test_write_initramfs_gzip_has_no_timestamp(tmp_path: Path) -> None:
    write_initramfs(tmp_path / "x.gz", [Entry("init", S_IFREG | 0o755, b"#!/bin/sh\n")])
    head = (tmp_path / "x.gz").read_bytes()[:10]
    assert head[4:8] == b"\0\0\0\0"  # MTIME field


@pytest.mark.skipif(not list(Path("/boot").glob("vmlinuz-*-cloud-amd64")), reason="linux-image-cloud-amd64 not installed")
def test_build_image_twice_same_digest(tmp_path: Path) -> None:
    from proxy.images.build import build_image

    images = copy_decks(tmp_path)
    recipe_text = (images / "decks" / "image.toml").read_text()
    recipe = load_image(images, "decks")
    lines: list[str] = []
    build_image(images / "decks", lines.append)
    first = load_image(images, "decks")
    first.verify("x86_64")
    build_image(images / "decks", lines.append)
    second = load_image(images, "decks")
    assert first.digest == second.digest
    assert first.target("x86_64") == second.target("x86_64")
    assert second.target("unix") == recipe.target("unix")
    assert (images / "decks" / "image.toml").read_text() == recipe_text, "the build rewrote the recipe"
    assert second.file == images / "decks" / "build" / "image.toml"
    assert second.manifest["build"]["recipe_digest"] == recipe.digest
    assert any("kernel" in line for line in lines)
    assert "busybox-static" in second.manifest["build"]["packages"]


def test_cli_verify_and_list(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    from proxy.cli.images import add_parsers

    images = copy_decks(tmp_path)
    parser = argparse.ArgumentParser()
    add_parsers(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["images", "--images-dir", str(images), "verify"])
    assert args.func(args) == 0
    (images / "decks" / "site" / "index.html").write_text("tampered")
    os.utime(images / "decks" / "site" / "index.html", ns=(time.time_ns(), time.time_ns() + 10_000_000))
    args = parser.parse_args(["images", "verify", "decks", "--images-dir", str(images)])
    assert args.func(args) == 1
    assert "FAIL decks [unix]" in capsys.readouterr().out
    args = parser.parse_args(["images", "list", "--images-dir", str(images)])
    assert args.func(args) == 0
    assert capsys.readouterr().out.startswith("decks\tsha256:")
