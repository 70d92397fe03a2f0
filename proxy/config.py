"""TOML config -> one frozen `Config`.

How this works: `tomllib` parses each file (the main one and every `include`d route
table); a `LineIndex` built from the same text remembers on which line each table header
and each key stands, so that every problem can be reported as ``file:line: message``
naming the key.  Validation collects *all* problems before raising one `ConfigError`,
so `summon check` prints them in one go.  Nothing below `load()` reads the environment.

Route tables can hold 100k routes, so each `[[route]]` first takes a fast path that only
says "valid, here is the Route" or "ask the careful path", which finds and words the
problems; line numbers are only looked up for a problem.
"""

from __future__ import annotations

import gc
import glob
import ipaddress
import math
import operator
import os
import re
import tomllib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from .errors import ConfigError, Problem

_rtoml: Any
try:  # optional speed-up for large route tables
    import rtoml as _rtoml
except ImportError:  # pragma: no cover
    _rtoml = None

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class Address(NamedTuple):
    """A host and port. A NamedTuple, not a dataclass: the upstream pool looks one up per
    request, and a tuple hashes in C (a frozen dataclass's __hash__ is Python code)."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class ProxySettings:
    listen: tuple[Address, ...] = (Address("127.0.0.1", 8080),)
    admin: Address | None = Address("127.0.0.1", 8081)
    admin_token: str | None = None
    workers: int = 1
    trusted_proxies: tuple[Network, ...] = ()
    max_header_bytes: int = 16 * 1024  # IIS 16K; nginx 1K + 4x8K
    max_header_count: int = 100  # Apache LimitRequestFields
    header_timeout_s: float = 10.0  # slowloris bound, nginx client_header_timeout is 60s
    keepalive_timeout_s: float = 60.0  # idle client keep-alive (nginx 75s)
    body_timeout_s: float = 60.0  # gap between two reads of a request body
    send_timeout_s: float = 60.0  # a client that reads none of its response for this long is cut off
    request_buffer_bytes: int = 128 * 1024  # bodies up to this size are read whole before a replica is taken
    max_body_bytes: int = 64 * 1024 * 1024
    max_connections: int = 10_000
    max_inflight: int = 5_000
    connect_timeout_s: float = 5.0
    upstream_timeout_s: float = 60.0  # until the response head arrives; also the longest a body may stall
    upstream_idle_s: float = 30.0  # idle pooled upstream connections are closed after
    upstream_pool_size: int = 64  # idle keep-alive connections kept per upstream
    drain_timeout_s: float = 30.0
    server_name: str = "summon"
    shed_overload: bool = True  # refuse and shed while summon's own CPU is saturated (proxy.engine.overload)


@dataclass(frozen=True)
class Limits:
    max_instances: int = 16
    budget_instance_seconds_per_hour: float | None = None


@dataclass(frozen=True)
class Region:
    name: str
    nearest: tuple[str, ...] = ()
    cidrs: tuple[Network, ...] = ()


@dataclass(frozen=True)
class Host:
    name: str
    region: str
    backend: str = "process"
    uri: str = ""
    slots: int = 8
    arch: str = "x86_64"
    kvm_probe: bool = True  # libvirt: boot a test guest once to see if KVM really works; false = TCG
    # libvirt: where guests' forwarded ports bind on the hypervisor host and proxies dial
    # them ("" = the remote URI's host, or 127.0.0.1 for a local libvirtd) ...
    address: str = ""
    ports: tuple[int, int] = (24000, 24999)  # ... and, on a remote host, the ports they take
    # libvirt: boot from this storage pool's volumes (`summon images push`), checked there
    # once per digest, instead of the image's files at the same path on the host ("" = files)
    pool: str = ""
    # `start = "resume"` routes: the guest memory (the image's `memory_mib`) that paused
    # standbys on this host may hold in all. A paused VM uses no CPU but keeps its RAM, so
    # memory, not slots, is what bounds them: 1 GiB keeps a few 128 MiB microVMs waiting.
    standby_memory_mib: int = 1024


class Route(NamedTuple):
    """One route. A NamedTuple rather than a frozen dataclass: 100k of them must load
    in well under a second and cost little memory (no per-instance dict)."""

    name: str
    host: str = "*"
    path: str | None = None
    url: str | None = None
    image: str | None = None
    upstreams: tuple[Address, ...] = ()
    min_replicas: int = 0
    max_replicas: int = 4
    target_concurrency: int = 32
    idle_timeout_s: float = 300.0
    boot_timeout_s: float = 30.0
    queue_size: int = 1000  # requests buffered per pool while it boots
    max_conns: int = 32  # connections in use per replica; more requests wait in the proxy (0: no cap)
    hash_key: str = "client"
    health_path: str = "/"
    health_interval_s: float = 10.0  # probe ready instances this often (0: never)
    health_failures: int = 3  # misses in a row before an instance is replaced
    start: str = "boot"
    standbys: int = 1  # `start = "resume"`: booted-then-paused instances kept for cold requests
    source: str = ""  # "file [[route]] #n", for messages and events
    # Predictive summoning (proxy/engine/prefetch.py): the URL paths a page makes a browser
    # fetch next (written by `summon routes split-site`), and whether a request here wakes
    # them (None: as `[prefetch].enabled` says).
    prefetch: tuple[str, ...] = ()
    presummon: bool | None = None
    # Rolling deploys (proxy/engine/fleet.py, "Rolling deploy"): this many failed boots of a
    # new version before the pool goes back to the version it served. 3: one failure can be
    # bad luck (a host under load), three in a row, with back-off between them, is the version.
    rollback_after_failures: int = 3

    @property
    def summoned(self) -> bool:
        return self.image is not None


@dataclass(frozen=True)
class Cluster:
    """`[cluster]`: this proxy is one node of a fleet whose shared state is in Redis."""

    redis: str  # redis://HOST:PORT/DB or rediss://... (TLS); a password may be in the URL
    node: str  # unique per proxy: owner of what this proxy boots, shown in /status and the log
    region: str | None = None  # where this proxy stands: the default region of its clients
    password_env: str | None = None  # the name of an environment variable holding the password
    lease_s: float = 5.0  # a dead proxy's permits and instances are given up within this
    local_share: int = 1  # instances this proxy may run while Redis is unreachable


@dataclass(frozen=True)
class Follow:
    """`[images] follow`: this node (an edge, perhaps behind NAT) takes new versions of these
    images when the centre announces them in the cluster's Redis (proxy.images.announce),
    pulling them by digest from the URL the announcement names (proxy.runtime.follower)."""

    images: tuple[str, ...]
    every_s: float = 2.0  # how often the announcements are read: one HMGET
    token_env: str | None = None  # the environment variable holding the centre's admin_token
    retry_s: float = 30.0  # a version that failed to pull (or was refused) is tried again after this


@dataclass(frozen=True)
class PluginSettings:
    """`[plugin]`: the decision endpoint for host proxies (nginx, Caddy, HAProxy; see
    proxy/plugin/). Off unless `listen` is given."""

    listen: Address
    token: str | None = None  # X-Summon-Token on every call; required off loopback (`token_rule`)
    # A lease whose host proxy calls /done is given back there; one lost on the way (a
    # crashed worker, a dropped connection) is taken back after `lease_timeout`.
    lease_timeout_s: float = 300.0
    # A lease whose host proxy has no completion hook (Caddy) counts as in flight this long,
    # unless /done calls on the same route have measured how long its requests take.
    lease_estimate_s: float = 1.0
    # How long a host proxy that caches decisions (nginx's shipped config, which asks with
    # X-Summon-Cache: 1) may reuse one, where reusing it is correct (proxy.plugin.decide,
    # `cache_s`); whole seconds, as nginx's X-Accel-Expires takes them. 0: never.
    cache_s: int = 1


@dataclass(frozen=True)
class PrefetchSettings:
    """`[prefetch]`: predictive summoning (proxy/engine/prefetch.py). A route pre-summons
    when its own `presummon` says so, else when `enabled` does; split-site tables set
    `presummon = true` on their routes, so the default is on there and off elsewhere."""

    enabled: bool = False
    max_followers: int = 8  # followers one request may wake
    unused_idle_timeout_s: float = 15.0  # a pre-summoned instance no request used idles out after this
    # start pre-summons at the lowest CPU priority until a request waits for them (`Boot.background`):
    # the page's own start comes first, but on a CPU-bound host the whole page ends later (the
    # starved followers' boots cost more CPU: loadtests/README.md, section `page`), so off by default
    low_priority: bool = False
    learn: bool = True  # learn followers from what clients request next (routes that pre-summon only)
    learn_window_s: float = 2.0  # "next": the same client, within this long after the route
    learn_threshold: float = 0.5  # share of a route's visits followed by the other route
    learn_min_count: int = 3  # visits needed before a route's followers are believed
    learn_interval_s: float = 30.0  # how often the learned table is rebuilt
    learn_sample: float = 1.0  # share of clients whose requests are recorded (by client hash)


@dataclass(frozen=True)
class Config:
    path: str
    proxy: ProxySettings
    limits: Limits
    regions: tuple[Region, ...]
    hosts: tuple[Host, ...]
    routes: tuple[Route, ...]
    images_dir: Path
    events_path: Path
    images_store: Path = Path("images/.store")  # always set by load_config: [images] store or <dir>/.store
    events_retention_s: float = 7 * 24 * 3600.0
    events_max_rows: int = 1_000_000
    default_region: str = "local"
    cluster: Cluster | None = None
    follow: Follow | None = None  # [images] follow: an edge that pulls announced versions
    announce_urls: tuple[str, ...] = ()  # [images] announce_urls: where edges pull what this node announces
    plugin: PluginSettings | None = None
    prefetch: PrefetchSettings = PrefetchSettings()


# --- parsing helpers ---------------------------------------------------------------

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_SIZE = re.compile(r"^\s*(\d+)\s*([kmg]i?b?|b)?\s*$", re.I)


_MAX_DURATION_S = 365 * 86400.0


def parse_duration(value: Any) -> float:
    """``"500ms"``, ``"30s"``, ``"5m"``, ``"1h"`` or a plain number of seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as \"30s\"")
    seconds: float | None = None
    try:
        if isinstance(value, (int, float)):
            seconds = float(value)
        elif isinstance(value, str) and (m := _DURATION.match(value)):
            seconds = float(m.group(1)) * _UNITS[m.group(2)]
    except OverflowError:
        seconds = math.inf
    if seconds is not None:
        # nan would make every deadline comparison false: a timeout that never fires
        if not 0 <= seconds <= _MAX_DURATION_S:
            raise ValueError(f"{value!r} is not a duration between 0 and {_MAX_DURATION_S:g} seconds")
        return seconds
    raise ValueError(f"{value!r} is not a duration (use e.g. \"500ms\", \"30s\", \"5m\")")


