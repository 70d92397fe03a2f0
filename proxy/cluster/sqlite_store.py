"""The fleet's shared state in one SQLite file: `workers = N` on one machine, no server.

Why SQLite: the workers are processes of one machine, so a file they all open is the one
shared thing that needs nothing installed or started, survives any one worker's crash,
and gives atomic read-modify-write for free (`BEGIN IMMEDIATE` takes the write lock before
the first read, so two workers' claims are serialised and the cap count cannot race).
A claim is one short transaction, well under a millisecond on a warm page cache; the warm
request path never touches the file. The file lives in the parent's private directory
(0700) and goes when the parent exits.

Expiry uses the wall clock (`time.time`): every worker reads the same one.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from .store import Claim, Entry, Snapshot, StoreUnavailable, sum_demand

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS permits (instance_id TEXT PRIMARY KEY, node TEXT NOT NULL, route TEXT NOT NULL,
                                    expires REAL NOT NULL);
CREATE TABLE IF NOT EXISTS locks (route TEXT PRIMARY KEY, node TEXT NOT NULL, instance_id TEXT NOT NULL,
                                  expires REAL NOT NULL);
CREATE TABLE IF NOT EXISTS instances (instance_id TEXT PRIMARY KEY, node TEXT NOT NULL, route TEXT NOT NULL,
                                      image TEXT NOT NULL, host TEXT NOT NULL, region TEXT NOT NULL,
                                      address TEXT NOT NULL, state TEXT NOT NULL, expires REAL NOT NULL,
                                      machine TEXT NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS usage (node TEXT NOT NULL, instance_id TEXT NOT NULL, inflight INTEGER NOT NULL,
                                  idle_s REAL NOT NULL, at REAL NOT NULL, PRIMARY KEY (node, instance_id));
CREATE TABLE IF NOT EXISTS demand (node TEXT PRIMARY KEY, demand TEXT NOT NULL, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS nodes (node TEXT PRIMARY KEY, expires REAL NOT NULL);
"""


