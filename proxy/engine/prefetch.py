"""Predictive summoning: which routes follow a route, and which of them a request wakes.

Why: with one instance per URL a cold page load costs two boots in a row (the page's,
then, once the browser has read it, its stylesheet's and images'). summon knows what
follows a page, so it boots those pools together with the page's own: one wave.

Two sources of followers, both only for routes that pre-summon (`Route.presummon`,
else `[prefetch].enabled`):

* static: the route's `prefetch` URL paths (written by `summon routes split-site` from
  the page's HTML and CSS), resolved to routes of the same host by `resolve_static`;
* learned: `learn` over request observations (time, client hash, route): per route, the
  routes the same client asked for within `learn_window` after it, in at least
  `learn_threshold` of the route's visits and over at least `learn_min_count` visits.

No I/O and no clock here: the fleet (proxy/engine/fleet.py) asks `Prefetcher.choose`
which followers to boot and applies the capacity rules (free slots only, never one a
real request waits for, unused pre-summons reclaimed first and idled out on
`unused_idle_timeout`, and with `low_priority` started in the background: at a low CPU
priority until a request queues for them or they are ready, `Foreground`); the shell records observations and
rebuilds the learned table in the background (proxy/runtime/learning.py).
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import NamedTuple

from ..config import PrefetchSettings, Route

Followers = dict[str, tuple[str, ...]]


class Observation(NamedTuple):
    """One request, as learning sees it: when, whose (a hash, never the address), where."""

    ts: float
    client: str
    route: str


def presummons(route: Route, settings: PrefetchSettings) -> bool:
    """Does a request on `route` wake its followers? The route says, else the global switch."""
    return route.presummon if route.presummon is not None else settings.enabled


def resolve_static(routes: Iterable[Route]) -> Followers:
    """Each summoned route's `prefetch` paths as route names: a route of the same host whose
    `url` is the path, else the one whose `path` is its longest prefix (as the routing table
    would match it). Paths that match no summoned route (a static one, or nothing) drop out;
    so does the route itself."""
    by_host: dict[str, tuple[dict[str, str], list[tuple[str, str]]]] = {}
    summoned = [r for r in routes if r.summoned]
    for r in summoned:
        urls, prefixes = by_host.setdefault(r.host, ({}, []))
        if r.url is not None:
            urls[r.url] = r.name
        elif r.path is not None:
            prefixes.append((r.path, r.name))
    for _urls, prefixes in by_host.values():
        prefixes.sort(key=lambda p: -len(p[0]))
    out: Followers = {}
    for r in summoned:
        if not r.prefetch:
            continue
        urls, prefixes = by_host.get(r.host, ({}, []))
        names: list[str] = []
        for path in r.prefetch:
            name = urls.get(path) or next((n for p, n in prefixes if _under(path, p)), None)
            if name is not None and name != r.name and name not in names:
                names.append(name)
        if names:
            out[r.name] = tuple(names)
    return out


def _under(path: str, prefix: str) -> bool:
    """Segment-wise prefix, as `proxy.routing.table` matches `path` routes."""
    p = prefix.rstrip("/")
    return path == p or path.startswith(p + "/") or prefix == "/"


def learn(observations: Iterable[Observation], window_s: float, threshold: float, min_count: int,
          limit: int) -> Followers:
    """Per route A: the routes B that the same client requested within `window_s` after a
    request for A, in at least `threshold` of A's requests (each B counted once per request
    for A), A having been requested at least `min_count` times. Most confident first, at
    most `limit` per route; a route never follows itself."""
    per_client: dict[str, list[tuple[float, str]]] = defaultdict(list)
    for ob in observations:
        per_client[ob.client].append((ob.ts, ob.route))
    visits: dict[str, int] = defaultdict(int)
    pairs: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for seq in per_client.values():
        seq.sort()
        for i, (t, a) in enumerate(seq):
            visits[a] += 1
            seen: set[str] = set()
            for t2, b in seq[i + 1:]:
                if t2 - t > window_s:
                    break
                if b != a and b not in seen:
                    seen.add(b)
                    pairs[a][b] += 1
    out: Followers = {}
    for a, n in visits.items():
        if n < min_count:
            continue
        sure = sorted(((c / n, b) for b, c in pairs[a].items() if c / n >= threshold), key=lambda x: (-x[0], x[1]))
        if sure:
            out[a] = tuple(b for _, b in sure[:limit])
    return out


def client_hash(client_ip: str, salt: bytes) -> str:
    """A short keyed hash of the client's address: enough to tell one client's requests from
    another's, not to recover the address (the salt is the proxy's own, never logged)."""
    return hashlib.blake2b(client_ip.encode(), key=salt, digest_size=6).hexdigest()


def sampled(client: str, share: float) -> bool:
    """Whole clients are sampled, never single requests: learning needs a client's sequence."""
    return share >= 1.0 or int(client[:4], 16) < share * 0x10000


class Prefetcher:
    """What the fleet keeps for predictive summoning: the settings, which routes pre-summon,
    and their followers (static, then learned)."""

    def __init__(self, settings: PrefetchSettings | None = None) -> None:
        self.settings = settings or PrefetchSettings()
        self.on: frozenset[str] = frozenset()  # routes whose requests wake followers
        self.static: Followers = {}
        self.learned: Followers = {}
        self._merged: Followers = {}

    def set_routes(self, routes: Iterable[Route]) -> None:
        routes = [r for r in routes if r.summoned]
        self.on = frozenset(r.name for r in routes if presummons(r, self.settings))
        self.static = resolve_static(routes)
        self._merge()

    def set_learned(self, learned: Followers) -> None:
        self.learned = dict(learned)
        self._merge()

    def _merge(self) -> None:
        merged: Followers = {}
        for name in self.on:
            both = dict.fromkeys((*self.static.get(name, ()), *self.learned.get(name, ())))
            both.pop(name, None)
            if both:
                merged[name] = tuple(both)
        self._merged = merged

    def followers(self, route: str) -> tuple[str, ...]:
        return self._merged.get(route, ())

    def choose(self, route: str, cold: Callable[[str], bool]) -> list[str]:
        """The followers a request on `route` wakes: those whose pools are `cold` (no
        instance, nobody waiting, not backing off), at most `max_followers`, in order."""
        chosen: list[str] = []
        for name in self._merged.get(route, ()):
            if len(chosen) >= self.settings.max_followers:
                break
            if cold(name):
                chosen.append(name)
        return chosen
