"""Which region a client is in: the `X-Client-Region` a trusted proxy sent, else the
first `[[region]]` whose `cidrs` hold its address, else `default_region`.

No I/O and no clock: a pure mapping with a bounded cache (keep-alive clients and the
same few front proxies ask again for every request, and walking every region's
networks per request would cost more than the rest of a warm request's routing).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from ..config import Region

CACHE_MAX = 65536  # client addresses remembered; past that the cache starts over


class RegionMap:
    def __init__(self, regions: Iterable[Region], default_region: str) -> None:
        self.regions = tuple(regions)
        self.names = frozenset(r.name for r in self.regions)
        self.default_region = default_region
        self._cache: dict[str, str] = {}

    def region_of(self, client_ip: str, header_region: str | None = None) -> str:
        """`header_region`: what a trusted proxy said (the front passes None for anyone
        else); believed only when it names a configured region."""
        if header_region and header_region in self.names:
            return header_region
        cached = self._cache.get(client_ip)
        if cached is not None:
            return cached
        region = self.default_region
        try:
            addr = ipaddress.ip_address(client_ip)
        except ValueError:
            addr = None  # not an IP address (a Unix socket peer): the default
        if addr is not None:
            for r in self.regions:
                if any(addr in net for net in r.cidrs):
                    region = r.name
                    break
        if len(self._cache) > CACHE_MAX:
            self._cache.clear()
        self._cache[client_ip] = region
        return region