class SqliteStore:
    def __init__(self, path: str, node: str, lease_s: float = 3.0, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.node = node
        self.lease_s = lease_s
        self.clock = clock
        # one thread owns the connection: sqlite3 calls block, the event loop must not
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="summon-fleetdb")
        self._db: sqlite3.Connection | None = None

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            db = sqlite3.connect(self.path, timeout=2.0, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # losing the last commits in a power cut is fine: leases
            db.executescript(SCHEMA)
            self._db = db
        return self._db

    async def _run(self, fn: Callable[[sqlite3.Connection, float], T]) -> T:
        def work() -> T:
            db = self._conn()
            db.execute("BEGIN IMMEDIATE")
            try:
                result = fn(db, self.clock())
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            return result

        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, work)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"fleet database {self.path}: {exc}") from exc

    # --- the Store contract -----------------------------------------------------------

    async def claim(self, route: str, instance_id: str, cold: bool, cap: int, lock_s: float) -> Claim:
        node, lease_s = self.node, self.lease_s

        def claim(db: sqlite3.Connection, now: float) -> Claim:
            db.execute("DELETE FROM permits WHERE expires < ?", (now,))
            db.execute("DELETE FROM locks WHERE expires < ?", (now,))
            # a lock whose holder stopped renewing its lease (killed mid-boot) is not waited for
            db.execute("DELETE FROM locks WHERE node NOT IN (SELECT node FROM nodes WHERE expires >= ?)", (now,))
            db.execute("INSERT OR REPLACE INTO nodes VALUES (?, ?)", (node, now + lease_s))
            if cold:
                row = db.execute("SELECT node, expires FROM locks WHERE route = ?", (route,)).fetchone()
                if row is not None and row[0] != node:
                    return Claim(False, f"node {row[0]} is booting {route}", wait_s=max(0.0, row[1] - now))
                row = db.execute("SELECT node FROM instances WHERE route = ? AND node != ? AND state = 'ready' "
                                 "AND expires >= ? LIMIT 1", (route, node, now)).fetchone()
                if row is not None:  # ready elsewhere, not in our copy of the registry yet
                    return Claim(False, f"{route} is ready on node {row[0]}", wait_s=lease_s)
            (held,) = db.execute("SELECT COUNT(*) FROM permits").fetchone()
            if held >= cap:
                return Claim(False, f"fleet at its cap ({cap} instances)")
            db.execute("INSERT OR REPLACE INTO permits VALUES (?, ?, ?, ?)", (instance_id, node, route, now + lease_s))
            if cold:
                db.execute("INSERT OR REPLACE INTO locks VALUES (?, ?, ?, ?)", (route, node, instance_id, now + lock_s))
            return Claim(True)

        return await self._run(claim)

    async def ready(self, entry: Entry) -> None:
        node, lease_s = self.node, self.lease_s

        def ready(db: sqlite3.Connection, now: float) -> None:
            e = entry
            db.execute("INSERT OR REPLACE INTO instances VALUES (?, ?, ?, ?, ?, ?, ?, 'ready', ?, ?)",
                       (e.instance_id, node, e.route, e.image, e.host, e.region, e.address, now + lease_s, e.machine))
            db.execute("DELETE FROM locks WHERE route = ? AND instance_id = ?", (e.route, e.instance_id))

        await self._run(ready)

    async def release(self, route: str, instance_id: str) -> None:
        def release(db: sqlite3.Connection, now: float) -> None:
            db.execute("DELETE FROM permits WHERE instance_id = ?", (instance_id,))
            db.execute("DELETE FROM locks WHERE route = ? AND instance_id = ?", (route, instance_id))
            db.execute("DELETE FROM instances WHERE instance_id = ?", (instance_id,))
            db.execute("DELETE FROM usage WHERE instance_id = ?", (instance_id,))

        await self._run(release)

    async def sync(self, mine: list[Entry], usage: dict[str, tuple[int, float]],
                   demand: dict[str, dict[str, float]] | None = None) -> Snapshot:
        node, lease_s = self.node, self.lease_s

        def sync(db: sqlite3.Connection, now: float) -> Snapshot:
            expires = now + lease_s
            db.execute("INSERT OR REPLACE INTO nodes VALUES (?, ?)", (node, expires))
            db.execute("DELETE FROM nodes WHERE expires < ?", (now,))
            db.executemany("INSERT OR REPLACE INTO instances VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                           [(e.instance_id, node, e.route, e.image, e.host, e.region, e.address, e.state, expires,
                             e.machine) for e in mine])
            # renew only what we still have: a permit we lost track of expires on its own
            db.executemany("UPDATE permits SET expires = ? WHERE instance_id = ? AND node = ?",
                           [(expires, e.instance_id, node) for e in mine])
            db.execute("DELETE FROM usage WHERE node = ?", (node,))
            db.executemany("INSERT INTO usage VALUES (?, ?, ?, ?, ?)",
                           [(node, iid, n, idle, now) for iid, (n, idle) in usage.items()])
            db.execute("DELETE FROM instances WHERE expires < ?", (now,))
            db.execute("DELETE FROM permits WHERE expires < ?", (now,))
            db.execute("DELETE FROM usage WHERE at < ?", (now - lease_s,))
            db.execute("INSERT OR REPLACE INTO demand VALUES (?, ?, ?)", (node, json.dumps(demand or {}), now))
            db.execute("DELETE FROM demand WHERE at < ?", (now - lease_s,))
            theirs_demand = sum_demand(json.loads(text) for (text,) in db.execute(
                "SELECT demand FROM demand WHERE node != ?", (node,)))
            entries = tuple(Entry(*row) for row in db.execute(
                "SELECT instance_id, node, route, image, host, region, address, state, machine FROM instances"))
            theirs = {iid: (int(n), float(idle)) for iid, n, idle in db.execute(
                "SELECT u.instance_id, SUM(u.inflight), MIN(u.idle_s + (? - u.at)) FROM usage u "
                "JOIN instances i ON i.instance_id = u.instance_id WHERE i.node = ? AND u.node != ? "
                "GROUP BY u.instance_id", (now, node, node))}
            (permits,) = db.execute("SELECT COUNT(*) FROM permits").fetchone()
            return Snapshot(entries, theirs, int(permits), theirs_demand)

        return await self._run(sync)

    async def close(self) -> None:
        def close() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None

        await asyncio.get_running_loop().run_in_executor(self._pool, close)
        self._pool.shutdown(wait=False)
