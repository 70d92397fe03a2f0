"""An edge behind NAT and the centre, through a real redis-server: two `summon serve` on loopback.

The centre holds the images (its store answers ``GET /images/sha256/<hex>`` on its admin
address) and announces versions in the cluster's Redis (`summon images announce`); the
edge follows the image (``[images] follow``), pulls each announced version by digest,
verifies it and only then runs it. Then the centre goes away (Redis and its proxy
stopped) while the edge serves: nothing fails, cold boots stay within the edge's local
share, and the edge's events reach the fleet's stream once Redis is back. Instances are
processes (the process backend): what is tested is the edge, not the VM."""

from __future__ import annotations

import csv
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.images.manifest import content_digest, load_image, read_manifest, write_manifest
from proxy.images.store import Store
from tests.helpers.paths import REPO
from tests.helpers.redis_server import RedisServer
from tests.helpers.summon_proc import SUMMON, Summon, http_get, wait_for

pytestmark = pytest.mark.slow

VENV_BIN = Path(sys.executable).parent


def write_config(s: Summon, node: str, region: str, redis_url: str, images: Path, extra_images: str = "",
                 routes: str = "") -> None:
    s.config.write_text(
        f'[proxy]\nlisten = "127.0.0.1:{s.port}"\nadmin = "127.0.0.1:{s.admin_port}"\ndrain_timeout = "5s"\n'
        f'trusted_proxies = ["127.0.0.0/8"]\n\n[limits]\nmax_instances = 4\n\n'
        f'[[region]]\nname = "centre"\nnearest = ["edge"]\n[[region]]\nname = "edge"\nnearest = ["centre"]\n\n'
        f'[cluster]\nredis = "{redis_url}"\nnode = "{node}"\nregion = "{region}"\nlease = "2s"\nlocal_share = 1\n\n'
        f'[images]\ndir = "{images}"\n{extra_images}\n[events]\npath = "events.db"\n\n'
        f'[[host]]\nname = "host-{node}"\nregion = "{region}"\nbackend = "process"\nslots = 4\n\n{routes}\n')


EDGE_ROUTE = """[[route]]
name = "decks"
host = "*"
path = "/"
image = "decks"
idle_timeout = "2s"
boot_timeout = "10s"
max_replicas = 2
"""


def local_events(s: Summon, kind: str | None = None) -> list[dict]:
    with sqlite3.connect(s.events) as c:
        rows = c.execute("select ts, kind, image_digest, detail from events order by id").fetchall()
    return [{"ts": ts, "kind": k, "image_digest": d, "detail": json.loads(det or "{}")} for ts, k, d, det in rows
            if kind is None or k == kind]


def set_marker(image_dir: Path, marker: str) -> str:
    """A new version of the site (its index page carries `marker`); returns the recipe's digest."""
    index = image_dir / "site" / "index.html"
    text = index.read_text()
    start = text.find("<!-- v:")
    if start >= 0:
        text = text[:start] + text[text.index("-->", start) + 3:]
    index.write_text(text.replace("</body>", f"<!-- v:{marker} --></body>"))
    manifest = read_manifest(image_dir)
    manifest["targets"]["unix"]["content_sha256"] = content_digest(image_dir / "site")
    write_manifest(image_dir, manifest)
    return load_image(image_dir.parent, image_dir.name).digest


def summon_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SUMMON, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))


def stream_entries(redis: RedisServer, key: str) -> list[dict[str, str]]:
    import redis as redis_py

    client = redis_py.Redis(port=redis.port, socket_timeout=5, decode_responses=True)
    try:
        return [fields for _id, fields in client.xrange(key, "-", "+")]
    finally:
        client.close()


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


class Pair:
    """The centre (holds and announces decks, serves no route) and an edge that follows decks."""

    def __init__(self, tmp: Path, redis: RedisServer) -> None:
        self.centre_images = tmp / "centre-images"
        self.centre_images.mkdir()
        shutil.copytree(REPO / "images" / "decks", self.centre_images / "decks", ignore=shutil.ignore_patterns("build"))
        (tmp / "centre").mkdir()
        (tmp / "edge").mkdir()
        self.centre = Summon(tmp / "centre", "")
        write_config(self.centre, "centre", "centre", redis.url, self.centre_images)
        self.edge_images = tmp / "edge-images"  # empty: the edge builds nothing and has no recipe
        self.edge_images.mkdir()
        self.edge = Summon(tmp / "edge", "")
        write_config(self.edge, "edge", "edge", redis.url, self.edge_images,
                     'follow = ["decks"]\nfollow_every = "200ms"\nfollow_retry = "1h"\n', EDGE_ROUTE)
        self.edge_store = Store(self.edge_images / ".store")

    def start(self) -> Pair:
        self.centre.start()
        self.edge.start()
        return self

    def stop(self) -> None:
        self.edge.stop()
        self.centre.stop()

    def announce(self, *extra: str) -> str:
        out = summon_cli("images", "announce", "decks", "-c", str(self.centre.config), *extra)
        assert out.returncode == 0, out.stderr
        return out.stdout

    def followed(self, version: str) -> bool:
        return any(e["image_digest"] == version for e in local_events(self.edge, "image_followed"))


