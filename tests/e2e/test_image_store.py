"""The image store and rebuilds for real: Debian's kernel and busybox, `summon images ...`
as a user runs it, and a `summon serve` answering from a pinned older version.

Needs linux-image-cloud-amd64 and busybox-static (scripts/setup.sh installs them); a
build takes about a second, so the module is marked slow only for the serve test.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from proxy.images.manifest import content_digest, load_image, manifest_digest, read_manifest_file
from proxy.images.store import Store
from tests.helpers.paths import REPO
from tests.helpers.summon_proc import SUMMON, Summon, http_get

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(240),
    pytest.mark.skipif(not list(Path("/boot").glob("vmlinuz-*-cloud-amd64")) or not Path("/bin/busybox").is_file(),
                       reason="linux-image-cloud-amd64 or busybox-static not installed"),
]


def summon(cwd: Path, *argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full = dict(os.environ, PYTHONPATH=str(REPO))
    full.pop("SOURCE_DATE_EPOCH", None)  # only what a test sets
    full.update(env or {})
    return subprocess.run([*SUMMON, "images", *argv], cwd=cwd, env=full, capture_output=True, text=True, timeout=180)


def checkout(root: Path) -> Path:
    """A fresh copy of what git holds of images/decks (no build/, no store)."""
    shutil.copytree(REPO / "images" / "decks", root / "images" / "decks", ignore=shutil.ignore_patterns("build"))
    return root


def built(root: Path) -> dict:  # type: ignore[type-arg]
    return read_manifest_file(root / "images" / "decks" / "build" / "image.toml")


def test_two_fresh_checkouts_build_and_rebuild_bit_for_bit(tmp_path: Path) -> None:
    a, b = checkout(tmp_path / "a"), checkout(tmp_path / "b")
    for root in (a, b):
        r = summon(root, "build", "decks")
        assert r.returncode == 0, r.stderr
    ma, mb = built(a), built(b)
    assert manifest_digest(ma) == manifest_digest(mb)
    for key in (kernel_file(ma), "initrd.cpio.gz"):
        assert (a / "images/decks/build" / key).read_bytes() == (b / "images/decks/build" / key).read_bytes()
    for root in (a, b):
        for _ in range(2):
            r = summon(root, "rebuild", "decks", "--check")
            assert r.returncode == 0, r.stdout + r.stderr
            assert f"ok: decks@{manifest_digest(ma)} rebuilds bit for bit" in r.stdout
            assert "same     initrd sha256:" + ma["targets"]["x86_64"]["initrd_sha256"] in r.stdout
    # the same inputs again: no new object, and build/ holds the store's files, not copies
    store = Store(a / "images" / ".store")
    before = sorted(p.name for p in store.objects.iterdir())
    assert summon(a, "build", "decks").returncode == 0
    assert sorted(p.name for p in store.objects.iterdir()) == before
    kernel = store.object_path(ma["targets"]["x86_64"]["kernel_sha256"])
    assert (a / "images/decks/build" / kernel_file(ma)).stat().st_ino == kernel.stat().st_ino
    assert len(store.builds("decks")) == 2 and len({x.digest for x in store.builds("decks")}) == 1


def kernel_file(manifest: dict) -> str:
    """The built kernel's file name (vmlinuz, or vmlinux for a PVH entry), as the manifest says."""
    return Path(manifest["targets"]["x86_64"]["kernel"]).name


def test_check_names_a_changed_package_version_and_refuses(tmp_path: Path) -> None:
    root = checkout(tmp_path)
    assert summon(root, "build", "decks").returncode == 0
    installed = built(root)["build"]["packages"]["busybox-static"]
    text = (root / "images/decks/build/image.toml").read_text()
    changed = tmp_path / "changed.toml"
    changed.write_text(text.replace(f'busybox-static = "{installed}"', 'busybox-static = "1:0.1-1"'))
    assert changed.read_text() != text
    r = summon(root, "rebuild", "decks", "--manifest", str(changed), "--check")
    assert r.returncode == 3, r.stdout + r.stderr
    assert (f"busybox-static 1:0.1-1 is recorded but can no longer be installed; would use {installed} instead"
            in r.stderr)
    assert "refused:" in r.stderr and "--allow-substitutes" in r.stderr
    r = summon(root, "rebuild", "decks", "--manifest", str(changed), "--check", "--allow-substitutes")
    assert r.returncode == 1 and "SUBSTITUTED" in r.stdout and "only with substituted packages" in r.stdout


def test_a_changed_site_is_rebuilt_from_the_store_and_a_lost_kernel_restored(tmp_path: Path) -> None:
    root = checkout(tmp_path)
    assert summon(root, "build", "decks").returncode == 0
    m = built(root)
    (root / "images/decks/site/index.html").write_text("edited after the build")
    (root / "images/decks/build" / kernel_file(m)).unlink()
    r = summon(root, "rebuild", "decks")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "from the image store" in r.stdout and "restored" in r.stdout
    assert (root / "images/decks/build" / kernel_file(m)).is_file()
    assert built(root) == m


def test_source_date_epoch_is_recorded_and_honoured_by_the_rebuild(tmp_path: Path) -> None:
    zero, epoch = checkout(tmp_path / "zero"), checkout(tmp_path / "epoch")
    assert summon(zero, "build", "decks").returncode == 0
    r = summon(epoch, "build", "decks", env={"SOURCE_DATE_EPOCH": "1700000000"})
    assert r.returncode == 0, r.stderr
    mz, me = built(zero), built(epoch)
    assert me["build"]["source_date_epoch"] == 1700000000 and mz["build"]["source_date_epoch"] == 0
    assert me["targets"]["x86_64"]["initrd_sha256"] != mz["targets"]["x86_64"]["initrd_sha256"]
    r = summon(epoch, "rebuild", "decks", "--check")  # no SOURCE_DATE_EPOCH now: the recorded one is used
    assert r.returncode == 0, r.stdout + r.stderr
    bad = summon(epoch, "build", "decks", env={"SOURCE_DATE_EPOCH": "yesterday"})
    assert bad.returncode == 2 and "SOURCE_DATE_EPOCH='yesterday'" in bad.stderr


