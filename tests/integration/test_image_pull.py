"""Pulling an image version from another node's admin API on 127.0.0.1: every digest
checked, cut downloads resumed with Range, tampered or truncated objects refused with
nothing of the version usable."""

from __future__ import annotations

import asyncio
import shutil
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.config import Address
from proxy.errors import ImageError
from proxy.images.distribute import http_fetch, pull
from proxy.images.manifest import load_image, manifest_digest, read_manifest, write_built_manifest
from proxy.images.store import Build, Store
from proxy.observe.admin import AdminServer
from tests.helpers.paths import REPO

KERNEL = bytes(range(256)) * 400  # 100 KiB: big enough to be cut midway


def built_version(images: Path) -> str:
    """A build of decks with a made-up kernel, in images/.store (as `summon images build` leaves it)."""
    d = images / "decks"
    shutil.copytree(REPO / "images" / "decks", d, ignore=shutil.ignore_patterns("build"))
    store = Store(images / ".store")
    (d / "build").mkdir()
    (d / "build" / "vmlinuz").write_bytes(KERNEL)
    h = store.put_file(d / "build" / "vmlinuz")
    recipe = read_manifest(d)
    built = read_manifest(d)
    built["targets"]["x86_64"] = {"kernel": "build/vmlinuz", "kernel_sha256": h}
    built["build"] = {"recipe_digest": manifest_digest(recipe)}
    version = store.put_version(built, d)
    write_built_manifest(d, built)
    store.record(Build("decks", version, manifest_digest(recipe), 1.0))
    return version


@pytest.fixture
def node(tmp_path: Path) -> Iterator[tuple[str, Path, str]]:
    """(admin URL, the serving node's images dir, the version it holds)."""
    images = tmp_path / "a" / "images"
    version = built_version(images)
    loop = asyncio.new_event_loop()
    admin = AdminServer(Address("127.0.0.1", 0), status=lambda: {}, events=lambda n, r: [],
                        metrics=lambda: (b"", "text/plain"), images_store=images / ".store")
    loop.run_until_complete(admin.start())
    assert admin.server is not None
    port = admin.server.sockets[0].getsockname()[1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}", images, version
    finally:
        loop.call_soon_threadsafe(admin.close)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def get(url: str, range_: str | None = None) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, headers={"Range": range_} if range_ else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def test_pull_verifies_and_the_version_is_servable_on_the_puller(node: tuple[str, Path, str], tmp_path: Path) -> None:
    url, _, version = node
    mine = tmp_path / "b" / "images"  # an edge node: no recipe, no builder, an empty store
    got = pull(url, "decks", version, Store(mine / ".store"), http_fetch(None))
    assert got.version == version and got.objects >= 3 and got.bytes > len(KERNEL)
    image = load_image(mine, f"decks@{version}")  # found in the store without images/decks/
    image.verify("x86_64")
    image.verify("unix")
    assert image.path("x86_64", "kernel").read_bytes() == KERNEL
    assert [b.how for b in Store(mine / ".store").builds("decks")] == ["pull"]
    again = pull(url, "decks", version, Store(mine / ".store"), http_fetch(None))  # idempotent
    assert again.version == version


def test_objects_are_served_with_ranges(node: tuple[str, Path, str]) -> None:
    url, images, version = node
    kernel = Store(images / ".store").manifest(version)["targets"]["x86_64"]["kernel_sha256"]
    status, headers, body = get(f"{url}/images/sha256/{kernel}")
    assert status == 200 and body == KERNEL and headers["Accept-Ranges"] == "bytes"
    status, headers, body = get(f"{url}/images/sha256/{kernel}", "bytes=10-19")
    assert status == 206 and body == KERNEL[10:20] and headers["Content-Range"] == f"bytes 10-19/{len(KERNEL)}"
    status, _, body = get(f"{url}/images/sha256/{kernel}", "bytes=-5")
    assert status == 206 and body == KERNEL[-5:]
    status, headers, _ = get(f"{url}/images/sha256/{kernel}", f"bytes={len(KERNEL)}-")
    assert status == 416 and headers["Content-Range"] == f"bytes */{len(KERNEL)}"
    assert get(f"{url}/images/sha256/{'0' * 64}")[0] == 404
    assert get(f"{url}/images/sha256/../../etc/passwd")[0] == 404
    status, _, body = get(f"{url}/images/sha256/{version.removeprefix('sha256:')}")
    assert status == 200 and body.startswith(b"{")


def test_a_cut_download_is_resumed_with_a_range(node: tuple[str, Path, str], tmp_path: Path) -> None:
    url, _, version = node
    real = http_fetch(None)
    cuts: list[str] = []

    def flaky(u: str, offset: int) -> tuple[int, bytes, int]:
        status, body, size = real(u, offset)
        if offset == 0 and len(body) == len(KERNEL):
            cuts.append(u)
            return status, body[: len(body) // 3], size  # the connection drops a third of the way in
        return status, body, size

    got = pull(url, "decks", version, Store(tmp_path / "b"), flaky)
    assert cuts and got.version == version
    assert Store(tmp_path / "b").read_object(Store(tmp_path / "b").manifest(version)["targets"]["x86_64"]
                                             ["kernel_sha256"]) == KERNEL


@pytest.mark.parametrize("damage", ["tampered", "truncated"])
def test_a_damaged_artefact_is_refused_and_nothing_of_it_is_used(node: tuple[str, Path, str], tmp_path: Path,
                                                                   damage: str) -> None:
    url, images, version = node
    served = Store(images / ".store")
    obj = served.object_path(served.manifest(version)["targets"]["x86_64"]["kernel_sha256"])
    obj.write_bytes(KERNEL[:-1] + b"\x00" if damage == "tampered" else KERNEL[: len(KERNEL) // 2])
    mine = Store(tmp_path / "b" / "images" / ".store")
    with pytest.raises(ImageError, match="does not match its digest .*refused"):
        pull(url, "decks", version, mine, http_fetch(None))
    assert not mine.has(version), "the version is not in the puller's store"
    assert all(p.read_bytes() != obj.read_bytes() for p in mine.objects.glob("*")), "no damaged kernel kept"
    with pytest.raises(ImageError, match="does not hold"):
        load_image(tmp_path / "b" / "images", f"decks@{version}")


def test_pull_refuses_a_version_of_another_image(node: tuple[str, Path, str], tmp_path: Path) -> None:
    url, _, version = node
    with pytest.raises(ImageError, match="is a version of 'decks', not 'blog'"):
        pull(url, "blog", version, Store(tmp_path / "b"), http_fetch(None))
