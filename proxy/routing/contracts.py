"""The contracts between the fronts, routing and the runtime: what a pool promises.

Both fronts (the native one in `proxy.http`, the mitmproxy addon) ask a `Dispatcher`
(`proxy.routing.dispatch`) for a route and then its `Pool` for a `Lease` on one replica;
static pools (`proxy.routing.dispatch.StaticPool`) and summoned pools
(`proxy.runtime.summoner.SummonedPool`) both implement `Pool`. The front never learns
which kind it holds. See docs/architecture.md for the data flow of one request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

from ..config import Address, Route
from ..errors import SummonError
from ..http.message import RequestHead


class Lease(Protocol):
    """A claim on one replica for one request; `release` is called exactly once (unless
    the lease is abandoned: then the pool has already taken it back)."""

    address: Address
    trial: bool  # the first request sent to a booting instance (proxy.http.exchange explains trials)
    forwarder: bool  # the address accepts before the guest listens (QEMU user networking): a trial may hang
    on_abandon: Callable[[SummonError], None] | None

    def release(self, ok: bool) -> None: ...

    def confirm(self) -> None:
        """The instance answered a trial request."""
        ...

    def hand_over(self, on_ready: Callable[[], None]) -> None:
        """A trial request got a 5xx: let the health probe decide; `on_ready` once ready."""
        ...


class Pool(Protocol):
    route: Route

    def acquire(self, head: RequestHead, client_ip: str, region: str | None,
                avoid: Lease | None = None) -> Lease | asyncio.Future[Lease]: ...
