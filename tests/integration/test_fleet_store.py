"""The fleet stores with the real thing behind them: SQLite files shared by several
connections (proxy.cluster.sqlite_store, as the workers of one summon use it) and a real
redis-server (proxy.cluster.redis_store, as several proxies use it). The same contract for
both: the cap is atomic, a cold route's boot lock is one engine's, leases expire, usage
reaches the owner."""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from proxy.cluster.redis_store import RedisStore, connect
from proxy.cluster.sqlite_store import SqliteStore
from proxy.cluster.store import Entry, Store
from tests.helpers.redis_server import RedisServer

MakeStore = Callable[[str, float], Store]  # (node, lease_s) -> a store


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "redis"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MakeStore]:
    if request.param == "sqlite":
        path = str(tmp_path / "fleet.db")
        yield lambda node, lease_s: SqliteStore(path, node, lease_s=lease_s)
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    import redis

    redis.Redis.from_url(server.url).flushdb()
    yield lambda node, lease_s: RedisStore(connect(server.url), node, lease_s=lease_s)


def entry(iid: str, node: str, state: str = "ready", route: str = "site") -> Entry:
    return Entry(iid, node, route, "site", "local", "local", "127.0.0.1:9000" if state == "ready" else "", state,
                 "m-1")


def run(coro_fn: Callable[[], object]) -> None:
    asyncio.run(coro_fn())  # type: ignore[arg-type]