def test_the_edge_pulls_each_announced_version_verifies_it_and_refuses_a_tampered_one(
        tmp_path: Path, redis: RedisServer) -> None:
    pair = Pair(tmp_path, redis).start()
    try:
        # nothing announced yet: the edge has no version of decks to run
        assert http_get(pair.edge.port, "/", timeout=30)[0] == 503
        v1 = set_marker(pair.centre_images / "decks", "one")
        assert f"decks@{v1}" in pair.announce()
        assert wait_for(lambda: pair.followed(v1), timeout=20), local_events(pair.edge)
        assert pair.edge_store.followed("decks") == v1
        # (the boot that failed for want of a version backs the route off for a second)
        status, _, body = wait_for(lambda: (r := http_get(pair.edge.port, "/", timeout=30))[0] == 200 and r,
                                   timeout=10, step=0.3) or (0, {}, b"")
        assert status == 200 and b"<!-- v:one -->" in body
        (inst,) = pair.edge.instances()
        assert inst["node"] == "edge"
        followed = local_events(pair.edge, "image_followed")[-1]["detail"]
        assert followed["from"] == f"http://127.0.0.1:{pair.centre.admin_port}" and followed["bytes"] > 2_000

        # a second version: the next boot on the edge runs it (the running instance idles out first)
        v2 = set_marker(pair.centre_images / "decks", "two")
        pair.announce()
        assert wait_for(lambda: pair.followed(v2), timeout=20)
        assert wait_for(lambda: not pair.edge.instances(), timeout=20), "the v1 instance idles out"
        status, _, body = http_get(pair.edge.port, "/", timeout=30)
        assert status == 200 and b"<!-- v:two -->" in body

        # a third whose site file was tampered with in the centre's store after it was stored
        d3 = pair.centre_images / "decks"
        v3 = set_marker(d3, "three")
        centre_store = Store(pair.centre_images / ".store")
        image = load_image(pair.centre_images, "decks")
        centre_store.put_version(image.manifest, image.dir)
        index_hex = next(h for rel, _s, h in centre_store.tree(image.manifest["targets"]["unix"]["content_sha256"])
                         if rel == "index.html")
        obj = centre_store.object_path(index_hex)
        obj.write_bytes(obj.read_bytes().replace(b"<!-- v:three -->", b"<!-- v:evil! -->"))
        pair.announce()
        assert wait_for(lambda: local_events(pair.edge, "image_refused"), timeout=20)
        refused = local_events(pair.edge, "image_refused")[-1]
        assert refused["image_digest"] == v3 and "does not match" in refused["detail"]["error"]
        assert pair.edge_store.followed("decks") == v2  # still the last good version
        assert not pair.edge_store.has(v3) and not pair.edge_store.version_dir(v3).exists()
        assert not pair.followed(v3)
        assert wait_for(lambda: not pair.edge.instances(), timeout=20)
        status, _, body = http_get(pair.edge.port, "/", timeout=30)
        assert status == 200 and b"<!-- v:two -->" in body and b"evil" not in body
        # the announcements are the fleet's record too
        versions = [e["version"] for e in stream_entries(redis, "{summon}:images:announces")]
        assert versions == [v1, v2, v3]
    finally:
        pair.stop()


def test_announce_without_a_cluster_or_with_a_bad_url_is_refused_clearly(tmp_path: Path) -> None:
    images = tmp_path / "images"
    shutil.copytree(REPO / "images" / "decks", images / "decks", ignore=shutil.ignore_patterns("build"))
    cfg = tmp_path / "summon.toml"
    cfg.write_text(f'[images]\ndir = "{images}"\n')
    out = summon_cli("images", "announce", "decks", "-c", str(cfg))
    assert out.returncode == 2 and "[cluster] redis" in out.stderr
    cfg.write_text(f'[cluster]\nredis = "redis://127.0.0.1:1/0"\nnode = "c"\n[images]\ndir = "{images}"\n')
    out = summon_cli("images", "announce", "decks", "-c", str(cfg), "--url", "ftp://centre")
    assert out.returncode == 2 and "--url" in out.stderr and "ftp://centre" in out.stderr


