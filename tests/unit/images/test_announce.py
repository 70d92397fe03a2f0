"""Announcements and the edge's follower, without Redis or sockets: `due` with a fake clock,
the announcement's encoding, and `Follower.once` against a fake Redis client and a fetch
that serves another store's objects (one of them tampered with). The real thing (a
redis-server, two summon nodes) is tests/e2e/test_edge.py."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from proxy.config import Follow
from proxy.errors import ImageError
from proxy.images.announce import ANNOUNCED, Announcement, decode, due
from proxy.images.distribute import serve_object
from proxy.images.manifest import content_digest, load_image, read_manifest, write_manifest
from proxy.images.store import Store
from proxy.images.versions import plan_keep
from proxy.observe.events import Event
from proxy.runtime.follower import Follower
from tests.helpers.paths import REPO

V1, V2 = "sha256:" + "1" * 64, "sha256:" + "2" * 64


def ann(version: str, name: str = "decks") -> Announcement:
    return Announcement(name, version, ("http://centre:8081",), "centre", 10.0)


def test_due_pulls_what_is_new_and_retries_a_failure_only_after_retry_s() -> None:
    announced = {"decks": ann(V2)}
    assert due(announced, {"decks": V1}, {}, now=100.0, retry_s=30.0) == [ann(V2)]
    assert due(announced, {"decks": V2}, {}, now=100.0, retry_s=30.0) == []  # already followed
    assert due(announced, {"decks": None}, {("decks", V2): 90.0}, now=100.0, retry_s=30.0) == []
    assert due(announced, {"decks": None}, {("decks", V2): 60.0}, now=100.0, retry_s=30.0) == [ann(V2)]
    # a refused version never holds back a newer announcement
    assert due({"decks": ann(V1)}, {"decks": None}, {("decks", V2): 99.0}, now=100.0, retry_s=30.0) == [ann(V1)]


def test_an_announcement_round_trips_and_a_bad_one_is_an_image_error() -> None:
    a = ann(V1)
    assert decode("decks", a.encode().encode()) == a
    for raw in ("{", '{"version": "sha256:beef", "urls": ["http://x"]}', f'{{"version": "{V1}", "urls": []}}',
                f'{{"version": "{V1}"}}', "[]"):
        with pytest.raises(ImageError, match=ANNOUNCED.replace("{", r"\{").replace("}", r"\}")):
            decode("decks", raw)


# --- the follower ---------------------------------------------------------------------------


class FakeRedis:
    """HMGET over a dict; `down` makes it raise like a Redis that went away."""

    def __init__(self) -> None:
        self.hash: dict[str, str] = {}
        self.down = False

    async def hmget(self, key: str, names: list[str]) -> list[str | None]:
        assert key == ANNOUNCED
        if self.down:
            raise ConnectionError("redis went away")
        return [self.hash.get(n) for n in names]

    async def aclose(self) -> None:
        pass


def centre_version(tmp_path: Path, marker: str) -> tuple[Store, str]:
    images = tmp_path / "centre"
    if not (images / "decks").exists():
        shutil.copytree(REPO / "images" / "decks", images / "decks", ignore=shutil.ignore_patterns("build"))
    index = images / "decks" / "site" / "index.html"
    index.write_text(index.read_text().split("<!--v")[0] + f"<!--v {marker}-->")
    manifest = read_manifest(images / "decks")
    manifest["targets"]["unix"]["content_sha256"] = content_digest(images / "decks" / "site")
    write_manifest(images / "decks", manifest)
    image = load_image(images, "decks")
    store = Store(images / ".store")
    return store, store.put_version(image.manifest, image.dir)


def fetch_from(store: Store):  # type: ignore[no-untyped-def]
    def fetch(url: str, offset: int) -> tuple[int, bytes, int]:
        served = serve_object(store, url.split("8081", 1)[1], f"bytes={offset}-" if offset else None)
        return served.status, served.body, -1
    return fetch


def test_the_follower_takes_a_verified_version_and_refuses_a_tampered_one(tmp_path: Path) -> None:
    centre, v1 = centre_version(tmp_path, "one")
    redis, events = FakeRedis(), list[Event]()
    edge_images = tmp_path / "edge"
    clock = [1000.0]
    follower = Follower(Follow(("decks",), every_s=1.0, retry_s=30.0), edge_images / ".store", redis, events.append,
                        clock=lambda: clock[0], fetch=fetch_from(centre))
    assert asyncio.run(follower.once()) == []  # nothing announced
    redis.hash["decks"] = ann(v1).encode()
    assert asyncio.run(follower.once()) == [v1]
    assert load_image(edge_images, "decks").digest == v1  # the unpinned name now means v1 here
    assert [e.kind for e in events] == ["image_followed"] and events[0].detail["previous"] is None
    assert asyncio.run(follower.once()) == []  # followed already: nothing fetched again

    _, v2 = centre_version(tmp_path, "two")
    index_hex = next(h for rel, _s, h in centre.tree(centre.manifest(v2)["targets"]["unix"]["content_sha256"])
                     if rel == "index.html")
    centre.object_path(index_hex).write_bytes(b"<html>tampered</html>")
    redis.hash["decks"] = ann(v2).encode()
    assert asyncio.run(follower.once()) == []
    assert events[-1].kind == "image_refused" and events[-1].image_digest == v2
    assert "does not match" in events[-1].detail["error"]
    edge = Store(edge_images / ".store")
    assert edge.followed("decks") == v1 and not edge.has(v2)
    assert load_image(edge_images, "decks").digest == v1
    n = len(events)
    assert asyncio.run(follower.once()) == [] and len(events) == n  # not again before retry_s
    redis.down = True
    clock[0] += 60
    assert asyncio.run(follower.once()) == [] and len(events) == n and follower.down  # Redis away: keep v1
    redis.down = False
    assert asyncio.run(follower.once()) == [] and events[-1].kind == "image_refused"  # retried, still bad
    assert plan_keep(edge, set(), set(), keep=1) == [v1]  # gc keeps the followed version


def test_a_followed_version_is_what_the_unpinned_name_means_even_beside_a_recipe(tmp_path: Path) -> None:
    centre, v1 = centre_version(tmp_path, "one")
    images = tmp_path / "centre"
    _, v2 = centre_version(tmp_path, "two")  # the recipe is at v2 now
    assert load_image(images, "decks").digest == v2
    centre.set_followed("decks", v1)
    got = load_image(images, "decks")
    assert got.digest == v1 and b"<!--v one-->" in (got.dir / "site" / "index.html").read_bytes()
    (centre.followed_dir / "decks").write_text("garbage\n")  # a damaged pointer is no pointer
    assert load_image(images, "decks").digest == v2