def parse_size(value: Any) -> int:
    """Bytes as a number or ``"16k"``, ``"64MiB"``."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        m = _SIZE.match(value)
        if m:
            unit = (m.group(2) or "b").lower()[:1]
            return int(m.group(1)) * {"b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[unit]
    raise ValueError(f"{value!r} is not a size (use e.g. 16384 or \"16k\")")


def parse_address(value: Any) -> Address:
    if not isinstance(value, str):
        raise ValueError("expected \"HOST:PORT\"")
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{value!r} is not HOST:PORT")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    return Address(host, int(port))


def _positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"expected a whole number >= 0, got {value!r}")
    return value


def _mebibytes(value: Any) -> int:
    """MiB as a whole number (``512``) or a size with a unit (``"512MiB"``, ``"2GiB"``)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        return parse_size(value) // 1024**2
    raise ValueError(f"{value!r} is not a memory size (use e.g. 512 for MiB, or \"2GiB\")")


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {type(value).__name__}")
    return value


def _strings(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError("expected a list of strings")
    return tuple(value)


def _url_paths(value: Any) -> tuple[str, ...]:
    paths = _strings(value)
    for p in paths:
        if problem := _check_path(p):
            raise ValueError(f"{p!r} {problem}")
    return paths


def _share(value: Any) -> float:
    v = _number(value)
    if not 0 < v <= 1:
        raise ValueError("must be more than 0 and at most 1")
    return v


def _networks(value: Any) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(v, strict=False) for v in _strings(value))


