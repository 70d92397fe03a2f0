"""The decision endpoint's logic: which replica a host proxy (nginx, Caddy, HAProxy) should
send one request to, and how long that request counts as in flight.

How this works: the host proxy describes the client's request in `X-Original-Method`,
`X-Original-URI`, `X-Original-Host` and `X-Forwarded-For` (its other header fields are
the client's own, which nginx and Caddy pass on by themselves). `original_head` turns
that into the same `RequestHead` the native front builds, with the same validation, so
the route table, the hash key (`header:NAME` and `cookie:NAME` included), the region and
the engine's cap and queue all apply unchanged: `Decider.decide` asks the `Dispatcher` and
the route's `Pool` exactly as the native front and the mitmproxy addon do, and waits
while a cold pool boots (the engine bounds the wait by the route's `boot_timeout`).

A host proxy cannot retry a booting instance's trial request the way the native front
does, so a trial lease is handed straight to the health probe (`Lease.hand_over`): the
answer goes out once the instance is ready, and an instance that never gets there fails
the call with the engine's 503.

The host proxy carries the bytes, so summon never sees a request end. Each grant is a
`Held` lease, named by an id the host proxy gets back in `X-Summon-Lease`:
- a host proxy with a completion hook (nginx `post_action`, HAProxy's response phase)
  says so with `X-Summon-Done: 1` and calls `/done?lease=ID` when the request is over;
  a call lost on the way is made good after `[plugin] lease_timeout`;
- one without (Caddy) gets a lease that ends by itself after an estimate of how long
  the route's requests take: the mean of what /done calls measured on that route, or
  `[plugin] lease_estimate` before any did. By Little's law the leases held at any time
  are then the decision rate times that duration, which is what the engine's scale-out
  and idle timers need.
A host proxy that caches decisions (nginx's shipped config: `proxy_cache` on the
decision's location, keyed by method, host, URI and client address, asking with
`X-Summon-Cache: 1`) is told it may reuse a warm decision for `[plugin] cache` seconds
(`X-Accel-Expires`) only where reusing it gives the same answer the engine would:
- the pool is steady (`FleetEngine.steady`): all its replicas ready, none booting or
  draining, none queued, and already `max_replicas` of them, so no scale-out can
  follow (a static route always is). A pool that may still scale out is never
  cached: its load has to be seen request by request;
- the hash key is in the cache key: the client's address and the URI are, and a
  `header:NAME` or `cookie:NAME` key adds `Vary: NAME` / `Vary: Cookie`, as the
  region header does (`Vary: X-Client-Region`);
- a cold decision (one that waited for a boot) and every refusal are not cached.
Such a grant has no lease id (the host proxy calls no /done for it): summon holds its
lease for the cache time plus the route's estimate, so the replica is neither drained
nor idled out while the host proxy may still send to it, and a route whose traffic
stops idles out as before. What is lost: the cached requests are not counted one by
one (a steady pool needs no scale-out decision), and a replica that dies is still
named for up to the cache time (the host proxy's 502 for that second).

The clock is passed in; `expire(now)` is called by the server shell's timer.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..config import Config, PluginSettings, Route
from ..errors import BadRequest, SummonError, Unavailable
from ..http.message import RequestHead, client_trusted, parse_head
from ..routing.contracts import Lease
from ..routing.dispatch import Dispatcher

# Fields that describe the original request, or talk to summon: not the client's own.
ORIGINAL = frozenset({b"x-original-method", b"x-original-uri", b"x-original-host", b"x-forwarded-for"})
_OURS = frozenset({b"host", b"content-length", b"transfer-encoding", b"connection", b"keep-alive",
                   b"x-summon-token", b"x-summon-done", b"x-summon-cache", b"x-forwarded-method", b"x-forwarded-uri",
                   b"x-forwarded-host", b"x-forwarded-proto"})
_EWMA = 0.2  # weight of the newest duration in a route's mean


@dataclass(frozen=True)
class Original:
    head: RequestHead
    client_ip: str
    region: str | None


def client_of(xff: bytes | None, trusted: Sequence[object]) -> str:
    """The client's address: the rightmost X-Forwarded-For entry that is not one of
    `trusted_proxies` (the host proxy appends the peer it saw; a CDN in front of it
    may have appended the real client before that)."""
    if not xff:
        return ""
    entries = [e.strip() for e in xff.decode("latin-1").split(",") if e.strip()]
    for entry in reversed(entries):
        if not client_trusted(entry, trusted):  # type: ignore[arg-type]
            return entry
    return entries[0] if entries else ""


def original_head(headers: list[tuple[bytes, bytes]], config: Config) -> Original:
    """The client's request as the host proxy describes it; a `ClientError` when the
    description is incomplete or the request is one the native front would refuse."""
    found: dict[bytes, bytes] = {}
    rest: list[tuple[bytes, bytes]] = []
    for name, value in headers:
        lname = name.lower()
        if lname in ORIGINAL:
            if lname in found:
                raise BadRequest(f"{name.decode('latin-1')} given twice")
            found[lname] = value.strip()
        elif lname not in _OURS:
            rest.append((name, value))
    method = found.get(b"x-original-method", b"").decode("latin-1")
    uri = found.get(b"x-original-uri")
    host = found.get(b"x-original-host")
    if not method or not uri or host is None:
        raise BadRequest("describe the request in X-Original-Method, X-Original-URI and X-Original-Host")
    p = config.proxy
    head = parse_head(method, uri, "1.1", [(b"Host", host), *rest], keep_alive=True,
                      max_header_count=p.max_header_count)
    client_ip = client_of(found.get(b"x-forwarded-for"), p.trusted_proxies)
    region = None
    if client_trusted(client_ip, p.trusted_proxies):  # as the native front: only trusted peers may say
        said = head.header(b"x-client-region")
        if said:
            region = said.decode("ascii", "replace").strip()
    return Original(head, client_ip, region)


@dataclass(frozen=True)
class Grant:
    upstream: str  # HOST:PORT
    instance: str
    lease: str
    route: str
    cache_s: int = 0  # > 0: the host proxy may reuse this decision so long (no /done then)
    vary: str = ""  # the request fields the decision depends on, besides the cache key


@dataclass
class Held:
    lease: Lease
    route: str
    started: float
    expires: float
    hooked: bool


@dataclass
class Decider:
    dispatcher: Dispatcher
    config: Callable[[], Config]  # the current one: a reload swaps it
    settings: PluginSettings
    clock: Callable[[], float]
    held: dict[str, Held] = field(default_factory=dict)
    durations: dict[str, float] = field(default_factory=dict)  # route -> mean seconds, from /done
    draining: bool = False
    decisions: int = 0  # grants made, cached ones included: what a cache saves shows here
    _deadlines: list[tuple[float, str]] = field(default_factory=list)  # heap of (expires, lease id)
    _ids: itertools.count[int] = field(default_factory=itertools.count)
    _prefix: str = field(default_factory=lambda: secrets.token_hex(4))

    async def decide(self, headers: list[tuple[bytes, bytes]], hooked: bool, cache: bool = False) -> Grant:
        """A replica for the described request, or a `SummonError` (404, 503...).
        `cache`: the host proxy caches decisions it is told it may (module docstring)."""
        if self.draining:
            raise Unavailable("shutting down", retry_after_s=1)
        orig = original_head(headers, self.config())
        route = self.dispatcher.lookup(orig.head)
        got = self.dispatcher.acquire(route, orig.head, orig.client_ip, orig.region)
        if not isinstance(got, asyncio.Future):  # warm: the common case, no wait
            if cache and self.settings.cache_s > 0 and self._steady(route.name):
                return self._cached(got, route)
            return self._hold(got, route.name, hooked)
        lease = await _booted(got, route.boot_timeout_s)
        if lease.trial:
            lease = await _probed(lease, route.boot_timeout_s)
        elif not await _answers_or_release(lease):
            # A trial can be abandoned (its instance died) before this coroutine ran and
            # could attach `on_abandon`; it then looks like a plain lease. Handing out a
            # dead address would be the host proxy's 502: the client gets summon's 503.
            lease.release(False)  # on a dead instance this changes nothing
            raise Unavailable("the instance went away while it was summoned", retry_after_s=1)
        return self._hold(lease, route.name, hooked)

    def _hold(self, lease: Lease, route: str, hooked: bool, ttl: float | None = None) -> Grant:
        now = self.clock()
        self.decisions += 1
        lid = f"{self._prefix}{next(self._ids):x}"
        if ttl is None:
            ttl = self.settings.lease_timeout_s if hooked else self.estimate(route)
        self.held[lid] = Held(lease, route, now, now + ttl, hooked)
        heapq.heappush(self._deadlines, (now + ttl, lid))
        instance = getattr(lease, "instance_id", None) or str(lease.address)
        return Grant(str(lease.address), instance, lid, route)

    def _steady(self, route: str) -> bool:
        steady = getattr(self.dispatcher.pools.get(route), "steady", None)
        return bool(steady is not None and steady())

    def _cached(self, lease: Lease, route: Route) -> Grant:
        """A grant the host proxy may reuse for `cache_s`: its lease is held that long,
        plus the route's estimate for the last request sent under it."""
        grant = self._hold(lease, route.name, False, self.settings.cache_s + self.estimate(route.name))
        vary = ["X-Client-Region"]
        kind, _, name = route.hash_key.partition(":")
        if kind == "header":
            vary.append(name)
        elif kind == "cookie":
            vary.append("Cookie")
        return Grant(grant.upstream, grant.instance, "", route.name, self.settings.cache_s, ", ".join(vary))

    def estimate(self, route: str) -> float:
        """How long an unhooked request on `route` counts as in flight."""
        return self.durations.get(route, self.settings.lease_estimate_s)

    def done(self, lease_id: str, ok: bool = True) -> bool:
        """The host proxy says the request is over; False for a lease not (or no longer) held."""
        held = self.held.pop(lease_id, None)
        if held is None:
            return False
        took = max(0.0, self.clock() - held.started)
        mean = self.durations.get(held.route)
        self.durations[held.route] = took if mean is None else mean + _EWMA * (took - mean)
        held.lease.release(ok)
        return True

    def expire(self, now: float) -> int:
        """Give back every lease past its time; returns how many."""
        n = 0
        heap = self._deadlines
        while heap and heap[0][0] <= now:
            _, lid = heapq.heappop(heap)
            held = self.held.pop(lid, None)
            if held is not None:
                held.lease.release(True)
                n += 1
        return n

    def release_all(self) -> None:
        for held in self.held.values():
            held.lease.release(True)
        self.held.clear()
        self._deadlines.clear()


