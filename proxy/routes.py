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
from dataclasses import dataclass, field

from .config import Route
from .errors import BadRequest, NotFound

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


@dataclass
class _HostTable:
    exact: dict[str, Route] = field(default_factory=dict)
    prefix: dict[str, Route] = field(default_factory=dict)
    max_depth: int = 0  # segments in the deepest prefix: deeper candidates cannot match

    def add_prefix(self, path: str, route: Route) -> None:
        self.prefix[path] = route
        self.max_depth = max(self.max_depth, path.rstrip("/").count("/"))

    def match(self, path: str) -> Route | None:
        route = self.exact.get(path)
        if route is not None:
            return route
        prefix = self.prefix
        if not prefix:
            return None
        # Candidates are the path cut at a "/" boundary, at most max_depth segments
        # deep (so a long request path against short prefixes costs a few lookups).
        if self.max_depth == 1:  # the common shape ("/app", "/blog/"): two lookups
            end = path.find("/", 1)
            if end < 0:
                return prefix.get(path) or prefix.get("/")
            return prefix.get(path[: end + 1]) or prefix.get(path[:end]) or prefix.get("/")
        ends: list[int] = []
        pos = 0
        depth = self.max_depth
        while len(ends) < depth:
            pos = path.find("/", pos + 1)
            if pos < 0:
                break
            ends.append(pos)
        if len(ends) < depth or path.endswith("/"):
            route = prefix.get(path)  # the whole path is shallow enough to be a prefix itself
            if route is not None:
                return route
        for end in reversed(ends):
            route = prefix.get(path[: end + 1]) or prefix.get(path[:end])  # "/a/b/" then "/a/b"
            if route is not None:
                return route
        return prefix.get("/")


class RouteTable:
    """Immutable once built; a reload builds a new table and swaps the reference."""

    def __init__(self, routes: tuple[Route, ...] | list[Route]) -> None:
        self.routes = tuple(routes)
        self._exact_hosts: dict[str, _HostTable] = {}
        self._wild_hosts: dict[str, _HostTable] = {}  # ".example.com" -> table
        self._any = _HostTable()
        self.by_name: dict[str, Route] = {}
        for r in self.routes:
            self.by_name[r.name] = r
            if r.host == "*":
                table = self._any
            elif r.host.startswith("*."):
                table = self._wild_hosts.setdefault(r.host[1:], _HostTable())
            else:
                table = self._exact_hosts.setdefault(r.host, _HostTable())
            if r.url is not None:
                table.exact[r.url] = r
            else:
                assert r.path is not None
                table.add_prefix(r.path, r)

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
        table = self._exact_hosts.get(host)
        if table is not None:
            route = table.match(path)
            if route is not None:
                return route
        if self._wild_hosts:
            dot = host.find(".")
            while dot >= 0:
                table = self._wild_hosts.get(host[dot:])
                if table is not None:
                    route = table.match(path)
                    if route is not None:
                        return route
                dot = host.find(".", dot + 1)
        return self._any.match(path)


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