_address_cache: dict[tuple[str, ...], tuple[Address, ...]] = {}


def _addresses(value: Any) -> tuple[Address, ...]:
    """Memoised: a big route table names the same few upstreams over and over, so the
    cache is asked first and a hit skips even the check that every item is a string
    (only lists of strings are ever stored)."""
    if isinstance(value, str):
        value = [value]
    if isinstance(value, list):
        try:
            hit = _address_cache.get(tuple(value))
        except TypeError:  # an unhashable item (a table, a list): _strings words it below
            hit = None
        if hit is not None:
            return hit
    key = tuple(_strings(value))
    hit = tuple(parse_address(v) for v in key)
    if len(_address_cache) < 100_000:
        _address_cache[key] = hit
    return hit


def _optional_address(value: Any) -> Address | None:
    if value in ("", False):
        return None
    return parse_address(value)


# A bearer token travels in a header (RFC 6750 b64token) and guards a port that may face the
# network: printable, no spaces, and long enough that guessing it over HTTP is hopeless.
_TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
MIN_TOKEN_CHARS = 16


def _token(value: Any) -> str:
    v = _string(value)
    if not _TOKEN.fullmatch(v):
        raise ValueError("must be letters, digits and - . _ ~ + / (a bearer token: no spaces or quotes)")
    if len(v) < MIN_TOKEN_CHARS:
        raise ValueError(f"must be at least {MIN_TOKEN_CHARS} characters "
                         "(e.g. python3 -c 'import secrets; print(secrets.token_urlsafe(32))')")
    return v


def is_loopback(host: str) -> bool:
    """Whether a listen host is reachable from this machine only. A name other than
    `localhost` could resolve to anything, so it counts as reachable from outside."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def token_rule(address: Address | None, token: str | None, address_key: str, token_key: str,
               sent_as: str = "Authorization: Bearer <token>") -> str | None:
    """The rule for every listener with an admin-like role (`[proxy] admin`, and
    `[plugin] listen`): on anything but loopback it answers only with a token, so a port
    that faces the network never shows the fleet (instance addresses, events) to anyone
    who asks. Returns the problem to report, or None."""
    if address is None or token or is_loopback(address.host):
        return None
    return (f"{address_key} = \"{address}\" is reachable from other machines: set {token_key} "
            f"(every request must then send {sent_as}), or listen on 127.0.0.1")


_NODE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_ENV = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _redis_url(value: Any) -> str:
    url = _string(value)
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("redis", "rediss") or not rest.strip("/"):
        raise ValueError(f"expected redis://HOST:PORT/DB or rediss://HOST:PORT/DB, got {url!r}")
    return url


def _node_name(value: Any) -> str:
    name = _string(value)
    if not _NODE.match(name):
        raise ValueError(f"{name!r}: letters, digits, '.', '_' and '-', at most 63")
    return name


def _env_name(value: Any) -> str:
    name = _string(value)
    if not _ENV.match(name):
        raise ValueError(f"{name!r} is not an environment variable name")
    return name


_IMAGE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


def _image_names(value: Any) -> tuple[str, ...]:
    names = _strings(value)
    for n in names:
        if not _IMAGE_NAME.match(n):
            raise ValueError(f"{n!r} is not an image name (letters, digits, '.', '_', '-'; no @ pin: "
                             "a followed image takes whichever version is announced)")
    if not names:
        raise ValueError("name at least one image (or leave the key out)")
    return names


def parse_base_urls(value: Any) -> tuple[str, ...]:
    """http(s)://HOST[:PORT][/prefix]: the admin address an edge asks for /images/sha256/<hex>."""
    import urllib.parse

    urls = _strings(value)
    for u in urls:
        try:
            parts = urllib.parse.urlsplit(u)
            _ = parts.port  # raises on a bad port
        except ValueError as exc:
            raise ValueError(f"{u!r}: {exc}") from None
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
            raise ValueError(f"{u!r}: expected http://HOST:PORT (a summon admin address), without query")
    if not urls:
        raise ValueError("name at least one URL (or leave the key out)")
    return tuple(u.rstrip("/") for u in urls)


def _positive_duration(value: Any) -> float:
    v = parse_duration(value)
    if v <= 0:
        raise ValueError("must be more than 0")
    return v


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= float(value) < math.inf:
        raise ValueError(f"expected a finite number >= 0, got {value!r}")
    return float(value)


def _at_least_one(value: Any) -> int:
    n = _positive_int(value)
    if n < 1:
        raise ValueError("must be at least 1")
    return n


