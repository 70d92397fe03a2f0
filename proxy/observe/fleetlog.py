"""The fleet's event log: every proxy's events in one Redis Stream, each with its node.

How this works: each proxy writes its events to its own SQLite log first (`proxy.observe.
events`), so an event is never lost to a network problem. A `Shipper` then copies new rows
to the stream `{summon}:events` a couple of times a second and records, in the same
MULTI/EXEC, how far it got (`{summon}:events:shipped:<node>` = the last local row id).
While Redis is unreachable the rows simply wait in SQLite; when it answers again they are
sent, in order, from where the shipper stopped: nothing is lost and nothing is sent twice.

`FleetLog` reads the stream for `summon log`, `summon stats` and the dashboard's events:
entries are ordered by the event's own time (an event shipped late, after an outage, sits
later in the stream than its time says). The stream is capped at about a million entries
(`MAXLEN ~`), the same order as the local log's default row limit.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import redis
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from .. import background
from ..cluster.redis_store import PREFIX, STREAM
from .events import Event, EventReader

log = logging.getLogger("summon.fleetlog")

MAXLEN = 1_000_000
SHIP_EVERY_S = 0.5
BATCH = 500


def _shipped_key(node: str) -> str:
    return f"{PREFIX}events:shipped:{node}"


def entry_of(event: Event, node: str) -> dict[str, str]:
    return {"node": node, "ts": repr(event.ts), "kind": event.kind, "route": event.route,
            "instance": event.instance, "image_digest": event.image_digest, "host": event.host,
            "region": event.region, "duration_s": "" if event.duration_s is None else repr(event.duration_s),
            "detail": json.dumps(event.detail, default=str, separators=(",", ":"))}


def event_of(fields: dict[Any, Any]) -> Event:
    f = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
         for k, v in fields.items()}
    try:
        detail = json.loads(f.get("detail") or "{}")
    except ValueError:
        detail = {"_raw": f.get("detail")}
    return Event(kind=f.get("kind", ""), route=f.get("route", ""), instance=f.get("instance", ""),
                 image_digest=f.get("image_digest", ""), host=f.get("host", ""), region=f.get("region", ""),
                 duration_s=float(f["duration_s"]) if f.get("duration_s") else None,
                 detail=detail if isinstance(detail, dict) else {"_value": detail},
                 ts=float(f.get("ts") or 0.0), node=f.get("node", ""))


class Shipper:
    """Copies this node's local event log to the fleet's stream, from where it left off."""

    def __init__(self, reader: EventReader, client: aioredis.Redis, node: str) -> None:
        self.reader = reader
        self.client = client
        self.node = node
        self.last: int | None = None  # the last local row id in the stream
        self.down = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = background.repeat(self._ship_backlog, SHIP_EVERY_S, "event shipping")

    async def _ship_backlog(self) -> None:
        try:
            while await self.ship_once() == BATCH:
                pass  # a backlog (after an outage): keep going
            if self.down:
                self.down = False
                log.info("event stream reachable again: the backlog is sent")
        except (RedisError, OSError) as exc:
            if not self.down:
                self.down = True
                log.warning("cannot send events to the fleet's stream (kept locally, sent later): %s", exc)

    async def ship_once(self) -> int:
        """Send the next batch; returns how many events went."""
        key = _shipped_key(self.node)
        if self.last is None:
            raw = await self.client.get(key)
            self.last = int(raw) if raw else 0
        loop = asyncio.get_running_loop()
        rows, top = await loop.run_in_executor(None, self.reader.after, self.last, BATCH)
        if self.last > top:  # a new local log (the file was replaced): start it from its beginning
            self.last = 0
            rows, top = await loop.run_in_executor(None, self.reader.after, 0, BATCH)
        if not rows:
            return 0
        pipe = self.client.pipeline(transaction=True)
        for _, event in rows:
            pipe.xadd(STREAM, entry_of(event, self.node), maxlen=MAXLEN, approximate=True)  # type: ignore[arg-type]
        pipe.set(key, rows[-1][0])
        await pipe.execute()
        self.last = rows[-1][0]
        return len(rows)

    async def close(self) -> None:
        await background.stop(self._task)
        try:  # one last batch: what the shutdown itself recorded
            await asyncio.wait_for(self.ship_once(), 2.0)
        except (RedisError, OSError, TimeoutError):
            pass


class FleetLog:
    """Reads the fleet's stream (the CLI's and the admin API's view of every node)."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    def query(self, since: float | None = None, route: str | None = None, limit: int | None = None,
              newest: bool = False, until: float | None = None) -> list[Event]:
        start = f"{int(since * 1000)}-0" if since is not None else "-"  # an entry's id is never before its event
        raw: Any
        if newest and limit is not None:  # twice the count: late-shipped entries sort earlier by time
            raw = list(reversed(self.client.xrevrange(STREAM, "+", start, count=max(1, limit) * 2) or []))
        else:
            raw = self.client.xrange(STREAM, start, "+") or []
        events = [event_of(fields or {}) for _, fields in raw]
        events = [e for e in events if (since is None or e.ts >= since) and (until is None or e.ts < until)
                  and (route is None or e.route == route)]
        events.sort(key=lambda e: e.ts)
        if limit is not None:
            events = events[-limit:] if newest else events[:limit]
        return events
