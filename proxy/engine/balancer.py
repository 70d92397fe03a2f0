"""Consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam 2017).

How this works: replicas sit on a ketama ring (uhashring). A request's key (client
address, path, a header or cookie) picks a point on the ring; we walk clockwise and
take the first replica whose in-flight count is below the bound
``ceil(balance_factor * (total_in_flight + 1) / replicas)``. With factor 1.25 (HAProxy's
hash-balance-factor of 125) no replica carries more than 25% over the mean, yet a key
stays on its replica while that replica is not overloaded, and adding or removing a
replica moves only about 1/N of the keys.

`preferred` narrows the first pass to replicas in the client's region; if none of them
is under the bound, the walk continues over all replicas (spill-over).

No I/O here; loads are counted by the caller through `acquire`/`release`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

from uhashring import HashRing


class BoundedLoadBalancer:
    def __init__(self, balance_factor: float = 1.25) -> None:
        if balance_factor < 1.0:
            raise ValueError("balance_factor must be >= 1.0")
        self.factor = balance_factor
        self.ring = HashRing(nodes=[])
        self.load: dict[str, int] = {}
        self.total = 0

    def __len__(self) -> int:
        return len(self.load)

    def __contains__(self, node: str) -> bool:
        return node in self.load

    def add(self, node: str) -> None:
        if node not in self.load:
            self.ring.add_node(node)
            self.load[node] = 0

    def remove(self, node: str) -> None:
        if node in self.load:
            self.ring.remove_node(node)
            self.total -= self.load.pop(node)

    def bound(self) -> int:
        n = len(self.load)
        return max(1, math.ceil(self.factor * (self.total + 1) / n)) if n else 0

    def pick(self, key: str, preferred: Callable[[str], bool] | None = None, exclude: str | None = None) -> str | None:
        """The replica for `key`, or None when there is no replica at all. `exclude`
        (a replica that just failed this request) is taken only if it is the last one."""
        load = self.load
        if not load:
            return None
        if len(load) == 1:
            return next(iter(load))
        bound = self.bound()
        if preferred is not None:
            for node in self._walk(key):
                if node != exclude and preferred(node) and load[node] < bound:
                    return node
        for node in self._walk(key):
            if node != exclude and load[node] < bound:
                return node
        return self.ring.get_node(key)  # unreachable: the bound admits at least one node

    def _walk(self, key: str) -> Iterable[str]:
        for conf in self.ring.range(key, unique=True):
            yield conf["nodename"]  # uhashring yields each node's config dict

    def acquire(self, node: str) -> None:
        if node in self.load:
            self.load[node] += 1
            self.total += 1

    def release(self, node: str) -> None:
        if self.load.get(node, 0) > 0:
            self.load[node] -= 1
            self.total -= 1

    def owner(self, key: str) -> str | None:
        """The replica a key hashes to when loads are ignored (for key-movement tests)."""
        return self.ring.get_node(key) if self.load else None  # type: ignore[no-any-return]