def _choice(*options: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if value not in options:
            raise ValueError(f"expected one of {', '.join(options)}, got {value!r}")
        return str(value)

    return check


def _hash_key(value: Any) -> str:
    v = _string(value)
    if v in ("client", "path") or re.fullmatch(r"(header|cookie):[!#$%&'*+.^`|~0-9A-Za-z-]+", v):
        return v
    raise ValueError(f"expected client, path, header:NAME or cookie:NAME, got {v!r}")


LIBVIRT_SCHEMES = ("qemu", "qemu+unix", "qemu+tcp", "qemu+ssh", "qemu+libssh", "qemu+libssh2", "qemu+tls", "test")
REMOTE_SCHEMES = ("qemu+tcp", "qemu+ssh", "qemu+libssh", "qemu+libssh2", "qemu+tls")


def _libvirt_uri(value: Any) -> str:
    """A libvirt connection URI: local (qemu:///system), remote (qemu+tcp://, qemu+ssh://,
    qemu+tls://: a host is required) or libvirt's test driver."""
    v = _string(value)
    scheme, sep, rest = v.partition("://")
    if not sep or scheme not in LIBVIRT_SCHEMES:
        raise ValueError(f"expected a libvirt URI such as qemu:///system or qemu+tcp://HOST/system, got {v!r}")
    if scheme in REMOTE_SCHEMES and not rest.split("/", 1)[0].rpartition("@")[2]:
        raise ValueError(f"{scheme}:// needs a host: {scheme}://HOST/system")
    return v


def _ipv4(value: Any) -> str:
    """An IPv4 literal: QEMU's hostfwd binds only those."""
    v = _string(value)
    try:
        ipaddress.IPv4Address(v)
    except ValueError:
        raise ValueError(f"expected an IPv4 address of the hypervisor host, got {v!r}") from None
    return v


def _port_range(value: Any) -> tuple[int, int]:
    v = _string(value)
    m = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", v)
    if not m or not 1024 <= int(m.group(1)) <= int(m.group(2)) <= 65535:
        raise ValueError(f"expected a port range LOW-HIGH within 1024-65535, got {v!r}")
    return int(m.group(1)), int(m.group(2))


def _health_path(value: Any) -> str:
    v = _string(value)
    if not v.startswith("/"):
        raise ValueError("must start with /")
    return v


# key -> (dataclass field, converter)
_PROXY_KEYS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "listen": ("listen", _addresses),
    "admin": ("admin", _optional_address),
    "admin_token": ("admin_token", _token),
    "workers": ("workers", _positive_int),
    "trusted_proxies": ("trusted_proxies", _networks),
    "max_header_bytes": ("max_header_bytes", parse_size),
    "max_header_count": ("max_header_count", _at_least_one),
    "header_timeout": ("header_timeout_s", parse_duration),
    "keepalive_timeout": ("keepalive_timeout_s", parse_duration),
    "body_timeout": ("body_timeout_s", parse_duration),
    "send_timeout": ("send_timeout_s", parse_duration),
    "request_buffer_bytes": ("request_buffer_bytes", parse_size),
    "max_body_bytes": ("max_body_bytes", parse_size),
    "max_connections": ("max_connections", _at_least_one),
    "max_inflight": ("max_inflight", _at_least_one),
    "connect_timeout": ("connect_timeout_s", parse_duration),
    "upstream_timeout": ("upstream_timeout_s", parse_duration),
    "upstream_idle_timeout": ("upstream_idle_s", parse_duration),
    "upstream_pool_size": ("upstream_pool_size", _positive_int),
    "drain_timeout": ("drain_timeout_s", parse_duration),
    "server_name": ("server_name", _string),
    "shed_overload": ("shed_overload", _boolean),
}
_LIMIT_KEYS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "max_instances": ("max_instances", _positive_int),
    "budget_instance_seconds_per_hour": ("budget_instance_seconds_per_hour", _number),
}
_REGION_KEYS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "name": ("name", _string),
    "nearest": ("nearest", _strings),
    "cidrs": ("cidrs", _networks),
}
_HOST_KEYS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "name": ("name", _string),
    "region": ("region", _string),
    "backend": ("backend", _choice("process", "libvirt", "fake")),
    "uri": ("uri", _libvirt_uri),
    "slots": ("slots", _positive_int),
    "arch": ("arch", _choice("x86_64", "aarch64")),
    "kvm_probe": ("kvm_probe", _boolean),
    "address": ("address", _ipv4),
    "ports": ("ports", _port_range),
    "pool": ("pool", _string),
    "standby_memory": ("standby_memory_mib", _mebibytes),
}
_ROUTE_KEYS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "name": ("name", _string),
    "host": ("host", _string),
    "path": ("path", _string),
    "url": ("url", _string),
    "image": ("image", _string),
    "upstreams": ("upstreams", _addresses),
    "min_replicas": ("min_replicas", _positive_int),
    "max_replicas": ("max_replicas", _positive_int),
    "target_concurrency": ("target_concurrency", _positive_int),
    "idle_timeout": ("idle_timeout_s", parse_duration),
    "boot_timeout": ("boot_timeout_s", parse_duration),
    "queue_size": ("queue_size", _positive_int),
    "max_conns": ("max_conns", _positive_int),
    "hash_key": ("hash_key", _hash_key),
    "health_path": ("health_path", _health_path),
    "health_interval": ("health_interval_s", parse_duration),
    "health_failures": ("health_failures", _positive_int),
    "start": ("start", _choice("boot", "restore", "resume")),
    "standbys": ("standbys", _positive_int),
    "prefetch": ("prefetch", _url_paths),
    "presummon": ("presummon", _boolean),
    "rollback_after_failures": ("rollback_after_failures", _at_least_one),
}
_PREFETCH_KEYS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "enabled": ("enabled", _boolean),
    "max_followers": ("max_followers", _positive_int),
    "unused_idle_timeout": ("unused_idle_timeout_s", parse_duration),
    "low_priority": ("low_priority", _boolean),
    "learn": ("learn", _boolean),
    "learn_window": ("learn_window_s", parse_duration),
    "learn_threshold": ("learn_threshold", _share),
    "learn_min_count": ("learn_min_count", _at_least_one),
    "learn_interval": ("learn_interval_s", parse_duration),
    "learn_sample": ("learn_sample", _share),
}
_CLUSTER_KEYS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "redis": ("redis", _redis_url),
    "node": ("node", _node_name),
    "region": ("region", _string),
    "password_env": ("password_env", _env_name),
    "lease": ("lease_s", parse_duration),
    "local_share": ("local_share", _positive_int),
}
_PLUGIN_KEYS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "listen": ("listen", parse_address),
    "token": ("token", _token),
    "lease_timeout": ("lease_timeout_s", parse_duration),
    "lease_estimate": ("lease_estimate_s", parse_duration),
    "cache": ("cache_s", parse_duration),
}
_FOLLOW_KEYS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "follow": ("images", _image_names),
    "follow_every": ("every_s", _positive_duration),
    "follow_retry": ("retry_s", _positive_duration),
    "pull_token_env": ("token_env", _env_name),
}
_TOP_KEYS = {"include", "proxy", "limits", "region", "host", "route", "images", "events", "cluster", "plugin",
             "prefetch"}


