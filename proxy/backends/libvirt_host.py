"""A libvirt host seen from the proxy: where it is, whether it answers, which port to take.

Why a module of its own: the libvirt driver (`proxy.backends.libvirt`) drives domains;
what is here is about the *connection* to a hypervisor host that may be on another
machine, and most of it is pure (URI parsing, port choice, the up/down state machine)
so it is unit-tested without libvirtd.

- Remote URIs (qemu+tcp://, qemu+ssh://, qemu+tls://): QEMU runs on that host, so the
  guest's forwarded port binds there, at an address every proxy can reach: the `address`
  of the `[[host]]`, else the URI's host (resolved once here if it is a name).
- A dead TCP path is not an error, it is silence: a libvirt call on it blocks until the
  kernel gives up (minutes). So connections to remote hosts get libvirt keepalive (which
  needs libvirt's event loop running in a thread: `ensure_event_loop`), which fails the
  calls in flight within ``KEEPALIVE_INTERVAL_S * (KEEPALIVE_COUNT + 1)``; and before
  (re)opening one, a plain TCP connect with a short timeout (`reachable`) says at once
  whether the host answers at all, so placement and boots fail fast instead.
- `HostHealth`: two missed probes in a row and the host is down; then reconnects with
  exponential back-off until one succeeds.
- Ports on a remote host cannot be bind-tested from here: `pick_port` takes a random
  free one from the host's range, avoiding the ports that summon domains on that host
  (any proxy's: they are in the domains' metadata) already forward; a collision with
  something else makes QEMU fail to start, and the driver retries with another port.
"""

from __future__ import annotations

import random
import socket
import threading
from dataclasses import dataclass
from urllib.parse import urlsplit

try:
    import libvirt
except ImportError:  # pragma: no cover - exercised only where libvirt-python is missing
    libvirt = None

REMOTE_SCHEMES = {"qemu+tcp": 16509, "qemu+tls": 16514, "qemu+ssh": 22, "qemu+libssh": 22, "qemu+libssh2": 22}
KEEPALIVE_INTERVAL_S = 2
KEEPALIVE_COUNT = 2
CONNECT_TIMEOUT_S = 2.0
PROBE_EVERY_S = 1.0
RECONNECT_MAX_S = 8.0

_loop_lock = threading.Lock()
_loop_pid = 0


def remote_endpoint(uri: str) -> tuple[str, int] | None:
    """(host, TCP port) that a remote URI connects to, or None for a local one."""
    parts = urlsplit(uri)
    default = REMOTE_SCHEMES.get(parts.scheme)
    if default is None or not parts.hostname:
        return None
    try:
        port = parts.port
    except ValueError:
        port = None
    return parts.hostname, port or default


def guest_address(uri: str, address: str = "") -> str:
    """The IPv4 address guests' ports bind to on the host and proxies dial.

    Raises OSError if the URI's host name does not resolve (the caller makes that a
    HostUnavailable: it may resolve later)."""
    if address:
        return address
    endpoint = remote_endpoint(uri)
    if endpoint is None:
        return "127.0.0.1"
    infos = socket.getaddrinfo(endpoint[0], None, socket.AF_INET, socket.SOCK_STREAM)
    return str(infos[0][4][0])


def reachable(endpoint: tuple[str, int], timeout_s: float = CONNECT_TIMEOUT_S) -> str | None:
    """None if a TCP connection to the host's libvirt (or ssh) port opens in time, else why not."""
    try:
        with socket.create_connection(endpoint, timeout=timeout_s):
            return None
    except OSError as exc:
        return f"{endpoint[0]}:{endpoint[1]} does not answer ({exc.strerror or exc})"


def pick_port(low: int, high: int, taken: set[int], rng: random.Random | None = None) -> int:
    """A random port in [low, high] not in `taken`. Random rather than the lowest free one:
    two proxies choosing for the same host at the same time rarely pick the same."""
    draw = rng.randint if rng is not None else random.randint
    free = high - low + 1 - sum(1 for p in taken if low <= p <= high)
    if free <= 0:
        raise ValueError(f"no free port left in {low}-{high}")
    for _ in range(64):
        port = draw(low, high)
        if port not in taken:
            return port
    return next(p for p in range(low, high + 1) if p not in taken)


def ensure_event_loop() -> None:
    """Run libvirt's default event loop in a daemon thread (keepalive and close callbacks
    need one). Once per process; again in a forked child, which has no such thread."""
    global _loop_pid
    import os

    if libvirt is None:
        return
    with _loop_lock:
        if _loop_pid == os.getpid():
            return
        if _loop_pid == 0:
            libvirt.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()

        threading.Thread(target=run, name="libvirt-events", daemon=True).start()
        _loop_pid = os.getpid()


@dataclass
class HostHealth:
    """Up/down of one host from probe results (sans I/O: the caller probes and sleeps).

    `probed` returns the transition ("down", "up" or None) and how long to wait before
    the next probe: every PROBE_EVERY_S while up, then 1, 2, 4 ... RECONNECT_MAX_S."""

    misses_to_down: int = 2
    up: bool = True
    misses: int = 0
    retry_s: float = PROBE_EVERY_S

    def probed(self, ok: bool) -> tuple[str | None, float]:
        if ok:
            self.misses = 0
            self.retry_s = PROBE_EVERY_S
            if not self.up:
                self.up = True
                return "up", PROBE_EVERY_S
            return None, PROBE_EVERY_S
        self.misses += 1
        if self.up:
            if self.misses < self.misses_to_down:
                return None, PROBE_EVERY_S
            self.up = False
            self.retry_s = PROBE_EVERY_S
            return "down", self.retry_s
        self.retry_s = min(RECONNECT_MAX_S, self.retry_s * 2)
        return None, self.retry_s
