"""Three summon proxies, one fleet, through a real redis-server: the #16 scenarios.

Each proxy is a real `summon serve` with its own node name, region, event log and process
host; all share one images directory and one Redis. Instances are processes on loopback,
so every proxy can reach every instance."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.helpers.redis_server import RedisServer
from tests.helpers.summon_proc import BUSYBOX, Summon, http_get, make_image, wait_for

pytestmark = pytest.mark.slow

REGIONS = ("eu", "us-east", "us-west")
SLOW_SITE = ["sh", "-c", "sleep 0.5; exec busybox httpd -f -p 127.0.0.1:{port} -h {dir}/site"]


def config(s: Summon, node: str, region: str, redis_url: str, cap: int, routes: str, lease: str = "2s",
           workers: int = 1) -> None:
    regions = "".join(f'[[region]]\nname = "{r}"\nnearest = {json.dumps([x for x in REGIONS if x != r])}\n\n'
                      for r in REGIONS)
    s.config.write_text(
        f'[proxy]\nlisten = "127.0.0.1:{s.port}"\nadmin = "127.0.0.1:{s.admin_port}"\ndrain_timeout = "5s"\n'
        f'trusted_proxies = ["127.0.0.0/8"]\nworkers = {workers}\n'
        # bursts of 150 clients on two cores: summon's own overload shedding (its own tests)
        # would turn some away with a reset, and these tests count every answer
        f'shed_overload = false\n\n'
        f'[limits]\nmax_instances = {cap}\n\n{regions}'
        f'[cluster]\nredis = "{redis_url}"\nnode = "{node}"\nregion = "{region}"\nlease = "{lease}"\n\n'
        f'[images]\ndir = "{s.tmp.parent / "images"}"\n[events]\npath = "events.db"\n\n'
        f'[[host]]\nname = "host-{node}"\nregion = "{region}"\nbackend = "process"\nslots = 16\n\n{routes}\n')


def route(name: str, image: str, host: str = "*", target: int = 1000, max_replicas: int = 4,
          idle: str = "60s", max_conns: int = 32) -> str:
    return (f'[[route]]\nname = "{name}"\nhost = "{host}"\npath = "/"\nimage = "{image}"\nidle_timeout = "{idle}"\n'
            f'boot_timeout = "10s"\ntarget_concurrency = {target}\nmax_replicas = {max_replicas}\n'
            f'max_conns = {max_conns}\n\n')


# A burst of hundreds of requests on one busybox instance: busybox httpd listens with a
# backlog of 9, and max_conns holds per worker process, so three proxies of two workers at
# the default 32 open ~190 connections at once; the SYNs it drops come back after 1, 3, 7,
# 15 s, past any sane client timeout on a loaded machine. An operator with such an upstream
# sets max_conns low, and the burst waits in the proxies instead.
BURST_CONNS = 1  # six workers: six connections at once, within the backlog


class Fleet:
    def __init__(self, tmp: Path, redis: RedisServer, cap: int, routes: str, lease: str = "2s",
                 workers: int = 1) -> None:
        self.images = tmp / "images"
        self.proxies: list[Summon] = []
        for node, region in zip(("eu-1", "east-1", "west-1"), REGIONS, strict=True):
            d = tmp / node
            d.mkdir()
            s = Summon(d, "")
            config(s, node, region, redis.url, cap, routes, lease, workers)
            self.proxies.append(s)

    def start(self) -> Fleet:
        for s in self.proxies:
            s.start()
        return self

    def stop(self) -> None:
        for s in self.proxies:
            s.stop()

    def instance_pids(self) -> list[int]:
        """Instance processes (children of a summon proxy), not busybox's per-connection ones.
        Read from /proc in this process: sampled every few ms, a pgrep per sample would load
        the machine enough for summon's overload watch to start shedding."""
        procs = _processes()
        configs = [str(s.config) for s in self.proxies]
        owners = {pid for pid, (_, cmd) in procs.items() if any(c in cmd for c in configs)}
        images = str(self.images)
        return [pid for pid, (ppid, cmd) in procs.items() if ppid in owners and images in cmd]


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line), for every process we may read."""
    out: dict[int, tuple[int, str]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        out[int(d.name)] = (ppid, cmd)
    return out


def local_events(s: Summon, kind: str | None = None) -> list[dict]:
    with sqlite3.connect(s.events) as c:
        rows = c.execute("select kind, route, instance, detail from events order by id").fetchall()
    return [{"kind": k, "route": r, "instance": i, "detail": json.loads(d or "{}")} for k, r, i, d in rows
            if kind is None or k == kind]


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.fixture
def images(tmp_path: Path) -> Path:
    d = tmp_path / "images"
    d.mkdir()
    make_image(d, "slow", SLOW_SITE)
    make_image(d, "site", BUSYBOX)
    make_image(d, "other", BUSYBOX)
    return d


def test_a_cold_burst_over_three_proxies_boots_exactly_one_instance(tmp_path: Path, redis: RedisServer,
                                                                   images: Path) -> None:
    fleet = Fleet(tmp_path, redis, cap=8, routes=route("site", "slow", max_conns=BURST_CONNS)).start()
    try:
        def one(i: int) -> int:
            return http_get(fleet.proxies[i % 3].port, "/", timeout=30)[0]

        with ThreadPoolExecutor(max_workers=150) as pool:
            statuses = list(pool.map(one, range(300)))
        assert statuses.count(200) == 300, sorted(set(statuses))
        boots = [e for s in fleet.proxies for e in local_events(s, "summoned")]
        assert len(boots) == 1, boots
        assert len(fleet.instance_pids()) == 1
        deferred = [e for s in fleet.proxies for e in local_events(s, "boot_deferred")]
        assert len(deferred) >= 1, "the other proxies waited for the one boot"
        # /status of any node shows the fleet's instance, with the node that owns it
        owner = next(s for s in fleet.proxies if local_events(s, "summoned"))
        node = json.loads(owner.config.read_text().split('node = ')[1].split("\n")[0])
        for s in fleet.proxies:
            insts = s.instances()
            assert [(i["node"], i["state"]) for i in insts] == [(node, "ready")], insts
        # summon log on another node lists the boot, with its node (the fleet's stream)
        other = next(s for s in fleet.proxies if s is not owner)
        out = wait_for(lambda: _log(other), timeout=10)
        assert any(e["kind"] == "summoned" and e.get("node") == node for e in out), out
    finally:
        fleet.stop()
    assert not fleet.instance_pids()


def _log(s: Summon) -> list[dict]:
    res = subprocess.run([sys.executable, "-m", "proxy.cli", "log", "-c", str(s.config), "--json"],
                         capture_output=True, text=True, timeout=30, cwd=s.tmp)
    assert res.returncode == 0, res.stderr
    events = [json.loads(line) for line in res.stdout.splitlines() if line.strip()]
    return events if any(e["kind"] == "summoned" and e.get("node") for e in events) else []


def test_the_cap_holds_over_three_proxies_under_a_spike_and_first_replicas_go_to_the_busiest_region(
        tmp_path: Path, redis: RedisServer, images: Path) -> None:
    routes = route("site", "site", host="site", target=2) + route("other", "other", host="other", target=2)
    fleet = Fleet(tmp_path, redis, cap=3, routes=routes).start()
    peak = 0
    done = threading.Event()
    try:
        def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, len(fleet.instance_pids()))
                time.sleep(0.05)

        sampler = threading.Thread(target=sample)
        sampler.start()

        def one(i: int) -> tuple[int, dict[str, str]]:
            s = fleet.proxies[i % 3]
            status, headers, _ = http_get(s.port, "/", host="other" if i % 4 == 0 else "site", timeout=30,
                                          headers={"X-Client-Region": "us-east"})
            return status, headers

        # 24 at once want 12 replicas (target 2 each) against a cap of 3; more would saturate
        # this 2-core machine, and summon's overload watch would rightly start refusing connections
        with ThreadPoolExecutor(max_workers=24) as pool:
            results = list(pool.map(one, range(900)))
        done.set()
        sampler.join()
        statuses = [st for st, _ in results]
        assert set(statuses) <= {200, 503}, sorted(set(statuses))
        assert all(h.get("retry-after") for st, h in results if st == 503)
        assert statuses.count(200) >= 450
        assert 2 <= peak <= 3, peak
        with_redis = subprocess.run(["redis-cli", "-p", str(redis.port), "ZCARD", "{summon}:permits"],
                                    capture_output=True, text=True, timeout=10).stdout.strip()
        assert int(with_redis) <= 3
        first = [e for s in fleet.proxies for e in local_events(s, "summoned")]
        assert first and all(e["detail"].get("client_region") == "us-east" for e in first)
    finally:
        done.set()
        fleet.stop()


def test_sigkill_of_one_proxy_loses_no_request_sent_to_the_others_and_its_permits_return(
        tmp_path: Path, redis: RedisServer, images: Path) -> None:
    fleet = Fleet(tmp_path, redis, cap=4, routes=route("site", "site", target=4)).start()
    a, b, c = fleet.proxies
    try:
        assert http_get(a.port, "/")[0] == 200  # a owns the first instance
        results: list[int] = []
        stop = time.time() + 4.0

        def client(s: Summon) -> None:
            while time.time() < stop:
                results.append(http_get(s.port, "/", timeout=30)[0])

        threads = [threading.Thread(target=client, args=(s,)) for s in (b, c) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        assert a.proc is not None
        a.proc.send_signal(signal.SIGKILL)  # its instance dies with it (pdeathsig)
        a.proc.wait(5)
        for t in threads:
            t.join(40)
        assert results and set(results) == {200}, {s: results.count(s) for s in set(results)}
        # within the lease (2 s) and a sync, a's permits are back and its instance is gone from the registry
        def gone() -> bool:
            nodes = {i["node"] for i in b.instances()}
            return "eu-1" not in nodes
        assert wait_for(gone, timeout=5), b.instances()
        permits = int(subprocess.run(["redis-cli", "-p", str(redis.port), "ZCARD", "{summon}:permits"],
                                     capture_output=True, text=True, timeout=10).stdout.strip())
        assert permits == len(fleet.instance_pids())
    finally:
        fleet.stop()


def test_redis_stopped_mid_spike_warm_requests_all_succeed_and_the_fleet_is_whole_again(
        tmp_path: Path, redis: RedisServer, images: Path) -> None:
    fleet = Fleet(tmp_path, redis, cap=3, routes=route("site", "site", target=1000)).start()
    try:
        for s in fleet.proxies:  # warm: every proxy knows the one instance
            assert http_get(s.port, "/")[0] == 200
        assert wait_for(lambda: all(len(s.instances()) == 1 for s in fleet.proxies), timeout=5)
        results: list[int] = []
        stop_at = time.time() + 12.0

        def client(s: Summon) -> None:
            while time.time() < stop_at:
                results.append(http_get(s.port, "/", timeout=30)[0])
                time.sleep(0.01)

        threads = [threading.Thread(target=client, args=(s,)) for s in fleet.proxies for _ in range(2)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        redis.stop()
        time.sleep(10.0)
        redis.start()  # an empty Redis (no persistence): the proxies re-publish everything
        back = time.time()
        for t in threads:
            t.join(40)
        assert results and set(results) == {200}, {s: results.count(s) for s in set(results)}

        def whole() -> bool:
            out = subprocess.run(["redis-cli", "-p", str(redis.port), "ZCARD", "{summon}:permits"],
                                 capture_output=True, text=True, timeout=10).stdout.strip()
            return out.isdigit() and int(out) == len(fleet.instance_pids()) <= 3
        assert wait_for(whole, timeout=10), "permits rebuilt within 10 s of Redis returning"
        assert time.time() - back < 10
        kinds = [e["kind"] for s in fleet.proxies for e in local_events(s)]
        assert "store_down" in kinds and "store_back" in kinds
    finally:
        fleet.stop()


def test_boots_on_local_shares_while_redis_is_away_are_brought_back_under_the_cap(
        tmp_path: Path, redis: RedisServer, images: Path) -> None:
    routes = "".join(route(n, "site", host=n) for n in ("a", "b", "c"))
    fleet = Fleet(tmp_path, redis, cap=2, routes=routes).start()
    try:
        assert wait_for(lambda: all(s.status()["totals"].get("cluster", {}).get("permits") == 0
                                    for s in fleet.proxies), timeout=5)
        redis.stop()
        # each proxy may run local_share = 1 instance while Redis is away: three in all, one over the cap
        for s, name in zip(fleet.proxies, ("a", "b", "c"), strict=True):
            assert http_get(s.port, "/", host=name, timeout=30)[0] == 200
        assert len(fleet.instance_pids()) == 3
        assert all(s.status()["totals"]["cluster"]["degraded"] for s in fleet.proxies)
        redis.start()
        back = time.time()
        assert wait_for(lambda: len(fleet.instance_pids()) <= 2, timeout=10), "the cap is back within 10 s"
        assert time.time() - back < 10
        assert wait_for(lambda: not any(s.status()["totals"]["cluster"]["degraded"] for s in fleet.proxies),
                        timeout=5)
        gave_up = [e for s in fleet.proxies for e in local_events(s, "draining")
                   if e["detail"].get("reason") == "over the fleet cap"]
        assert len(gave_up) == 1, gave_up  # exactly the excess: every proxy chose the same victim
    finally:
        fleet.stop()


def test_proxies_with_two_workers_each_are_six_nodes_of_one_fleet(tmp_path: Path, redis: RedisServer,
                                                                 images: Path) -> None:
    fleet = Fleet(tmp_path, redis, cap=8, routes=route("site", "slow", max_conns=BURST_CONNS), workers=2).start()
    try:
        with ThreadPoolExecutor(max_workers=150) as pool:
            statuses = list(pool.map(lambda i: http_get(fleet.proxies[i % 3].port, "/", timeout=30)[0], range(300)))
        assert statuses.count(200) == 300, sorted(set(statuses))
        assert len([e for s in fleet.proxies for e in local_events(s, "summoned")]) == 1
        assert len(fleet.instance_pids()) == 1
        status = fleet.proxies[1].status()  # worker 0 speaks for both workers of its proxy
        nodes = {i["node"] for r in status["routes"] for i in r["instances"]}
        assert len(nodes) == 1 and next(iter(nodes)).rsplit("-w", 1)[1] in ("0", "1")
        assert status["totals"]["instances"] == 1 and status["totals"]["cap"] == 8
    finally:
        fleet.stop()
    assert not fleet.instance_pids()