class LineIndex:
    """Where tables and keys stand in one TOML file's text.

    tomllib gives no positions, so we scan the text ourselves: good enough for the
    plain `key = value` style of config files (dotted keys and inline tables point at
    the line of their table header instead).
    """

    _HEADER = re.compile(r"^\s*(\[\[?)\s*([A-Za-z0-9_.\-]+)\s*\]\]?")
    _KEY = re.compile(r"^\s*([A-Za-z0-9_\-]+|\"[^\"]*\")\s*=")

    def __init__(self, text: str) -> None:
        # Built on first use: a valid 100k-route table never needs it.
        self._text = text
        self._tables: dict[tuple[str, int], tuple[int, dict[str, int]]] | None = None

    @property
    def tables(self) -> dict[tuple[str, int], tuple[int, dict[str, int]]]:
        if self._tables is None:
            self._tables = self._scan(self._text)
        return self._tables

    def _scan(self, text: str) -> dict[tuple[str, int], tuple[int, dict[str, int]]]:
        # (table name, ordinal) -> (header line, {key: line})
        tables: dict[tuple[str, int], tuple[int, dict[str, int]]] = {}
        counts: dict[str, int] = {}
        current: dict[str, int] = {}
        tables[("", 0)] = (1, current)
        in_multiline = False
        for lineno, line in enumerate(text.splitlines(), start=1):
            if line.count('"""') % 2 == 1 or line.count("'''") % 2 == 1:
                in_multiline = not in_multiline
                if not in_multiline:
                    continue
            if in_multiline and not self._KEY.match(line):
                continue
            if m := self._HEADER.match(line):
                name = m.group(2)
                n = counts.get(name, 0) if m.group(1) == "[[" else 0
                counts[name] = n + 1
                current = {}
                tables[(name, n)] = (lineno, current)
            elif m := self._KEY.match(line):
                current.setdefault(m.group(1).strip('"'), lineno)
        return tables

    def line(self, table: str, ordinal: int = 0, key: str | None = None) -> int:
        header, keys = self.tables.get((table, ordinal), (1, {}))
        if key is not None and key in keys:
            return keys[key]
        return header


@dataclass
class _Collector:
    problems: list[Problem] = field(default_factory=list)

    def add(self, file: str, line: int, message: str) -> None:
        self.problems.append(Problem(file, line, message))


def _section(
    raw: Any,
    keys: dict[str, tuple[str, Callable[[Any], Any]]],
    where: str,
    file: str,
    index: LineIndex,
    table: str,
    ordinal: int,
    out: _Collector,
) -> dict[str, Any] | None:
    if not isinstance(raw, dict):
        out.add(file, index.line(table, ordinal), f"{where} must be a table")
        return None
    values: dict[str, Any] = {}
    for key, value in raw.items():
        spec = keys.get(key)
        if spec is None:
            known = ", ".join(sorted(keys))
            out.add(file, index.line(table, ordinal, key), f"{where}: unknown key '{key}' (known: {known})")
            continue
        attr, convert = spec
        if convert is _string and type(value) is str:
            values[attr] = value  # the common case, without a call
            continue
        try:
            values[attr] = convert(value)
        except ValueError as exc:
            out.add(file, index.line(table, ordinal, key), f"{where}.{key}: {exc}")
    return values


def _read_toml(path: Path, out: _Collector, line_from: tuple[str, int]) -> tuple[dict[str, Any], LineIndex] | None:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        out.add(line_from[0], line_from[1], f"cannot read {path}: {exc.strerror or exc}")
        return None
    except UnicodeDecodeError:
        out.add(str(path), 1, "not UTF-8 text")
        return None
    try:
        data = _parse_toml(text)
    except (tomllib.TOMLDecodeError, ValueError) as exc:
        m = re.search(r"line (\d+)", str(exc))
        out.add(str(path), int(m.group(1)) if m else 1, f"TOML syntax: {exc}")
        return None
    return data, LineIndex(text)


def _parse_toml(text: str) -> dict[str, Any]:
    """rtoml (Rust) parses a 100k-route table ~10x faster than tomllib; tomllib is the
    fallback, and the referee for error messages, which it words more plainly."""
    if _rtoml is not None and len(text) > 64 * 1024:
        try:
            return dict(_rtoml.loads(text))
        except Exception:  # noqa: BLE001 - let tomllib find and word the error
            pass
    return tomllib.loads(text)


_HOST_PATTERN = re.compile(r"\*|(\*\.)?[a-z0-9.\-]+(:\d+)?")


def _check_path(p: str) -> str | None:
    if not p.startswith("/"):
        return "must start with /"
    if ("/." in p and any(seg in (".", "..") for seg in p.split("/"))) or "%" in p or "?" in p or "#" in p:
        return "must be a normalised path (no . or .. segments, no %, ? or #)"
    return None


def key_line(file: str | Path, table: str, ordinal: int = 0, key: str | None = None) -> int:
    """The line of `key` in the `ordinal`-th `[table]` of `file`, for problems found after
    loading (the environment checks of `proxy.preflight`): the file is read again rather
    than its text kept alive for the life of the process. 1 when it cannot be read."""
    try:
        return LineIndex(Path(file).read_text(encoding="utf-8")).line(table, ordinal, key)
    except (OSError, UnicodeDecodeError):
        return 1


def route_place(route: Route) -> tuple[str, int]:
    """(file, ordinal of its [[route]] table) from a route's `source`."""
    file, sep, n = route.source.rpartition(" [[route]] #")
    return (file, int(n) - 1) if sep and n.isdigit() else (route.source, 0)


def load(path: str | Path) -> Config:
    """Read and validate; raise `ConfigError` listing every problem found."""
    with _collector_paused():
        return _load(Path(path))


