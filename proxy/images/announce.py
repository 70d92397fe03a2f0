"""New image versions announced through the cluster's Redis, for edges the centre cannot reach.

Why: `summon images push` needs the centre to reach a host's libvirt; an edge behind NAT
can only reach out. So the centre writes what is new where every node already looks (the
fleet's Redis), and an edge that follows the image (``[images] follow``) pulls it itself,
by digest, from the store URL the announcement names (`proxy.images.distribute.pull`).

Keys (under the fleet's ``{summon}`` hash tag, beside the registry):

    {summon}:images:announced  HASH   NAME -> JSON {"version", "urls", "node", "at"}  the latest, per image
    {summon}:images:announces  STREAM one entry per announcement, same fields (capped ~10 000)

An edge reads only the hash (one HMGET for the images it follows, every `follow_every`):
however long it was away, it needs the latest version, not the ones in between. The
stream is the history, for people (``redis-cli XRANGE '{summon}:images:announces' - +``).
Both are written in one MULTI/EXEC, so they never disagree.

Trust: an announcement is a hint, not a credential. The edge asks for the version by its
digest and checks every byte it is sent against it (the manifest hashes to the version, each
artefact to what the manifest records); a wrong URL, a tampered store or a man in the
middle yields a refusal (an ``image_refused`` event), never a version. `due` is the plain
decision of what to pull now, tested without Redis.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ..cluster.redis_store import PREFIX
from ..errors import ImageError
from .store import hex_of

ANNOUNCED = PREFIX + "images:announced"
ANNOUNCES = PREFIX + "images:announces"
MAXLEN = 10_000


@dataclass(frozen=True)
class Announcement:
    name: str
    version: str  # sha256:<hex> of the manifest
    urls: tuple[str, ...]  # summon admin addresses serving GET /images/sha256/<hex>, tried in order
    node: str = ""  # who announced it
    at: float = 0.0  # unix time of the announcement

    def fields(self) -> dict[str, str]:
        return {"name": self.name, "version": self.version, "urls": json.dumps(list(self.urls)),
                "node": self.node, "at": repr(self.at)}

    def encode(self) -> str:
        return json.dumps({"version": self.version, "urls": list(self.urls), "node": self.node, "at": self.at},
                          separators=(",", ":"))


def decode(name: str, raw: Any) -> Announcement:
    """An announcement read back from the hash; ImageError if it is not one (written by hand)."""
    try:
        d = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
        version = "sha256:" + hex_of(str(d["version"]))
        urls = d["urls"]
        if not isinstance(urls, list) or not urls or not all(isinstance(u, str) and u for u in urls):
            raise ValueError("urls must be a non-empty list of strings")
        return Announcement(name, version, tuple(urls), str(d.get("node", "")), float(d.get("at", 0.0)))
    except (ValueError, KeyError, TypeError, AttributeError, ImageError) as exc:
        raise ImageError(f"the announcement of {name!r} in {ANNOUNCED} is unreadable: {exc}") from exc


def announce(client: Any, a: Announcement) -> None:
    """Write `a` (a blocking redis.Redis client: the CLI's); RedisError/OSError pass up."""
    pipe = client.pipeline(transaction=True)
    pipe.hset(ANNOUNCED, a.name, a.encode())
    pipe.xadd(ANNOUNCES, a.fields(), maxlen=MAXLEN, approximate=True)
    pipe.execute()


async def read(client: Any, names: Iterable[str]) -> tuple[dict[str, Announcement], dict[str, str]]:
    """The latest announcement of each name that has one (an asyncio client), and the
    problems of those that could not be read."""
    names = list(names)
    raw = await client.hmget(ANNOUNCED, names)
    found: dict[str, Announcement] = {}
    problems: dict[str, str] = {}
    for name, value in zip(names, raw, strict=True):
        if value is None:
            continue
        try:
            found[name] = decode(name, value)
        except ImageError as exc:
            problems[name] = str(exc.detail)
    return found, problems


def due(announced: dict[str, Announcement], followed: dict[str, str | None],
        failed: dict[tuple[str, str], float], now: float, retry_s: float) -> list[Announcement]:
    """What to pull now: an announced version other than the one followed, unless that
    version failed (or was refused) less than `retry_s` ago. A version that failed is tried
    again later (the centre's store may have been repaired, the link may be back); its
    refusal is never a reason to keep an older version from being replaced by a newer one."""
    out = []
    for name in sorted(announced):
        a = announced[name]
        if followed.get(name) == a.version:
            continue
        at = failed.get((name, a.version))
        if at is not None and now - at < retry_s:
            continue
        out.append(a)
    return out
