"""Route table: (host, path) -> Route, in time independent of the number of routes.

How this works: hosts are looked up in three dicts (exact name, `*.suffix` wildcard by
suffix, catch-all `*`). Under a host, exact URLs are one dict and path prefixes another;
a lookup tries the exact URL, then each prefix of the path at a `/` boundary from the
longest down (so cost grows with path depth, never with the table's size).

A prefix `/blog` matches `/blog` and `/blog/x` but not `/blogger`: routes follow path
segments, which is what people mean and what keeps `/admin` from catching `/administer`.

Matching happens on the *normalised* path (RFC 3986 6.2.2: percent-decoding of
unreserved characters, removal of dot-segments), and that same path is what the proxy
forwards, so the upstream sees exactly the resource we routed on: `/a/../secret` is routed
(and forwarded) as `/secret`, and a path that climbs above the root is a 400.
"""

from __future__ import annotations

import re
from collections import defaultdict
from operator import attrgetter

from ..config import Route
from ..errors import BadRequest, NotFound

_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_PCT = re.compile(rb"%([0-9A-Fa-f]{2})")
# RFC 3986 pchar plus "/": anything else in a path must be percent-encoded.
_PATH_OK = re.compile(rb"^[A-Za-z0-9\-._~!$&'()*+,;=:@/%]*$")


def _decode_unreserved(m: re.Match[bytes]) -> bytes:
    byte = int(m.group(1), 16)
    return bytes([byte]) if byte in _UNRESERVED else b"%" + m.group(1).upper()


def normalise_path(raw: bytes) -> str:
    """Return the normalised form of a request path (no query), or raise BadRequest."""
    if not raw.startswith(b"/"):
        raise BadRequest("request target must be an absolute path")
    if not _PATH_OK.match(raw):
        raise BadRequest("invalid character in request path")
    if b"%" in raw:
        if re.search(rb"%(?![0-9A-Fa-f]{2})", raw):
            raise BadRequest("malformed percent-encoding in path")
        raw = _PCT.sub(_decode_unreserved, raw)
    path = raw.decode("ascii")
    if "/." not in path:
        return path
    out: list[str] = []
    segments = path.split("/")[1:]
    for i, seg in enumerate(segments):
        last = i == len(segments) - 1
        if seg == ".":
            if last:
                out.append("")
        elif seg == "..":
            if not out:
                raise BadRequest("path escapes the root")
            out.pop()
            if last:
                out.append("")
        else:
            out.append(seg)
    return "/" + "/".join(out)


class _HostTable:
    """The routes under one host pattern: exact URLs in one dict, path prefixes in another.

    `fallback` is the table to try next when this one has no match: for an exact host
    the longest `*.suffix` pattern covering it, for a wildcard the next shorter one, and
    finally the catch-all `*`. The chain is fixed when the table is built, so a lookup
    follows links instead of re-deriving host suffixes.
    """

    __slots__ = ("exact", "prefix", "root", "depth", "slash", "bare", "fallback")

    def __init__(self, routes: list[Route]) -> None:
        self.exact = {r.url: r for r in routes if r.url is not None}
        prefix = {r.path: r for r in routes if r.url is None and r.path is not None}
        self.root = prefix.pop("/", None)  # the last resort
        self.prefix = prefix
        # "/"s a request path is cut at to reach the deepest prefix: "/a/b/" is found by
        # cutting "/a/b/c" after its 2nd "/", "/a/b" at it
        self.depth = max((p.count("/", 1) + (not p.endswith("/")) for p in prefix), default=0)
        self.slash = any(p.endswith("/") for p in prefix)  # try the "/a/b/" cut
        self.bare = not all(p.endswith("/") for p in prefix)  # try the "/a/b" cut
        self.fallback: _HostTable | None = None

    def match(self, path: str) -> Route | None:
        """The exact URL, else the longest prefix. Prefix candidates are the path cut
        at a "/", at most `depth` of them deep, longest first: a long request path
        against short prefixes costs a few lookups, and only the spellings (with or
        without the trailing "/") that some prefix uses are tried."""
        route = self.exact.get(path)
        if route is not None or not self.depth:
            return route or self.root
        prefix = self.prefix
        cut, cuts = 0, 0
        while cuts < self.depth:
            end = path.find("/", cut + 1)
            if end < 0:
                break
            cut, cuts = end, cuts + 1
        if cuts < self.depth and self.bare:  # shallow enough to be a prefix itself
            route = prefix.get(path)
            if route is not None:
                return route
        while cut > 0:
            if self.slash:
                route = prefix.get(path[: cut + 1])
                if route is not None:
                    return route
            if self.bare:
                route = prefix.get(path[:cut])
                if route is not None:
                    return route
            cut = path.rfind("/", 1, cut)
        return self.root


