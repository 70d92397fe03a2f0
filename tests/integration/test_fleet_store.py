"""The SQLite fleet store (proxy.cluster.sqlite_store) with real files and several
connections, as the workers of one summon use it: the cap is atomic, the boot lock is one
engine's, leases expire, and usage reaches the owner."""

from __future__ import annotations

import asyncio
import multiprocessing
from pathlib import Path

from proxy.cluster.sqlite_store import SqliteStore
from proxy.cluster.store import Entry


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def entry(iid: str, node: str, state: str = "ready", route: str = "site") -> Entry:
    return Entry(iid, node, route, "site", "local", "local", "127.0.0.1:9000" if state == "ready" else "", state)


def _claim_in_process(path: str, node: str, n: int, out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    async def go() -> list[bool]:
        store = SqliteStore(path, node)
        got = [(await store.claim(f"r{i % 3}", f"{node}-{i}", False, 5, 10.0)).granted for i in range(n)]
        await store.close()
        return got

    out.put(asyncio.run(go()))


def test_concurrent_claims_from_four_processes_never_pass_the_cap(tmp_path: Path) -> None:
    path = str(tmp_path / "fleet.db")
    q: multiprocessing.Queue = multiprocessing.get_context("fork").Queue()  # type: ignore[type-arg]
    procs = [multiprocessing.get_context("fork").Process(target=_claim_in_process, args=(path, f"w{i}", 10, q))
             for i in range(4)]
    for p in procs:
        p.start()
    results = [q.get(timeout=30) for _ in procs]
    for p in procs:
        p.join(10)
    assert sum(sum(r) for r in results) == 5  # exactly the cap, however the four raced


def test_one_engine_holds_a_cold_routes_lock_until_its_instance_is_ready(tmp_path: Path) -> None:
    async def t() -> None:
        clock = Clock()
        a, b = (SqliteStore(str(tmp_path / "f.db"), n, clock=clock) for n in ("a", "b"))
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
        assert [(e.instance_id, e.state, e.address) for e in snap.entries if e.route == "site"] == [
            ("a-1", "ready", "127.0.0.1:9000")]
        assert snap.permits == 2
        await a.close()
        await b.close()

    asyncio.run(t())


def test_a_dead_engines_permits_and_instances_expire_with_its_lease(tmp_path: Path) -> None:
    async def t() -> None:
        clock = Clock()
        a, b = (SqliteStore(str(tmp_path / "f.db"), n, lease_s=3.0, clock=clock) for n in ("a", "b"))
        assert (await a.claim("site", "a-1", True, 1, 30.0)).granted
        await a.ready(entry("a-1", "a"))
        assert not (await b.claim("other", "b-1", False, 1, 30.0)).granted  # at the cap
        clock.now += 2.0
        await a.sync([entry("a-1", "a")], {})  # a renews
        clock.now += 2.0
        assert not (await b.claim("other", "b-1", False, 1, 30.0)).granted  # renewed: still held
        clock.now += 3.5  # a stopped renewing (SIGKILL): its lease runs out
        snap = await b.sync([], {})
        assert snap.permits == 0 and not snap.entries
        assert (await b.claim("other", "b-1", False, 1, 30.0)).granted
        await a.close()
        await b.close()

    asyncio.run(t())


def test_usage_of_an_instance_reaches_its_owner_and_release_frees_everything(tmp_path: Path) -> None:
    async def t() -> None:
        clock = Clock()
        a, b, c = (SqliteStore(str(tmp_path / "f.db"), n, clock=clock) for n in ("a", "b", "c"))
        assert (await a.claim("site", "a-1", True, 2, 30.0)).granted
        await a.ready(entry("a-1", "a"))
        await b.sync([], {"a-1": (3, 0.5)})
        await c.sync([], {"a-1": (1, 2.0)})
        clock.now += 1.0
        snap = await a.sync([entry("a-1", "a")], {})
        inflight, idle = snap.usage["a-1"]
        assert inflight == 4 and idle == 1.5  # summed, and the most recent use, aged by a second
        await a.release("site", "a-1")
        snap = await b.sync([], {})
        assert snap.permits == 0 and not snap.entries
        for s in (a, b, c):
            await s.close()

    asyncio.run(t())