def _claims(kind: str, where: str, node: str, n: int, out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    async def go() -> list[bool]:
        store: Store = SqliteStore(where, node) if kind == "sqlite" else RedisStore(connect(where), node)
        got = [(await store.claim(f"r{i % 3}", f"{node}-{i}", False, 5, 10.0)).granted for i in range(n)]
        await store.close()
        return got

    out.put(asyncio.run(go()))


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_concurrent_claims_from_four_processes_never_pass_the_cap(kind: str, tmp_path: Path,
                                                                   request: pytest.FixtureRequest) -> None:
    if kind == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        import redis

        redis.Redis.from_url(server.url).flushdb()
        where = server.url
    else:
        where = str(tmp_path / "fleet.db")
    ctx = multiprocessing.get_context("fork")
    q: multiprocessing.Queue = ctx.Queue()  # type: ignore[type-arg]
    procs = [ctx.Process(target=_claims, args=(kind, where, f"w{i}", 10, q)) for i in range(4)]
    for p in procs:
        p.start()
    results = [q.get(timeout=30) for _ in procs]
    for p in procs:
        p.join(10)
    assert sum(sum(r) for r in results) == 5  # exactly the cap, however the four raced


def test_one_engine_holds_a_cold_routes_lock_until_its_instance_is_ready(make_store: MakeStore) -> None:
    async def t() -> None:
        a, b = make_store("a", 3.0), make_store("b", 3.0)
        assert (await a.claim("site", "a-1", True, 3, 30.0)).granted
        refused = await b.claim("site", "b-1", True, 3, 30.0)
        assert not refused.granted and refused.wait_s is not None and 29 <= refused.wait_s <= 30
        assert "node a is booting site" in refused.reason
        assert (await b.claim("other", "b-2", True, 3, 30.0)).granted  # another route: its own lock
        await a.ready(entry("a-1", "a"))
        # ready, so no lock; and b must not boot a second cold instance: it is told to wait
        again = await b.claim("site", "b-3", True, 3, 30.0)
        assert not again.granted and again.wait_s is not None and "ready on node a" in again.reason
        snap = await b.sync([], {})
        assert [(e.instance_id, e.node, e.state, e.address, e.machine) for e in snap.entries if e.route == "site"] == [
            ("a-1", "a", "ready", "127.0.0.1:9000", "m-1")]
        assert snap.permits == 2
        await a.close()
        await b.close()

    run(t)


def test_a_dead_engines_permits_and_instances_expire_with_its_lease(make_store: MakeStore) -> None:
    async def t() -> None:
        a, b = make_store("a", 1.0), make_store("b", 1.0)
        assert (await a.claim("site", "a-1", True, 1, 30.0)).granted
        await a.ready(entry("a-1", "a"))
        assert not (await b.claim("other", "b-1", False, 1, 30.0)).granted  # at the cap
        for _ in range(3):  # a renews for 1.5 s: still held
            await asyncio.sleep(0.5)
            await a.sync([entry("a-1", "a")], {})
        assert not (await b.claim("other", "b-1", False, 1, 30.0)).granted
        await asyncio.sleep(1.2)  # a stopped renewing (SIGKILL): its lease runs out
        snap = await b.sync([], {})
        assert snap.permits == 0 and not snap.entries
        assert (await b.claim("other", "b-1", False, 1, 30.0)).granted
        await a.close()
        await b.close()

    run(t)


def test_usage_of_an_instance_reaches_its_owner_and_release_frees_everything(make_store: MakeStore) -> None:
    async def t() -> None:
        a, b, c = make_store("a", 3.0), make_store("b", 3.0), make_store("c", 3.0)
        assert (await a.claim("site", "a-1", True, 2, 30.0)).granted
        await a.ready(entry("a-1", "a"))
        t0 = time.monotonic()
        await b.sync([], {"a-1": (3, 0.5)})
        await c.sync([], {"a-1": (1, 2.0)})
        await b.sync([], {"a-1": (3, 0.5)})  # replaced, not added to
        snap = await a.sync([entry("a-1", "a")], {})
        inflight, idle = snap.usage["a-1"]
        assert inflight == 4
        assert 0.5 <= idle <= 0.5 + (time.monotonic() - t0) + 0.05  # the most recent use, aged
        await c.sync([], {})  # c stopped using it
        assert (await a.sync([entry("a-1", "a")], {})).usage["a-1"][0] == 3
        await a.release("site", "a-1")
        snap = await b.sync([], {})
        assert snap.permits == 0 and not snap.entries
        for s in (a, b, c):
            await s.close()

    run(t)


def test_an_unreachable_redis_is_store_unavailable_not_a_hang(tmp_path: Path) -> None:
    from proxy.cluster.store import StoreUnavailable
    from tests.helpers.summon_proc import free_port

    async def t() -> None:
        store = RedisStore(connect(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.2), "a")
        t0 = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await store.claim("site", "a-1", True, 3, 10.0)
        with pytest.raises(StoreUnavailable):
            await store.sync([], {})
        assert time.monotonic() - t0 < 5  # a bound no scheduling noise reaches: a hang would be minutes
        await store.close()

    run(t)


def test_each_engines_demand_by_region_reaches_the_others_added_up(make_store: MakeStore) -> None:
    async def t() -> None:
        a, b, c = make_store("a", 3.0), make_store("b", 3.0), make_store("c", 3.0)
        await b.sync([], {}, {"site": {"us": 5.0}})
        await c.sync([], {}, {"site": {"us": 2.5, "eu": 1.0}, "other": {"eu": 3.0}})
        snap = await a.sync([], {}, {"site": {"eu": 100.0}})
        assert snap.demand == {"site": {"us": 7.5, "eu": 1.0}, "other": {"eu": 3.0}}  # not a's own
        await c.sync([], {}, {})  # c's clients went quiet
        assert (await a.sync([], {}, {})).demand == {"site": {"us": 5.0}}
        for s in (a, b, c):
            await s.close()

    run(t)


def test_a_boot_lock_whose_holder_died_is_not_waited_for_past_its_lease(make_store: MakeStore) -> None:
    async def t() -> None:
        a, b = make_store("a", 1.0), make_store("b", 1.0)
        assert (await a.claim("site", "a-1", True, 3, 30.0)).granted  # a takes the lock for 30 s, then dies
        refused = await b.claim("site", "b-1", True, 3, 30.0)
        assert not refused.granted and "node a is booting" in refused.reason
        await asyncio.sleep(1.3)  # a's lease is over; its lock's 30 s are not
        assert (await b.claim("site", "b-2", True, 3, 30.0)).granted
        again = await a.claim("site", "a-3", True, 3, 30.0)  # a back from the dead: b holds it now
        assert not again.granted and "node b is booting" in again.reason
        await a.close()
        await b.close()

    run(t)