@contextmanager
def _collector_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while a config is built.

    A 100k-route table is some 300k new dicts, lists and tuples that all stay alive
    until the end, so each pass of the collector during the build (a few full ones)
    scans them to free nothing: a fifth of the load time. They hold no cycles, and
    the collector runs as before once they are built.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _load(main: Path) -> Config:
    out = _Collector()
    parsed = _read_toml(main, out, (str(main), 1))
    if parsed is None:
        raise ConfigError(out.problems)
    data, index = parsed
    file = str(main)
    base = main.parent

    for key in data:
        if key not in _TOP_KEYS:
            out.add(file, index.line(key, 0, None) if (key, 0) in index.tables else index.line("", 0, key),
                    f"unknown top-level key '{key}' (known: {', '.join(sorted(_TOP_KEYS))})")

    proxy_vals = _section(data.get("proxy", {}), _PROXY_KEYS, "[proxy]", file, index, "proxy", 0, out) or {}
    limit_vals = _section(data.get("limits", {}), _LIMIT_KEYS, "[limits]", file, index, "limits", 0, out) or {}
    proxy = ProxySettings(**proxy_vals)
    limits = Limits(**limit_vals)
    prefetch_vals = _section(data.get("prefetch", {}), _PREFETCH_KEYS, "[prefetch]", file, index, "prefetch", 0, out) or {}
    for key, attr in (("learn_window", "learn_window_s"), ("learn_interval", "learn_interval_s")):
        if prefetch_vals.get(attr, 1.0) <= 0:
            out.add(file, index.line("prefetch", 0, key), f"[prefetch].{key}: must be more than 0")
    prefetch = PrefetchSettings(**prefetch_vals)
    if proxy.workers < 1:
        out.add(file, index.line("proxy", 0, "workers"), "[proxy].workers must be at least 1")

    if problem := token_rule(proxy.admin, proxy.admin_token, "[proxy].admin", "[proxy].admin_token"):
        out.add(file, index.line("proxy", 0, "admin"), problem)

    plugin = _plugin(data, file, index, out)
    listens = list(proxy.listen)
    if proxy.admin is not None:
        listens.append(proxy.admin)
    if plugin is not None:
        listens.append(plugin.listen)
    seen_addr: set[tuple[str, int]] = set()
    for addr in listens:
        k = (addr.host, addr.port)
        if addr.port != 0 and (k in seen_addr or _overlaps(addr, seen_addr)):
            out.add(file, index.line("proxy", 0, "listen"), f"[proxy]: listen addresses overlap at {addr}")
        seen_addr.add(k)

    images = data.get("images", {})
    images_dir = base / "images"
    images_store: Path | None = None  # default: <dir>/.store, the content-addressed image store
    follow_vals: dict[str, Any] = {}
    announce_urls: tuple[str, ...] = ()
    if not isinstance(images, dict):
        out.add(file, index.line("images", 0), "[images] must be a table")
        images = {}
    for key, value in images.items():
        line = index.line("images", 0, key)
        if key in ("dir", "store"):
            if not isinstance(value, str) or not value:
                out.add(file, line, f"[images].{key}: expected a path string")
            elif key == "dir":
                images_dir = base / value
            else:
                images_store = base / value
        elif key in _FOLLOW_KEYS or key == "announce_urls":
            try:
                if key == "announce_urls":
                    announce_urls = parse_base_urls(value)
                else:
                    attr, conv = _FOLLOW_KEYS[key]
                    follow_vals[attr] = conv(value)
            except ValueError as exc:
                out.add(file, line, f"[images].{key}: {exc}")
        else:
            out.add(file, line, f"[images]: unknown key '{key}' "
                    f"(known: {', '.join(sorted(('dir', 'store', 'announce_urls', *_FOLLOW_KEYS)))})")
    follow: Follow | None = None
    if "images" in follow_vals:
        follow = Follow(**follow_vals)
        if "cluster" not in data:
            out.add(file, index.line("images", 0, "follow"),
                    "[images].follow: announcements come through the cluster's Redis: add [cluster] redis = ...")
    elif follow_vals:
        key = next(k for k, (attr, _) in _FOLLOW_KEYS.items() if attr in follow_vals)
        out.add(file, index.line("images", 0, key), f"[images].{key}: only with [images].follow (the images to follow)")
    events = data.get("events", {})
    events_path = base / "summon-events.db"
    retention_s = Config.events_retention_s
    max_rows = Config.events_max_rows
    if isinstance(events, dict):
        for key, value in events.items():
            line = index.line("events", 0, key)
            try:
                if key == "path":
                    events_path = base / _string(value)
                elif key == "retention":
                    retention_s = parse_duration(value)
                elif key == "max_rows":
                    max_rows = _positive_int(value)
                else:
                    out.add(file, line, f"[events]: unknown key '{key}' (known: max_rows, path, retention)")
            except ValueError as exc:
                out.add(file, line, f"[events].{key}: {exc}")

    regions: list[Region] = []
    for i, raw in enumerate(_list_of_tables(data.get("region", []), "region", file, index, out)):
        vals = _section(raw, _REGION_KEYS, "[[region]]", file, index, "region", i, out)
        if vals is None:
            continue
        if "name" not in vals:
            out.add(file, index.line("region", i), "[[region]]: missing key 'name'")
            continue
        regions.append(Region(**vals))
    region_names = {r.name for r in regions}
    for i, r in enumerate(regions):
        for n in r.nearest:
            if n not in region_names:
                out.add(file, index.line("region", i, "nearest"), f"[[region]] {r.name}: nearest names unknown region '{n}'")
    default_region = regions[0].name if regions else "local"
    cluster: Cluster | None = None
    if "cluster" in data:
        vals = _section(data["cluster"], _CLUSTER_KEYS, "[cluster]", file, index, "cluster", 0, out)
        if vals is not None:
            for key in ("redis", "node"):
                if key not in vals:
                    out.add(file, index.line("cluster", 0), f"[cluster]: missing key '{key}'")
            if vals.get("lease_s", 1.0) < 1.0:
                out.add(file, index.line("cluster", 0, "lease"), "[cluster].lease: at least 1s (it is renewed 10 times a second)")
            if "redis" in vals and "node" in vals:
                cluster = Cluster(**vals)
                if cluster.region is not None:
                    if regions and cluster.region not in region_names:
                        out.add(file, index.line("cluster", 0, "region"), f"[cluster].region: unknown region '{cluster.region}'")
                    default_region = cluster.region

    hosts: list[Host] = []
    for i, raw in enumerate(_list_of_tables(data.get("host", []), "host", file, index, out)):
        vals = _section(raw, _HOST_KEYS, "[[host]]", file, index, "host", i, out)
        if vals is None:
            continue
        vals.setdefault("name", f"host{i}")
        vals.setdefault("region", default_region)
        if regions and vals["region"] not in region_names:
            out.add(file, index.line("host", i, "region"), f"[[host]] {vals['name']}: unknown region '{vals['region']}'")
        if vals.get("backend") == "libvirt" and not vals.get("uri"):
            vals["uri"] = "qemu:///system"
        hosts.append(Host(**vals))
    if not hosts:
        hosts.append(Host(name="local", region=default_region))
    if len({h.name for h in hosts}) != len(hosts):
        out.add(file, index.line("host", 0), "[[host]]: host names must be unique")

    route_tables = [(file, index, _list_of_tables(data.get("route", []), "route", file, index, out))]
    includes = data.get("include", [])
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list):
        out.add(file, index.line("", 0, "include"), "include: expected a list of file names")
        includes = []
    for pattern in includes:
        if not isinstance(pattern, str):
            out.add(file, index.line("", 0, "include"), "include: expected file names (strings)")
            continue
        if "\x00" in pattern or not pattern.strip():
            out.add(file, index.line("", 0, "include"), f"include: {pattern!r} is not a file name")
            continue
        if any(c in pattern for c in "*?["):
            paths = sorted(Path(p) for p in glob.glob(os.path.join(base, pattern)))  # absolute patterns too
        else:
            paths = [base / pattern]
        if not paths:
            out.add(file, index.line("", 0, "include"), f"include: no file matches {pattern!r}")
        for inc in paths:
            parsed_inc = _read_toml(inc, out, (file, index.line("", 0, "include")))
            if parsed_inc is None:
                continue
            inc_data, inc_index = parsed_inc
            for key in inc_data:
                if key != "route":
                    out.add(str(inc), inc_index.line(key, 0) if (key, 0) in inc_index.tables else 1,
                            f"a route table may only hold [[route]] entries, not '{key}'")
            route_tables.append((str(inc), inc_index, _list_of_tables(inc_data.get("route", []), "route", str(inc), inc_index, out)))

    routes = _routes(route_tables, out)

    if out.problems:
        raise ConfigError(out.problems)
    return Config(
        path=str(main),
        proxy=proxy,
        limits=limits,
        regions=tuple(regions),
        hosts=tuple(hosts),
        routes=tuple(routes),
        images_dir=images_dir,
        images_store=images_store if images_store is not None else images_dir / ".store",
        follow=follow,
        announce_urls=announce_urls,
        events_path=events_path,
        events_retention_s=retention_s,
        events_max_rows=max_rows,
        default_region=default_region,
        cluster=cluster,
        plugin=plugin,
        prefetch=prefetch,
    )