def _edge_with_decks(tmp_path: Path, redis: RedisServer) -> Pair:
    pair = Pair(tmp_path, redis).start()
    v1 = set_marker(pair.centre_images / "decks", "one")
    pair.announce()
    assert wait_for(lambda: pair.followed(v1), timeout=20)
    assert http_get(pair.edge.port, "/", timeout=30)[0] == 200
    return pair


def _stop_centre(pair: Pair, redis: RedisServer) -> float:
    t = time.time()
    redis.stop()
    pair.centre.stop()
    return t


def test_with_the_centre_gone_the_edge_serves_on_and_its_events_reach_the_fleet_log_afterwards(
        tmp_path: Path, redis: RedisServer) -> None:
    pair = _edge_with_decks(tmp_path, redis)
    try:
        results: list[int] = []
        errors: list[str] = []
        stop_at = time.time() + 6.0

        def client() -> None:
            while time.time() < stop_at:
                try:
                    results.append(http_get(pair.edge.port, "/", timeout=30)[0])
                except OSError as exc:
                    errors.append(repr(exc))
                time.sleep(0.02)

        threads = [threading.Thread(target=client) for _ in range(3)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        gone = _stop_centre(pair, redis)  # mid-run, while the edge serves warm requests
        for t in threads:
            t.join(60)
        assert results and set(results) == {200} and not errors, ({s: results.count(s) for s in set(results)},
                                                                   errors[:3])
        assert pair.edge.status()["totals"]["cluster"]["degraded"]
        # cold: the instance idles out, the next request boots one within the local share
        assert wait_for(lambda: not pair.edge.instances(), timeout=20)
        status, _, body = http_get(pair.edge.port, "/about.html", timeout=30)
        assert status == 200
        assert http_get(pair.edge.port, "/", timeout=30)[0] == 200  # and warm again
        assert len(pair.edge.instances()) == 1
        def away() -> set[str]:  # the local log is written a moment after the fact
            return {e["kind"] for e in local_events(pair.edge) if e["ts"] >= gone}
        assert wait_for(lambda: {"store_down", "stopped", "summoned", "ready"} <= away(), timeout=5), away()

        redis.start()  # the centre returns (an empty Redis: nothing persisted)
        back = time.time()

        def shipped() -> list[dict[str, str]]:
            return [e for e in stream_entries(redis, "{summon}:events")
                    if e["node"] == "edge" and float(e["ts"]) >= gone]
        assert wait_for(lambda: {"store_down", "ready", "stopped", "store_back"} <= {e["kind"] for e in shipped()},
                        timeout=20), [e["kind"] for e in shipped()]
        assert time.time() - back < 20
        kinds = [e["kind"] for e in shipped()]
        # in order and each once: the queue is sent from where it stopped
        local = [e["kind"] for e in local_events(pair.edge) if e["ts"] >= gone]
        assert kinds == local[: len(kinds)], (kinds, local)
        assert wait_for(lambda: not pair.edge.status()["totals"]["cluster"]["degraded"], timeout=10)
    finally:
        pair.stop()


def test_a_locust_run_against_the_edge_with_the_centre_stopped_has_no_failure(
        tmp_path: Path, redis: RedisServer) -> None:
    pair = _edge_with_decks(tmp_path, redis)
    try:
        _stop_centre(pair, redis)
        assert wait_for(lambda: not pair.edge.instances(), timeout=20), "cold at the start of the run"
        out = tmp_path / "locust"
        out.mkdir()
        cmd = [str(VENV_BIN / "locust"), "-f", str(REPO / "loadtests" / "locustfile.py"), "--headless",
               "--host", f"http://127.0.0.1:{pair.edge.port}", "--csv", str(out / "edge"), "--only-summary",
               "--loglevel", "WARNING", "--spike-profile", "tiny", "--region-weights", "edge=1",
               "--tail-s", "1"]
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=REPO / "loadtests")
        with (out / "edge_stats.csv").open() as f:
            rows = list(csv.DictReader(f))
        total = next(r for r in rows if r["Name"] == "Aggregated")
        print(f"locust against the edge, centre stopped: {total['Request Count']} requests, "
              f"{total['Failure Count']} failed, median {total['Median Response Time']} ms")
        assert int(total["Request Count"]) > 20, run.stderr[-2000:]
        assert int(total["Failure Count"]) == 0, (out / "edge_failures.csv").read_text()
        def readies() -> int:  # a cold boot during the run, on the edge (and the one before)
            return [e["kind"] for e in local_events(pair.edge)].count("ready")
        assert wait_for(lambda: readies() >= 2, timeout=5)
        assert "store_down" in [e["kind"] for e in local_events(pair.edge)]
        assert pair.edge.status()["totals"]["cluster"]["degraded"]
    finally:
        pair.stop()
