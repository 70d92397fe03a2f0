"""The decision endpoint's logic (proxy.plugin.decide) with static and fake pools and a
fake clock: how the described request is read, which lease it gets, and when a lease ends."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Callable
from pathlib import Path

import pytest

from proxy.config import Address, Config, Limits, PluginSettings, ProxySettings, Route
from proxy.errors import BadRequest, NotFound, SummonError, Unavailable
from proxy.http.message import RequestHead
from proxy.plugin.decide import Decider, client_of, original_head
from proxy.routing.contracts import Lease, Pool
from proxy.routing.dispatch import Dispatcher, StaticPool
from proxy.routing.table import RouteTable

A, B = Address("127.0.0.1", 9001), Address("127.0.0.1", 9002)
STATIC = Route(name="static", host="static", path="/", upstreams=(A, B), hash_key="header:x-user")
SUMMONED = Route(name="summoned", host="cold", path="/", image="site", boot_timeout_s=5.0)


def config(*routes: Route, trusted: str | None = None) -> Config:
    proxy = ProxySettings(trusted_proxies=(ipaddress.ip_network(trusted),) if trusted else ())
    return Config(path="summon.toml", proxy=proxy, limits=Limits(), regions=(), hosts=(), routes=routes,
                  images_dir=Path("images"), events_path=Path("events.db"))


def described(host: str, uri: str = "/", xff: str = "10.0.0.7", **extra: str) -> list[tuple[bytes, bytes]]:
    fields = [(b"X-Original-Method", b"GET"), (b"X-Original-URI", uri.encode()), (b"X-Original-Host", host.encode()),
              (b"X-Forwarded-For", xff.encode()), (b"Host", b"127.0.0.1:8082")]
    return fields + [(k.replace("_", "-").encode(), v.encode()) for k, v in extra.items()]


class FakeLease:
    def __init__(self, address: Address, trial: bool = False) -> None:
        self.address = address
        self.instance_id = "i-1"
        self.trial = trial
        self.on_abandon: Callable[[SummonError], None] | None = None
        self.released: list[bool] = []
        self.handed_over: Callable[[], None] | None = None

    def release(self, ok: bool) -> None:
        self.released.append(ok)

    def confirm(self) -> None:
        self.trial = False

    def hand_over(self, on_ready: Callable[[], None]) -> None:
        self.trial = False
        self.handed_over = on_ready


class FakePool:
    """A summoned pool stand-in: every acquire answers with the future it is given."""

    def __init__(self, route: Route) -> None:
        self.route = route
        self.futures: list[asyncio.Future[Lease]] = []
        self.heads: list[tuple[RequestHead, str, str | None]] = []

    def acquire(self, head: RequestHead, client_ip: str, region: str | None,
                avoid: Lease | None = None) -> asyncio.Future[Lease]:
        self.heads.append((head, client_ip, region))
        fut: asyncio.Future[Lease] = asyncio.get_running_loop().create_future()
        self.futures.append(fut)
        return fut


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def decider(cfg: Config, clock: Clock, fake: FakePool | None = None, **settings: float) -> Decider:
    def pool_for(route: Route) -> Pool:
        return StaticPool(route) if route.upstreams else fake  # type: ignore[return-value]

    return Decider(Dispatcher(RouteTable(cfg.routes), pool_for), lambda: cfg,
                   PluginSettings(listen=Address("127.0.0.1", 8082), **settings), clock)


# --- reading the description ------------------------------------------------------------


def test_the_description_becomes_the_native_fronts_head() -> None:
    orig = original_head(described("Static:8080", "/a/../b?q=1", X_User="ann", Cookie="c=1"), config(STATIC))
    assert (orig.head.method, orig.head.host, orig.head.path, orig.head.query) == ("GET", "static", "/b", b"?q=1")
    assert orig.head.header(b"x-user") == b"ann" and orig.head.header(b"cookie") == b"c=1"  # hash keys see them
    assert orig.head.header(b"x-original-uri") is None  # the description is not the client's
    assert orig.client_ip == "10.0.0.7"


@pytest.mark.parametrize("drop", [b"X-Original-Method", b"X-Original-URI", b"X-Original-Host"])
def test_an_incomplete_description_is_a_400(drop: bytes) -> None:
    with pytest.raises(BadRequest):
        original_head([f for f in described("static") if f[0] != drop], config(STATIC))


def test_a_description_given_twice_is_a_400() -> None:
    with pytest.raises(BadRequest, match="twice"):
        original_head(described("static") + [(b"X-Original-Host", b"other")], config(STATIC))


def test_what_the_native_front_refuses_is_refused() -> None:
    with pytest.raises(BadRequest):
        original_head(described("static", "/%00"), config(STATIC))


def test_the_client_is_the_rightmost_untrusted_forwarded_address() -> None:
    trusted = (ipaddress.ip_network("192.168.0.0/16"),)
    assert client_of(b"1.2.3.4, 192.168.1.1", trusted) == "1.2.3.4"
    assert client_of(b"1.2.3.4, 5.6.7.8", trusted) == "5.6.7.8"  # 1.2.3.4 is only what 5.6.7.8 said
    assert client_of(b"192.168.1.1", trusted) == "192.168.1.1"
    assert client_of(None, trusted) == ""


def test_only_a_trusted_client_may_name_its_region() -> None:
    cfg = config(STATIC, trusted="10.0.0.0/8")
    assert original_head(described("static", X_Client_Region="eu"), cfg).region == "eu"
    assert original_head(described("static", xff="8.8.8.8", X_Client_Region="eu"), cfg).region is None


# --- leases -------------------------------------------------------------------------------


def test_a_static_route_answers_with_a_replica_by_its_hash_key() -> None:
    async def go() -> None:
        d = decider(config(STATIC), Clock())
        first = await d.decide(described("static", X_User="ann"), hooked=True)
        again = await d.decide(described("static", X_User="ann"), hooked=True)
        assert first.upstream in (str(A), str(B)) and again.upstream == first.upstream
        assert first.route == "static" and first.lease != again.lease and len(d.held) == 2

    asyncio.run(go())


def test_no_route_is_not_found() -> None:
    async def go() -> None:
        with pytest.raises(NotFound):
            await decider(config(STATIC), Clock()).decide(described("nowhere"), hooked=False)

    asyncio.run(go())


def test_a_hooked_lease_ends_at_done_or_at_lease_timeout() -> None:
    async def go() -> None:
        clock = Clock()
        d = decider(config(STATIC), clock, lease_timeout_s=60.0)
        one = await d.decide(described("static"), hooked=True)
        two = await d.decide(described("static", xff="10.9.9.9"), hooked=True)
        balancer = d.dispatcher.pools["static"].balancer  # type: ignore[attr-defined]
        assert sum(balancer.load.values()) == 2
        clock.now += 0.25
        assert d.done(one.lease) is True and d.done(one.lease) is False  # once
        assert d.durations["static"] == 0.25
        assert d.expire(clock.now + 59) == 0
        assert d.expire(clock.now + 61) == 1 and two.lease not in d.held
        assert sum(balancer.load.values()) == 0

    asyncio.run(go())


def test_an_unhooked_lease_lasts_the_estimate_then_the_measured_mean() -> None:
    async def go() -> None:
        clock = Clock()
        d = decider(config(STATIC), clock, lease_estimate_s=2.0)
        await d.decide(described("static"), hooked=False)
        assert d.expire(clock.now + 1.9) == 0 and d.expire(clock.now + 2.0) == 1
        measured = await d.decide(described("static"), hooked=True)
        clock.now += 0.5
        d.done(measured.lease)
        assert d.estimate("static") == 0.5
        await d.decide(described("static"), hooked=False)
        assert d.expire(clock.now + 0.5) == 1

    asyncio.run(go())


def test_a_cold_pool_is_awaited_and_a_trial_waits_for_the_probe() -> None:
    async def go() -> None:
        fake = FakePool(SUMMONED)
        d = decider(config(SUMMONED), Clock(), fake)
        call = asyncio.ensure_future(d.decide(described("cold"), hooked=True))
        await asyncio.sleep(0)
        lease = FakeLease(Address("127.0.0.1", 7000), trial=True)
        fake.futures[0].set_result(lease)
        for _ in range(5):
            await asyncio.sleep(0)
        assert not call.done() and lease.handed_over is not None  # the host proxy cannot retry a trial
        lease.handed_over()
        grant = await call
        assert (grant.upstream, grant.instance) == ("127.0.0.1:7000", "i-1") and lease.released == []

    asyncio.run(go())


def test_an_abandoned_trial_fails_the_call_without_a_second_release() -> None:
    async def go() -> None:
        fake = FakePool(SUMMONED)
        d = decider(config(SUMMONED), Clock(), fake)
        call = asyncio.ensure_future(d.decide(described("cold"), hooked=True))
        await asyncio.sleep(0)
        lease = FakeLease(Address("127.0.0.1", 7000), trial=True)
        fake.futures[0].set_result(lease)
        for _ in range(5):
            await asyncio.sleep(0)
        assert lease.on_abandon is not None
        lease.on_abandon(Unavailable("boot failed", retry_after_s=3))
        with pytest.raises(Unavailable):
            await call
        assert lease.released == [] and not d.held

    asyncio.run(go())


def test_a_host_proxy_that_hangs_up_leaves_the_boot_queue() -> None:
    async def go() -> None:
        fake = FakePool(SUMMONED)
        d = decider(config(SUMMONED), Clock(), fake)
        call = asyncio.ensure_future(d.decide(described("cold"), hooked=True))
        await asyncio.sleep(0)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert fake.futures[0].cancelled()  # the summoner takes a cancelled future out of the queue

    asyncio.run(go())


def test_while_draining_every_decision_is_a_503() -> None:
    async def go() -> None:
        d = decider(config(STATIC), Clock())
        d.draining = True
        with pytest.raises(Unavailable):
            await d.decide(described("static"), hooked=True)

    asyncio.run(go())


# --- the decision cache -----------------------------------------------------------------


def test_a_steady_pools_decision_may_be_reused_and_holds_its_lease_for_that_long() -> None:
    async def go() -> None:
        clock = Clock()
        d = decider(config(STATIC), clock, lease_estimate_s=0.5, cache_s=2)
        grant = await d.decide(described("static", X_User="ann"), hooked=True, cache=True)
        assert (grant.cache_s, grant.lease) == (2, "")  # no lease id: the host proxy calls no /done
        assert grant.vary == "X-Client-Region, x-user"  # the hash key's header varies the answer
        assert len(d.held) == 1
        assert d.expire(clock.now + 2.4) == 0 and d.expire(clock.now + 2.5) == 1  # cache time + estimate

    asyncio.run(go())


@pytest.mark.parametrize("cache,cache_s", [(False, 1), (True, 0)])
def test_without_the_host_proxy_asking_or_with_cache_off_every_decision_is_a_lease(cache: bool, cache_s: int) -> None:
    async def go() -> None:
        d = decider(config(STATIC), Clock(), cache_s=cache_s)
        grant = await d.decide(described("static"), hooked=True, cache=cache)
        assert grant.cache_s == 0 and grant.lease

    asyncio.run(go())


class SteadyPool(FakePool):
    def __init__(self, route: Route, steady: bool) -> None:
        super().__init__(route)
        self.is_steady = steady
        self.lease = FakeLease(Address("127.0.0.1", 7000))

    def acquire(self, head: RequestHead, client_ip: str, region: str | None,
                avoid: Lease | None = None) -> Lease | asyncio.Future[Lease]:
        return self.lease  # type: ignore[return-value]

    def steady(self) -> bool:
        return self.is_steady


@pytest.mark.parametrize("steady", [True, False])
def test_a_summoned_pool_is_cached_only_while_steady(steady: bool) -> None:
    async def go() -> None:
        d = decider(config(SUMMONED), Clock(), SteadyPool(SUMMONED, steady))
        grant = await d.decide(described("cold"), hooked=True, cache=True)
        assert bool(grant.cache_s) is steady and bool(grant.lease) is not steady

    asyncio.run(go())


def test_a_cold_decision_is_never_cached() -> None:
    async def go() -> None:
        listening = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
        fake = SteadyPool(SUMMONED, steady=True)  # steady by the time the boot is over
        fake.lease = FakeLease(Address("127.0.0.1", listening.sockets[0].getsockname()[1]))
        fut: asyncio.Future[Lease] = asyncio.get_running_loop().create_future()
        fake.acquire = lambda *a, **k: fut  # type: ignore[method-assign]
        d = decider(config(SUMMONED), Clock(), fake, cache_s=5)
        call = asyncio.ensure_future(d.decide(described("cold"), hooked=True, cache=True))
        await asyncio.sleep(0)
        fut.set_result(fake.lease)  # type: ignore[arg-type]
        grant = await call
        assert grant.cache_s == 0 and grant.lease in d.held
        listening.close()

    asyncio.run(go())