def _plugin(data: dict[str, Any], file: str, index: LineIndex, out: _Collector) -> PluginSettings | None:
    """`[plugin]`, or None when the section is absent (the decision endpoint is off)."""
    if "plugin" not in data:
        return None
    vals = _section(data["plugin"], _PLUGIN_KEYS, "[plugin]", file, index, "plugin", 0, out)
    if vals is None:
        return None
    if "listen" not in vals:
        out.add(file, index.line("plugin", 0), "[plugin]: missing key 'listen' (e.g. listen = \"127.0.0.1:8082\")")
        return None
    for key, attr in (("lease_timeout", "lease_timeout_s"), ("lease_estimate", "lease_estimate_s")):
        if attr in vals and vals[attr] <= 0:
            out.add(file, index.line("plugin", 0, key), f"[plugin].{key}: must be more than 0")
    if "cache_s" in vals:
        cache = vals["cache_s"]
        if cache < 0 or cache != int(cache):
            out.add(file, index.line("plugin", 0, "cache"), "[plugin].cache: whole seconds, 0 or more (e.g. \"1s\")")
        vals["cache_s"] = max(0, int(cache))
    settings = PluginSettings(**vals)
    if problem := token_rule(settings.listen, settings.token, "[plugin].listen", "[plugin].token",
                          "X-Summon-Token: <token>"):
        out.add(file, index.line("plugin", 0, "listen"), problem)
    return settings


# The fast path builds a Route from a list in field order: these say where each key goes.
_ROUTE_ROW: list[Any] = [Route._field_defaults.get(f) for f in Route._fields]  # name: None
_ROUTE_SLOTS: dict[str, tuple[int, Callable[[Any], Any] | None]] = {
    key: (Route._fields.index(attr), None if convert is _string else convert) for key, (attr, convert) in _ROUTE_KEYS.items()
}
(_NAME, _HOST, _PATH, _URL, _IMAGE, _UPSTREAMS, _MIN, _MAX, _CONCURRENCY, _SOURCE) = (
    Route._fields.index(f) for f in ("name", "host", "path", "url", "image", "upstreams", "min_replicas",
                                     "max_replicas", "target_concurrency", "source"))


# One file's [[route]] tables: (file name, its LineIndex, the parsed tables).
_RouteTables = list[tuple[str, LineIndex, list[Any]]]
_NAME_OF = operator.itemgetter(_NAME)
_PLACE_OF = operator.itemgetter(_HOST, _PATH, _URL)  # exactly one of path and url is set


def _routes(tables: _RouteTables, out: _Collector) -> list[Route]:
    """Every route in file order, every problem recorded in `out`.

    Duplicate names and (host, path or url) are looked for with two sets over the
    whole table, not route by route; only when there are some does `_distinct_routes`
    go through again to name each one and the route it repeats, in file order.
    """
    host_names = _HostNames()
    problems = _Collector()
    routes = [
        route
        for rfile, rindex, raws in tables
        for i, raw in enumerate(raws)
        if (route := _route(raw, rfile, rindex, i, host_names, problems)) is not None
    ]
    if len(set(map(_NAME_OF, routes))) == len(routes) == len(set(map(_PLACE_OF, routes))):
        out.problems += problems.problems
        return routes
    return _distinct_routes(tables, host_names, out)