def test_busybox_from_the_recorded_deb_rebuilds_the_same(tmp_path: Path) -> None:
    """The package path a fresh machine takes: `apt-get download` + `dpkg-deb -x`."""
    from proxy.errors import ImageError
    from proxy.images.build import package_version
    from proxy.images.rebuild import rebuild

    root = checkout(tmp_path)
    assert summon(root, "build", "decks").returncode == 0
    m = built(root)
    try:
        out = rebuild(m, root / "images/decks", Store(root / "images/.store"), tmp_path / "work",
                      installed=lambda p: "unknown" if p == "busybox-static" else package_version(p))
    except ImageError as exc:
        if "apt-get download" in str(exc):
            pytest.skip(f"no Debian mirror reachable: {exc}")
        raise
    if out.unavailable:
        pytest.skip(f"apt no longer offers it: {out.unavailable}")
    assert any("busybox-static" in line and "unpacked from" in line for line in out.lines), out.lines
    assert out.identical, out.differences


def test_serve_answers_a_pinned_older_version_from_the_store(tmp_path: Path) -> None:
    root = checkout(tmp_path)
    images = root / "images"
    assert summon(root, "build", "decks").returncode == 0
    v1 = load_image(images, "decks").digest
    about = images / "decks/site/about.html"
    about.write_text("<h1>version two</h1>\n")
    recipe = images / "decks/image.toml"
    old = read_manifest_file(recipe)["targets"]["unix"]["content_sha256"]
    recipe.write_text(recipe.read_text().replace(old, content_digest(images / "decks/site")))
    assert summon(root, "build", "decks").returncode == 0
    v2 = load_image(images, "decks").digest
    assert v1 != v2
    routes = (f'[[route]]\nname = "old"\nhost = "old"\npath = "/"\nimage = "decks@{v1}"\n'
              f'[[route]]\nname = "new"\nhost = "new"\npath = "/"\nimage = "decks"\n')
    s = Summon(root, routes).start()
    try:
        status, _, body = http_get(s.port, "/about.html", host="old")
        assert status == 200 and b"version two" not in body and b"<" in body
        status, _, body = http_get(s.port, "/about.html", host="new")
        assert status == 200 and body == b"<h1>version two</h1>\n"
        running = {r["name"]: len(r["instances"]) for r in s.status()["routes"]}
        assert running == {"old": 1, "new": 1}, running
    finally:
        s.stop()
    time.sleep(0.2)
    r = summon(root, "history", "decks", "-c", str(s.config))
    assert r.returncode == 0, r.stderr
    rows = {line.split()[3][:24]: line for line in r.stdout.splitlines()[1:]}
    assert "pinned by old" in rows[v1[:24]] and "(1 instance(s))" in rows[v1[:24]]
    assert "[current]" in rows[v2[:24]] and "(1 instance(s))" in rows[v2[:24]]
    r = summon(root, "gc", "-c", str(s.config), "--keep", "1")
    assert r.returncode == 0 and "removed 0 object(s)" in r.stdout and f"kept {v1} (pinned)" in r.stdout


def test_pull_between_two_summon_nodes(tmp_path: Path) -> None:
    """Node a builds and serves; node b has no recipe and no builder, pulls the version
    through a's admin API, and serves a route pinned to it. A tampered object on a's side
    is refused by a third puller, which is left without the version."""
    a = checkout(tmp_path / "a")
    assert summon(a, "build", "decks").returncode == 0
    version = load_image(a / "images", "decks").digest
    b, c = tmp_path / "b", tmp_path / "c"
    for d in (b, c):
        (d / "images").mkdir(parents=True)
    node_a = Summon(a, '[[route]]\nname = "site"\npath = "/"\nimage = "decks"\n').start()
    try:
        source = f"http://127.0.0.1:{node_a.admin_port}"
        r = summon(b, "pull", f"decks@{version}", "--from", source)
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"pulled decks@{version}" in r.stdout and "every digest checked" in r.stdout
        node_b = Summon(b, f'[[route]]\nname = "site"\npath = "/"\nimage = "decks@{version}"\n').start()
        try:
            status, _, body = http_get(node_b.port, "/about.html")
            assert status == 200 and body == (a / "images/decks/site/about.html").read_bytes()
        finally:
            node_b.stop()
        store_a = Store(a / "images" / ".store")
        site = store_a.tree(store_a.manifest(version)["targets"]["unix"]["content_sha256"])
        victim = store_a.object_path(site[0][2])
        victim.write_bytes(victim.read_bytes() + b"<script>evil()</script>")
        r = summon(c, "pull", f"decks@{version}", "--from", source)
        assert r.returncode == 1 and "refused" in r.stderr, r.stdout + r.stderr
        assert not Store(c / "images" / ".store").has(version)
        r = subprocess.run([*SUMMON, "check", "-c", str(_config_pinning(c, version))], cwd=c, capture_output=True,
                           text=True, timeout=60, env=dict(os.environ, PYTHONPATH=str(REPO)))
        assert r.returncode == 2 and "does not hold" in r.stderr, r.stdout + r.stderr
    finally:
        node_a.stop()


def _config_pinning(root: Path, version: str) -> Path:
    s = Summon(root, f'[[route]]\nname = "site"\npath = "/"\nimage = "decks@{version}"\n')
    return s.config
