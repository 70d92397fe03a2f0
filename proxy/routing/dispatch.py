"""From a request head to a replica: the route table plus one pool per route.

How this works: `Dispatcher.lookup` finds the route; `acquire` asks the route's pool for
a lease. A static pool (fixed `upstreams`) answers at once. A summoned pool (an `image`)
answers at once when a replica is ready, else with a future that resolves when the
engine has booted one (see `proxy.runtime.summoner`). Both pick replicas with the same
bounded-load consistent-hash balancer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from ..config import Address, Route
from ..engine.balancer import BoundedLoadBalancer
from ..errors import SummonError
from ..http.message import RequestHead
from .contracts import Lease, Pool
from .table import RouteTable


def hash_key(route: Route, head: RequestHead, client_ip: str) -> str:
    kind = route.hash_key
    if kind == "client":
        return client_ip
    if kind == "path":
        return head.path
    name = kind.split(":", 1)[1].lower().encode()
    if kind.startswith("header:"):
        value = head.header(name)
        return value.decode("latin-1") if value else client_ip
    cookie = head.header(b"cookie") or b""
    for part in cookie.split(b";"):
        k, _, v = part.strip().partition(b"=")
        if k.lower() == name:
            return v.decode("latin-1")
    return client_ip


class StaticLease:
    __slots__ = ("address", "node", "pool")
    trial = False  # static upstreams are always-on: never a trial
    forwarder = False
    on_abandon: Callable[[SummonError], None] | None = None

    def __init__(self, pool: StaticPool, node: str, address: Address) -> None:
        self.pool = pool
        self.node = node
        self.address = address

    def release(self, ok: bool) -> None:
        self.pool.balancer.release(self.node)

    def confirm(self) -> None:
        pass

    def hand_over(self, on_ready: Callable[[], None]) -> None:
        pass


class StaticPool:
    """Always-on replicas at fixed addresses: no summoning."""

    def __init__(self, route: Route, balance_factor: float = 1.25) -> None:
        self.route = route
        self.balancer = BoundedLoadBalancer(balance_factor)
        self.addresses: dict[str, Address] = {}
        for addr in route.upstreams:
            self.addresses[str(addr)] = addr
            self.balancer.add(str(addr))
        self.only = next(iter(self.addresses)) if len(self.addresses) == 1 else None

    def acquire(self, head: RequestHead, client_ip: str, region: str | None, avoid: Lease | None = None) -> Lease:
        if self.only is not None:
            # One replica: nothing to choose (pick would return it, even when excluded).
            node = self.only
        else:
            picked = self.balancer.pick(hash_key(self.route, head, client_ip), exclude=getattr(avoid, "node", None))
            assert picked is not None
            node = picked
        self.balancer.acquire(node)
        return StaticLease(self, node, self.addresses[node])

    def steady(self) -> bool:
        """Fixed replicas: a decision may always be reused (see `SummonedPool.steady`)."""
        return True


class Dispatcher:
    def __init__(self, table: RouteTable, pool_for: Callable[[Route], Pool]) -> None:
        self.table = table
        self.pool_for = pool_for
        self.pools: dict[str, Pool] = {}

    def lookup(self, head: RequestHead) -> Route:
        return self.table.lookup(head.host, head.path)

    def acquire(self, route: Route, head: RequestHead, client_ip: str, region: str | None,
                avoid: Lease | None = None) -> Lease | asyncio.Future[Lease]:
        pool = self.pools.get(route.name)
        if pool is None:
            pool = self.pools[route.name] = self.pool_for(route)
        return pool.acquire(head, client_ip, region, avoid)