def _distinct_routes(tables: _RouteTables, host_names: _HostNames, out: _Collector) -> list[Route]:
    """`_routes` route by route: a duplicate is reported where it stands among the
    other problems, and left out."""
    routes: list[Route] = []
    seen_routes: dict[tuple[str, str, str | None], str] = {}
    seen_names: dict[str, str] = {}
    for rfile, rindex, raws in tables:
        for i, raw in enumerate(raws):
            route = _route(raw, rfile, rindex, i, host_names, out)
            if route is None:
                continue
            match_key, match = ("path", route.path) if route.url is None else ("url", route.url)
            route_key = (route.host, match_key, match)
            if route_key in seen_routes:
                out.add(rfile, rindex.line("route", i), f"duplicate route {route.host} {match_key} {match} (first at {seen_routes[route_key]})")
                continue
            seen_routes[route_key] = route.source
            if route.name in seen_names:
                out.add(rfile, rindex.line("route", i, "name"), f"duplicate route name {route.name!r} (first at {seen_names[route.name]})")
                continue
            seen_names[route.name] = route.source
            routes.append(route)
    return routes


def _route(raw: Any, rfile: str, rindex: LineIndex, i: int, host_names: _HostNames, out: _Collector) -> Route | None:
    """The route of the i-th [[route]] of `rfile`: the fast path if it is clean, else the
    careful one, which records what is wrong."""
    where = f"{rfile} [[route]] #{i + 1}"  # no line number: finding it costs a scan of the file
    return _clean_route(raw, where, host_names) or _checked_route(raw, where, rfile, rindex, i, host_names, out)


class _HostNames(dict[str, str | None]):
    """Route `host` spellings -> the lower-cased name if it is a host name, `*.suffix`
    or `*`, else None. Memoised: a big table has far fewer hosts than routes."""

    def __missing__(self, spelling: str) -> str | None:
        host = spelling.lower()
        self[spelling] = checked = host if _HOST_PATTERN.fullmatch(host) else None
        return checked


def _clean_route(raw: Any, where: str, host_names: _HostNames) -> Route | None:
    """The Route for a valid `[[route]]` table, or None for anything else.

    The happy path of `_checked_route` for tables of 100k routes: one pass over the
    keys straight into a row in field order, no intermediate dict, no line numbers.
    It records nothing: on None the caller asks `_checked_route`, which finds and
    words every problem, so the two cannot disagree about messages.
    """
    if type(raw) is not dict:
        return None
    row = _ROUTE_ROW.copy()
    slots = _ROUTE_SLOTS
    for key, value in raw.items():
        if key not in slots:
            return None
        index, convert = slots[key]
        if convert is not None:
            try:
                value = convert(value)
            except ValueError:
                return None
        elif type(value) is not str:
            return None
        row[index] = value
    path, url = row[_PATH], row[_URL]
    if (path is None) == (url is None) or ("image" in raw) == ("upstreams" in raw):
        return None
    if row[_IMAGE] is None and not row[_UPSTREAMS]:  # upstreams = []
        return None
    match = url if path is None else path
    # stricter than _check_path (no "/." at all): the rare dotted path goes the careful way
    if match[:1] != "/" or "/." in match or "%" in match or "?" in match or "#" in match:
        return None
    host = host_names[row[_HOST]]
    if host is None or row[_MIN] > row[_MAX] or row[_CONCURRENCY] < 1:
        return None
    row[_HOST] = host
    if row[_NAME] is None:
        row[_NAME] = f"{host}{match}"
    row[_SOURCE] = where
    return tuple.__new__(Route, row)  # what Route._make does, without its Python-level call


def _checked_route(
    raw: Any, where: str, rfile: str, rindex: LineIndex, i: int, host_names: _HostNames, out: _Collector
) -> Route | None:
    """Validate one `[[route]]` table key by key, recording every problem in `out`.
    None when the route cannot even be placed in the table (no single path or url,
    no single image or upstreams); otherwise the Route, so that duplicates of a route
    with a bad value are reported too."""
    vals = _section(raw, _ROUTE_KEYS, "[[route]]", rfile, rindex, "route", i, out)
    if vals is None:
        return None
    if ("path" in vals) == ("url" in vals):
        out.add(rfile, rindex.line("route", i), "[[route]]: give exactly one of 'path' (prefix) or 'url' (exact)")
        return None
    match_key = "path" if "path" in vals else "url"
    problem = _check_path(vals[match_key])
    if problem:
        out.add(rfile, rindex.line("route", i, match_key), f"[[route]].{match_key}: {problem}")
    if ("image" in vals) == ("upstreams" in vals):
        out.add(rfile, rindex.line("route", i), "[[route]]: give exactly one of 'image' (summoned) or 'upstreams' (static)")
        return None
    if "upstreams" in vals and not vals["upstreams"]:
        out.add(rfile, rindex.line("route", i, "upstreams"), "[[route]].upstreams: empty list")
    spelling = vals.get("host", "*")
    host = host_names[spelling]
    if host is None:
        host = spelling.lower()
        out.add(rfile, rindex.line("route", i, "host"), f"[[route]].host: {host!r} is not a host name, *.suffix or *")
    vals["host"] = host
    vals.setdefault("name", f"{host}{vals[match_key]}")
    mn, mx = vals.get("min_replicas", 0), vals.get("max_replicas", Route._field_defaults["max_replicas"])
    if mn > mx:
        out.add(rfile, rindex.line("route", i, "min_replicas"), f"[[route]] {vals['name']}: min_replicas {mn} > max_replicas {mx}")
    if vals.get("target_concurrency", 1) < 1:
        out.add(rfile, rindex.line("route", i, "target_concurrency"), "[[route]].target_concurrency must be at least 1")
    return Route(source=where, **vals)


def _overlaps(addr: Address, seen: set[tuple[str, int]]) -> bool:
    """A wildcard address overlaps any other address on the same port."""
    wild = ("0.0.0.0", "::", "")
    return any(p == addr.port and (h in wild or addr.host in wild) for h, p in seen)


def _list_of_tables(raw: Any, name: str, file: str, index: LineIndex, out: _Collector) -> list[Any]:
    if isinstance(raw, list):
        return raw
    out.add(file, index.line(name, 0), f"'{name}' must be an array of tables: write [[{name}]]")
    return []
