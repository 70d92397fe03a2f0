"""What engines that share one fleet keep in common, and the contract of the store that holds it.

How this works: every engine (a worker, or a proxy on another machine) owns the instances
it booted. What they must agree on lives in a store, not in any one of them:

- **permits**: one per live instance, taken (`claim`) before a boot and given back
  (`release`) when the instance is gone; the store refuses a permit when the fleet holds
  `cap` of them, atomically, so no number of engines booting at once can pass the cap;
- **boot locks**: the first engine to claim a cold route also takes its lock; the others'
  claims are refused with "wait", and their requests wait for that engine's instance;
- **the registry**: each engine's instances (route, image, host, region, address, state),
  which the others route to, from a local copy, so the warm path never asks the store;
- **usage**: how many requests each engine has in flight on each instance, and how long
  since it last used it, so an owner sees the fleet's demand on its instances.

Everything an engine writes carries a lease (`expires`): `sync` renews them a few times a
second; an engine that dies (SIGKILL, a lost machine) stops renewing, and within the lease
its permits return to the pool and its instances leave every registry copy (the orphan
reaper of each host then stops what nobody owns).

Two stores implement this: `proxy.cluster.sqlite_store` (one machine, `workers = N`, no
server to run) and `proxy.cluster.redis_store` (several proxies, `[cluster] redis = ...`).
A store raises `StoreUnavailable` when it cannot be reached; the caller decides what a
degraded fleet may still do (`proxy.runtime.coordinator`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from ..errors import SummonError


class StoreUnavailable(SummonError):
    """The shared store did not answer (Redis down, a locked database): degraded mode."""

    status = 503
    reason = "Service Unavailable"


@dataclass(frozen=True)
class Entry:
    """One instance in the registry."""

    instance_id: str
    node: str
    route: str
    image: str
    host: str
    region: str
    address: str  # "HOST:PORT"; "" while booting
    state: str  # the engine's lifecycle state: booting | ready | draining
    machine: str = ""  # the owner's machine: a loopback address is only reachable from the same one


@dataclass(frozen=True)
class Claim:
    granted: bool
    reason: str = ""
    wait_s: float | None = None  # refused because another engine is booting the route: wait this long


@dataclass(frozen=True)
class Snapshot:
    """What `sync` brings back: the fleet as the store knows it now."""

    entries: tuple[Entry, ...]  # every engine's live instances, ours included
    usage: dict[str, tuple[int, float]]  # our instances: other engines' (in flight, seconds idle)
    permits: int  # permits held fleet-wide
    demand: dict[str, dict[str, float]] = field(default_factory=dict)  # others' demand: route -> region -> n


def sum_demand(per_node: Iterable[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Several engines' demand (route -> client region -> recent requests), added up."""
    total: dict[str, dict[str, float]] = {}
    for demand in per_node:
        for route, regions in demand.items():
            into = total.setdefault(route, {})
            for region, n in regions.items():
                into[region] = into.get(region, 0.0) + float(n)
    return total


class Store(Protocol):
    node: str

    async def claim(self, route: str, instance_id: str, cold: bool, cap: int, lock_s: float) -> Claim:
        """A permit for a new instance (and the route's boot lock when `cold`), or why not."""
        ...

    async def ready(self, entry: Entry) -> None:
        """The instance answers: it enters the registry as ready and the route's boot lock
        goes, in one step, so no engine can find neither the lock nor the instance."""
        ...

    async def release(self, route: str, instance_id: str) -> None:
        """The instance is gone (stopped, failed, refused): its permit, lock and entry go."""
        ...

    async def sync(self, mine: list[Entry], usage: dict[str, tuple[int, float]],
                   demand: dict[str, dict[str, float]] | None = None) -> Snapshot:
        """Renew our leases, publish our instances, our usage of anyone's and our demand by
        client region; read the fleet."""
        ...

    async def close(self) -> None: ...