class RouteTable:
    """Immutable once built; a reload builds a new table and swaps the reference."""

    def __init__(self, routes: tuple[Route, ...] | list[Route]) -> None:
        self.routes = tuple(routes)
        self.by_name: dict[str, Route] = dict(zip(map(attrgetter("name"), self.routes), self.routes, strict=True))
        by_host: defaultdict[str, list[Route]] = defaultdict(list)
        for r in self.routes:
            by_host[r.host].append(r)
        catch_all = by_host.pop("*", None)
        self._any = _HostTable(catch_all) if catch_all else None
        self._wild_hosts = {h[1:]: _HostTable(rs) for h, rs in by_host.items() if h.startswith("*.")}  # ".example.com"
        self._exact_hosts = {h: _HostTable(rs) for h, rs in by_host.items() if not h.startswith("*.")}
        for suffix, table in self._wild_hosts.items():
            table.fallback = self._covering(suffix, 1)
        for name, table in self._exact_hosts.items():
            table.fallback = self._covering(name, 0)

    def __len__(self) -> int:
        return len(self.routes)

    def lookup(self, host: str, path: str) -> Route:
        """`find`, raising NotFound (-> 404) when nothing matches."""
        route = self.find(host, path)
        if route is None:
            raise NotFound(f"no route for {host}{path}")
        return route

    def find(self, host: str, path: str) -> Route | None:
        """Most specific host first (exact, longest wildcard, any), then exact URL,
        then longest prefix. `host` is the lower-cased Host header without port.
        A miss is None: raising is left to the caller (an exception costs more than
        the whole lookup)."""
        table: _HostTable | None = self._exact_hosts.get(host)
        if table is None:
            table = self._covering(host, 0) if self._wild_hosts else self._any
        while table is not None:
            route = table.match(path)
            if route is not None:
                return route
            table = table.fallback
        return None

    def _covering(self, host: str, start: int) -> _HostTable | None:
        """The table of the longest `*.suffix` pattern whose suffix begins at a "." at or
        after `start` in `host`, else the catch-all table (None when there is none)."""
        dot = host.find(".", start)
        while dot >= 0:
            table = self._wild_hosts.get(host[dot:])
            if table is not None:
                return table
            dot = host.find(".", dot + 1)
        return self._any


def host_without_port(host: bytes) -> str:
    """Lower-cased host name from a Host header value; raise BadRequest if malformed."""
    try:
        text = host.decode("ascii").strip().lower()
    except UnicodeDecodeError as exc:
        raise BadRequest("non-ASCII Host") from exc
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise BadRequest("malformed Host")
        name, rest = text[: end + 1], text[end + 1 :]
    else:
        name, _, port = text.partition(":")
        rest = ":" + port if _ else ""
    if rest and not (rest.startswith(":") and rest[1:].isdigit()):
        raise BadRequest("malformed Host port")
    if not name or not re.fullmatch(r"[a-z0-9.\-_]+|\[[0-9a-f:.]+\]", name):
        raise BadRequest("malformed Host")
    return name
