"""An edge's follower: new versions of the images it follows, pulled when the centre announces them.

How this works: every `[images] follow_every` the follower reads the announcements of its
images from the cluster's Redis (`proxy.images.announce`), asks `announce.due` which to pull,
and pulls each (in a thread: hashing a kernel must not hold up requests) from the URLs
the announcement names, one after the other until one gives the whole version. `pull`
checks every byte against the announced digest and stores the manifest last; only after
that does ``<store>/followed/NAME`` move to the new version, so an unpinned
``image = "NAME"`` on this node means the new version, and `on_followed` tells the
summoner, whose routes switch to it by a rolling deploy (`proxy.engine.fleet`: the old
instances serve until one of the new version is ready, then drain). A version that fails everywhere is an
``image_refused`` event and is tried again after `follow_retry`; nothing of it is used.

Redis being away is not an error here: the node keeps the version it has (edge
autonomy), and the next read after Redis returns catches up with whatever was announced
meanwhile (the hash holds the latest, not a queue to replay).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from redis.exceptions import RedisError

from .. import background
from ..config import Follow
from ..errors import ImageError
from ..images import announce
from ..images.distribute import Fetch, Pulled, http_fetch, pull
from ..images.store import Store
from ..observe.events import Event

log = logging.getLogger("summon.follower")


class Follower:
    def __init__(self, settings: Follow, store_dir: Path, client: Any, record: Callable[[Event], None],
                 token: str | None = None, clock: Callable[[], float] = time.time,
                 fetch: Fetch | None = None, on_followed: Callable[[], None] | None = None) -> None:
        self.settings = settings
        self.on_followed = on_followed  # a new version is followed: switch the routes to it
        self.store = Store(store_dir)
        self.client = client  # redis.asyncio.Redis
        self.record = record
        self.clock = clock
        self.fetch = fetch if fetch is not None else http_fetch(token)
        self.failed: dict[tuple[str, str], float] = {}  # (name, version) -> when it last failed
        self.down = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = background.repeat(self._round, self.settings.every_s, "following announcements")

    async def _round(self) -> None:
        if await self.once() and self.on_followed is not None:
            self.on_followed()

    def followed(self) -> dict[str, str | None]:
        return {name: self.store.followed(name) for name in self.settings.images}

    async def once(self) -> list[str]:
        """One round: read, pull what is due; returns the versions now followed anew."""
        try:
            announced, problems = await announce.read(self.client, self.settings.images)
        except (RedisError, OSError) as exc:
            if not self.down:
                self.down = True
                log.warning("cannot read image announcements (keeping the versions this node has): %s", exc)
            return []
        if self.down:
            self.down = False
            log.info("image announcements readable again")
        for problem in problems.values():
            log.warning("%s", problem)
        loop = asyncio.get_running_loop()
        took: list[str] = []
        current = await loop.run_in_executor(None, self.followed)
        for a in announce.due(announced, current, self.failed, self.clock(), self.settings.retry_s):
            t0 = time.monotonic()
            try:
                got, url = await loop.run_in_executor(None, self._pull, a)
            except ImageError as exc:
                self.failed[(a.name, a.version)] = self.clock()
                log.error("announced %s@%s refused: %s", a.name, a.version, exc.detail)
                self.record(Event(kind="image_refused", image_digest=a.version,
                                  detail={"image": a.name, "version": a.version, "urls": list(a.urls),
                                          "error": str(exc.detail), "announced_by": a.node}))
                continue
            took.append(a.version)
            self.failed = {k: v for k, v in self.failed.items() if k[0] != a.name}
            log.info("following %s@%s (from %s, %d bytes)", a.name, a.version, url, got.bytes)
            self.record(Event(kind="image_followed", image_digest=a.version, duration_s=time.monotonic() - t0,
                              detail={"image": a.name, "version": a.version, "previous": current.get(a.name),
                                      "from": url, "objects": got.objects, "bytes": got.bytes,
                                      "announced_by": a.node}))
        return took

    def _pull(self, a: announce.Announcement) -> tuple[Pulled, str]:
        """Pull from each URL in turn; the version is followed only once one gave all of it."""
        errors = []
        for url in a.urls:
            try:
                got = pull(url, a.name, a.version, self.store, self.fetch)
            except ImageError as exc:
                errors.append(f"{url}: {exc.detail}")
                continue
            self.store.set_followed(a.name, got.version)
            return got, url
        raise ImageError("; ".join(errors) or "the announcement names no URL")

    async def close(self) -> None:
        await background.stop(self._task)
        try:
            await self.client.aclose()
        except (RedisError, OSError):
            pass