async def _booted(fut: asyncio.Future[Lease], boot_timeout_s: float) -> Lease:
    """Wait for a cold pool's lease. The engine answers by `boot_timeout` (a 503 when the
    instance is not ready by then); the extra second here only guards against a lost answer."""
    try:
        return await asyncio.wait_for(asyncio.shield(fut), boot_timeout_s + 1.0)
    except TimeoutError:
        _give_up(fut)
        raise Unavailable("no instance became ready in time", retry_after_s=1) from None
    except asyncio.CancelledError:
        _give_up(fut)  # the host proxy hung up
        raise


def _give_up(fut: asyncio.Future[Lease]) -> None:
    """Leave the boot queue; a lease granted in the moment before (the future is done but
    this coroutine had not run yet) is given back, or it would be held forever."""
    if fut.done():
        if not fut.cancelled() and fut.exception() is None:
            fut.result().release(True)
    else:
        fut.cancel()


async def _answers(lease: Lease, timeout_s: float = 2.0) -> bool:
    """Whether the instance accepts a connection (checked once, on the cold path only)."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(lease.address.host, lease.address.port), timeout_s)
    except (OSError, TimeoutError):
        return False
    writer.close()
    return True


async def _answers_or_release(lease: Lease) -> bool:
    """`_answers`, giving the lease back when the host proxy hangs up meanwhile."""
    try:
        return await _answers(lease)
    except asyncio.CancelledError:
        lease.release(True)
        raise


async def _probed(lease: Lease, boot_timeout_s: float) -> Lease:
    """A trial lease: the host proxy cannot retry it, so the health probe decides when the
    instance is ready (see the module docstring)."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def on_ready() -> None:
        if not ready.done():
            ready.set_result(None)

    def on_abandon(exc: SummonError) -> None:
        if not ready.done():
            ready.set_exception(exc)

    lease.on_abandon = on_abandon
    lease.hand_over(on_ready)
    try:
        await asyncio.wait_for(ready, boot_timeout_s + 1.0)
    except SummonError:
        raise  # abandoned: the pool has taken the lease back already
    except TimeoutError:
        lease.release(False)
        raise Unavailable("the instance did not become ready in time", retry_after_s=1) from None
    except asyncio.CancelledError:
        lease.release(False)  # the host proxy hung up
        raise
    finally:
        lease.on_abandon = None
    return lease
