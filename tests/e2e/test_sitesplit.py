"""`summon routes split-site`: one image per URL of a static site, plus its route table.

Checked here: slugs and content types; the output is stable (same input, byte-identical
files, nothing rewritten on a re-run); `summon check` accepts it and every image verifies;
stale images are removed and foreign ones never overwritten; and the round trip through a
real `summon serve`: every file is served at its URL with its bytes and Content-Type.
A per-URL microVM (built with --vm) is booted once where libvirt/QEMU exist.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tomllib
from pathlib import Path

import pytest

from proxy.cli.main import main as summon_main
from proxy.config import load
from proxy.errors import ImageError
from proxy.images.manifest import load_image
from proxy.images.sitesplit import SplitOptions, content_type_for, slug, split_site
from tests.helpers.summon_proc import Summon, http_get
from tests.helpers.vm_images import MISSING

PNG = bytes.fromhex("89504e470d0a1a0a0000000d49484452") + bytes(range(256))

# path under the site -> (bytes, the Content-Type busybox must send; None: no header)
SITE: dict[str, tuple[bytes, str | None]] = {
    "index.html": (b'<!doctype html><link rel="stylesheet" href="/style.css"><img src="/logo.svg">home\n', "text/html"),
    "style.css": (b"body { color: #222 }\n", "text/css"),
    "logo.svg": (b'<svg xmlns="http://www.w3.org/2000/svg" width="1" height="1"/>\n', "image/svg+xml"),
    "chart.png": (PNG, "image/png"),
    "feed.xml": (b'<?xml version="1.0"?><rss version="2.0"></rss>\n', "application/xml"),
    "app.js": (b"console.log(1)\n", "text/javascript"),
    "data.json": (b'{"a": 1}\n', "application/json"),
    "favicon.ico": (b"\x00\x00\x01\x00", "image/x-icon"),
    "my_notes.txt": (b"underscores get a hashed slug\n", "text/plain"),
    "posts/index.html": (b"<p>posts</p>\n", "text/html"),
    "posts/hello.html": (b"<p>hello</p>\n", "text/html"),
    "posts/2025/deep.html": (b"<p>deep</p>\n", "text/html"),
    "LICENSE": (b"no extension: served, but without a Content-Type\n", None),
}


def make_site(root: Path) -> Path:
    site = root / "site"
    for rel, (data, _) in SITE.items():
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_bytes(data)
    (site / ".hidden").write_text("never published\n")
    (site / "with space.html").write_text("needs percent-encoding\n")
    return site


def split(root: Path, *extra: str) -> int:
    """Run the CLI with paths relative to `root` (as a user would), from `root`."""
    cwd = os.getcwd()
    os.chdir(root)
    try:
        return summon_main(["routes", "split-site", "site", "--name", "blog", *extra])
    finally:
        os.chdir(cwd)


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_slugs_are_safe_stable_and_unique() -> None:
    assert slug("style.css") == "style.css"
    assert slug("posts/first.html") == "posts_first.html"
    tricky = ["posts_first.html", "posts/first.html", "a_/b", "a/_b", "a b.html", "a-b.html", "x" * 300, "x" * 301]
    slugs = [slug(s) for s in tricky]
    assert len(set(slugs)) == len(slugs), slugs
    assert slugs == [slug(s) for s in tricky]
    for s in slugs:
        assert len(s) <= 80 and s[0].isalnum() and all(c.isalnum() or c in "._-" for c in s), s


def test_content_types() -> None:
    assert content_type_for("a.svg") == "image/svg+xml"
    assert content_type_for("feed.xml") == "application/xml"
    assert content_type_for("feed.rss") == "application/rss+xml"
    assert content_type_for("x.js") == "text/javascript"
    assert content_type_for("X.PNG") == "image/png"
    assert content_type_for("a.tar.gz") == "application/gzip"
    assert content_type_for("LICENSE") == "application/octet-stream"


def test_split_writes_one_image_per_url_and_is_stable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for root in (a, b):
        make_site(root)
        assert split(root) == 0
    out = capsys.readouterr().out
    assert "skipped .hidden: hidden file" in out
    assert "skipped with space.html" in out
    assert "/LICENSE: no extension" in out
    # Same input, byte-identical output, wherever it is run.
    assert tree(a / "images") == tree(b / "images")
    assert tree(a / "routes") == tree(b / "routes")
    images = sorted(p.name for p in (a / "images").iterdir())
    assert len(images) == len(SITE)
    assert all(name.startswith("blog-") for name in images)
    # A re-run rewrites nothing (mtimes kept: a running proxy's digest caches stay valid).
    before = {p: p.stat().st_mtime_ns for p in (a / "images").rglob("*")}
    assert split(a) == 0
    assert f"0 written, {len(SITE)} unchanged, 0 stale removed" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in (a / "images").rglob("*")} == before

    routes = tomllib.loads((a / "routes" / "blog.toml").read_text())["route"]
    urls = [r["url"] for r in routes]
    assert urls == sorted(urls)
    assert set(urls) == {"/" + rel for rel in SITE} | {"/", "/posts/"}
    by_url = {r["url"]: r for r in routes}
    assert by_url["/"]["image"] == by_url["/index.html"]["image"] == "blog-index.html"
    assert by_url["/posts/"]["image"] == "blog-posts_index.html"
    assert by_url["/posts/"]["health_path"] == "/posts/"
    assert by_url["/my_notes.txt"]["image"].startswith("blog-my_notes.txt__")
    # Pages list what a browser fetches to render them; every route pre-summons.
    assert by_url["/"]["prefetch"] == by_url["/index.html"]["prefetch"] == ["/style.css", "/logo.svg"]
    assert "prefetch" not in by_url["/posts/"] and all(r["presummon"] is True for r in routes)
    assert (a / "routes" / "blog.toml").read_text().startswith(
        "# Generated by `summon routes split-site site --name blog`.")

    # Each image holds just its one resource, described in [resource].
    for rel, (data, _) in SITE.items():
        image = load_image(a / "images", by_url["/" + rel]["image"])
        assert tree(image.dir / "site") == {rel: data}
        res = image.manifest["resource"]
        assert res["url"] == "/" + rel and res["size"] == len(data)
        assert res["sha256"] == hashlib.sha256(data).hexdigest()
        assert image.target("unix")["health_path"] == "/" + rel
        image.verify("unix")


def test_summon_check_accepts_the_generated_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_site(tmp_path)
    assert split(tmp_path, "--host", "blog.example", "--idle-timeout", "2m", "--max-replicas", "3") == 0
    config = tmp_path / "summon.toml"
    config.write_text('include = ["routes/*.toml"]\n[images]\ndir = "images"\n')
    assert summon_main(["check", "-c", str(config)]) == 0
    assert f"ok: {len(SITE) + 2} routes ({len(SITE) + 2} summoned)" in capsys.readouterr().out
    loaded = load(config)
    for route in loaded.routes:
        assert route.host == "blog.example" and route.url is not None and route.path is None
        assert route.idle_timeout_s == 120 and route.max_replicas == 3 and route.health_path == route.url
        assert route.image is not None
        load_image(loaded.images_dir, route.image).verify("unix")
    assert summon_main(["routes", "list", "-c", str(config)]) == 0
    assert "blog:/posts/\tblog.example\turl /posts/\timage blog-posts_index.html" in capsys.readouterr().out


def test_prefix_mounts_the_site_below_a_path(tmp_path: Path) -> None:
    site = make_site(tmp_path)
    opts = SplitOptions(name="blog", images_dir=tmp_path / "images", routes_dir=tmp_path / "routes", prefix="/blog")
    result = split_site(site, opts)
    urls = {r.url for r in result.resources}
    assert "/blog/style.css" in urls and "/blog/posts/2025/deep.html" in urls
    index = next(r for r in result.resources if r.url == "/blog/index.html")
    assert index.aliases == ("/blog/",)
    assert (tmp_path / "images" / index.image / "site" / "blog" / "index.html").is_file()


def test_stale_images_are_removed_and_foreign_ones_kept(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    site = make_site(tmp_path)
    assert split(tmp_path) == 0
    (site / "feed.xml").unlink()
    other = tmp_path / "images" / "blog-other.css"  # generated for another site name
    shutil.copytree(tmp_path / "images" / "blog-style.css", other)
    manifest = other / "image.toml"
    manifest.write_text(manifest.read_text().replace('site = "blog"', 'site = "blog-other"'))
    assert split(tmp_path, "-q") == 0
    out = capsys.readouterr().out
    assert "removed stale image images/blog-feed.xml" in out
    assert not (tmp_path / "images" / "blog-feed.xml").exists()
    assert other.exists()  # another name's: untouched
    assert "/feed.xml" not in (tmp_path / "routes" / "blog.toml").read_text()
    # A hand-made image in the way is never overwritten.
    (site / "extra.html").write_text("x")
    (tmp_path / "images" / "blog-extra.html").mkdir()
    (tmp_path / "images" / "blog-extra.html" / "image.toml").write_text('name = "blog-extra.html"\n')
    with pytest.raises(ImageError, match="refusing to overwrite"):
        split_site(site, SplitOptions(name="blog", images_dir=tmp_path / "images", routes_dir=tmp_path / "routes"))
    assert (tmp_path / "images" / "blog-extra.html" / "image.toml").read_text() == 'name = "blog-extra.html"\n'


@pytest.mark.timeout(120)
def test_round_trip_every_file_through_summon(tmp_path: Path) -> None:
    make_site(tmp_path)
    assert split(tmp_path, "-q") == 0
    routes = (tmp_path / "routes" / "blog.toml").read_text()
    summon = Summon(tmp_path, routes, extra="[limits]\nmax_instances = 32\n").start()
    try:
        for rel, (data, ctype) in sorted(SITE.items()):
            urls = ["/" + rel]
            if rel.endswith("index.html"):
                urls.append("/" + rel.removesuffix("index.html"))
            for url in urls:
                status, headers, body = http_get(summon.port, url)
                assert (status, body) == (200, data), url
                assert headers.get("content-type") == ctype, (url, headers)
        # A URL of no file has no route: 404, and nothing is summoned for it.
        status, _, _ = http_get(summon.port, "/missing.html")
        assert status == 404
        summoned = {r["name"] for r in summon.status()["routes"] if r["instances"]}
        assert summoned == {"blog:/" + rel for rel in SITE} | {"blog:/", "blog:/posts/"}
        assert len(summon.instances()) == len(SITE) + 2
    finally:
        assert summon.stop() == 0




@pytest.mark.slow
@pytest.mark.vm
@pytest.mark.timeout(300)
@pytest.mark.skipif(bool(MISSING), reason=f"not installed: {', '.join(MISSING)}")
def test_vm_per_url_initramfs_holds_just_its_resource(tmp_path: Path) -> None:
    """--vm: every image gets a microVM (one shared kernel); booting one serves its resource."""
    import asyncio
    import gzip
    import tempfile
    import time
    import urllib.request

    from proxy.backends.base import InstanceSpec
    from proxy.backends.libvirt import LibvirtBackend, libvirt_available
    from proxy.config import Host, Route
    from tests.helpers.vm_images import libvirt_daemons_up

    libvirt_daemons_up()
    uri = "qemu:///system"
    reason = libvirt_available(uri)
    assert reason is None, reason
    root = Path(tempfile.mkdtemp(prefix="summon-split-vm-", dir="/var/tmp"))  # readable by libvirt-qemu
    try:
        root.chmod(0o755)
        site = root / "site"
        site.mkdir()
        (site / "feed.xml").write_bytes(SITE["feed.xml"][0])
        (site / "style.css").write_bytes(SITE["style.css"][0])
        opts = SplitOptions(name="vmsite", images_dir=root / "images", routes_dir=root / "routes", vm=True)
        split_site(site, opts, print)
        feed, css = (load_image(root / "images", n) for n in ("vmsite-feed.xml", "vmsite-style.css"))
        assert os.path.samefile(feed.path("x86_64", "kernel"), css.path("x86_64", "kernel"))  # one kernel copy
        cpio = gzip.decompress(feed.path("x86_64", "initrd").read_bytes())
        assert b"site/feed.xml" in cpio and b"style.css" not in cpio and b"etc/httpd.conf" in cpio
        feed.verify("x86_64")

        async def boot() -> tuple[int, str, bytes]:
            b = LibvirtBackend(uri, probe_kvm=True)
            route = Route(name="vmsite:/feed.xml", url="/feed.xml", image=feed.name, boot_timeout_s=90,
                          health_path="/feed.xml")
            h = await b.start(InstanceSpec("feed1", route, Host("local", "local", "libvirt", uri), feed))
            try:
                t0 = time.monotonic()
                while True:
                    try:
                        url = f"http://127.0.0.1:{h.address.port}/feed.xml"
                        r = await asyncio.to_thread(urllib.request.urlopen, url, None, 2)
                        with r:
                            return r.status, r.headers.get("Content-Type", ""), r.read()
                    except OSError:
                        if time.monotonic() - t0 > 90:
                            raise
                        await asyncio.sleep(0.1)
            finally:
                await b.stop(h)
                await b.close()

        status, ctype, body = asyncio.run(boot())
        assert (status, ctype, body) == (200, "application/xml", SITE["feed.xml"][0])
    finally:
        shutil.rmtree(root, ignore_errors=True)
