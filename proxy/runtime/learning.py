"""Learned followers: record what clients ask for, rebuild the table in the background.

Why: a page's static `prefetch` list misses what scripts load and what other pages pull
in; the event log sees it. The maths is `proxy.engine.prefetch.learn`; this is its shell.

The request-level record: a `request` event (route, and a short keyed hash of the client
address in `detail.client`) for requests on routes that pre-summon, only while learning
is on, for a `learn_sample` share of clients (sampled whole, by hash), and at most
`MAX_PER_S` a second per worker (a token bucket): bounded rows, and on the hot path one
dict lookup, one cached hash and a queue put (the event log writes in its own thread).
The hash key lives beside the event log (`<events>.prefetch-key`, mode 0600) so that every
worker of a proxy hashes a client alike (a browser's connections land on several workers),
and the address itself is never written.

Every `learn_interval`, a thread reads the last `HORIZON_S` of `request` events (at most
`MAX_ROWS`), computes the table and writes it beside the event log
(`<events>.prefetch.json`, atomically); the engine gets it on the event loop. At start the
file is read back, so a restart keeps what was learned.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import time
from pathlib import Path
from typing import Any

from .. import background
from ..config import Config
from ..engine.fleet import Fleet
from ..engine.prefetch import Followers, Observation, client_hash, learn, sampled
from ..observe.events import Event, EventLog, EventReader

log = logging.getLogger("summon.learning")

MAX_PER_S = 200.0  # request events per second and worker, at most
HORIZON_S = 3600.0  # what the table is learned from: the last hour
MAX_ROWS = 200_000
VERSION = 1


def table_path(events_path: Path) -> Path:
    return events_path.with_name(events_path.name + ".prefetch.json")


def _key(events_path: Path) -> bytes:
    path = events_path.with_name(events_path.name + ".prefetch-key")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        data = path.read_bytes()
        if len(data) >= 16:
            return data[:32]
        time.sleep(0.05)  # another worker is writing it right now
        return path.read_bytes()[:32] or secrets.token_bytes(16)
    key = secrets.token_bytes(32)
    with os.fdopen(fd, "wb") as f:
        f.write(key)
    return key


def load_table(path: Path) -> Followers:
    """The persisted learned table; {} if there is none or it is unreadable (it is relearned)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != VERSION or not isinstance(data.get("followers"), dict):
        return {}
    return {str(k): tuple(str(x) for x in v) for k, v in data["followers"].items() if isinstance(v, list)}


def save_table(path: Path, table: Followers, built_at: float) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    payload: dict[str, Any] = {"version": VERSION, "built_at": built_at,
                               "followers": {k: list(v) for k, v in sorted(table.items())}}
    tmp.write_text(json.dumps(payload, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


class Learning:
    """Records sampled requests and keeps the fleet's learned followers current."""

    def __init__(self, config: Config, events: EventLog, fleet: Fleet, loop: asyncio.AbstractEventLoop) -> None:
        self.settings = config.prefetch
        self.events = events
        self.fleet = fleet
        self.loop = loop
        self.table_file = table_path(Path(events.path))
        self._salt = _key(Path(events.path))
        self._hashes: dict[str, str | None] = {}  # client ip -> hash, None: not sampled
        self._tokens = MAX_PER_S
        self._refilled = loop.time()
        self._task: asyncio.Task[None] | None = None
        self.routes: frozenset[str] = frozenset()
        self.set_routes()
        fleet.prefetch.set_learned(load_table(self.table_file))

    def set_routes(self) -> None:
        """The routes whose requests are recorded: those that pre-summon (after a reload too)."""
        self.routes = self.fleet.prefetch.on if self.settings.learn else frozenset()

    def observe(self, route: str, client_ip: str) -> None:
        """A request arrived on `route` (the caller checked `route in self.routes`)."""
        h = self._hashes.get(client_ip, "")
        if h == "":
            h = client_hash(client_ip, self._salt)
            h = h if sampled(h, self.settings.learn_sample) else None
            if len(self._hashes) > 65536:
                self._hashes.clear()
            self._hashes[client_ip] = h
        if h is None:
            return
        if self._tokens < 1.0:
            now = self.loop.time()
            self._tokens = min(MAX_PER_S, self._tokens + (now - self._refilled) * MAX_PER_S)
            self._refilled = now
            if self._tokens < 1.0:
                return
        self._tokens -= 1.0
        self.events.record(Event(kind="request", route=route, detail={"client": h}))

    def start(self) -> None:
        if self.settings.learn and self._task is None:
            self._task = background.repeat(self._relearn, self.settings.learn_interval_s,
                                           "rebuilding the learned prefetch table", pause_first=True)

    async def close(self) -> None:
        await background.stop(self._task)

    async def _relearn(self) -> None:
        self.fleet.prefetch.set_learned(await asyncio.to_thread(self.rebuild))

    def rebuild(self) -> Followers:
        """Read the recent request events, learn, persist. Runs in a thread."""
        s = self.settings
        now = time.time()
        rows = EventReader(self.events.path).query(since=now - HORIZON_S, kinds=["request"], limit=MAX_ROWS,
                                                   newest=True)
        observations = [Observation(e.ts, str(e.detail.get("client", "")), e.route) for e in rows
                        if e.detail.get("client")]
        table = learn(observations, s.learn_window_s, s.learn_threshold, s.learn_min_count, s.max_followers)
        save_table(self.table_file, table, now)
        return table
