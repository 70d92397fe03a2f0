"""systemd's readiness protocol (sd_notify), without libsystemd: one datagram per state
change to the unix socket systemd names in $NOTIFY_SOCKET.

    READY=1                      listening (worker 0, once its sockets and admin API are up)
    RELOADING=1 + MONOTONIC_USEC a SIGHUP reload starts (Type=notify-reload wants the clock)
    READY=1                      ...and is over, applied or refused
    STOPPING=1                   the first SIGTERM/SIGINT: draining
    STATUS=...                   a line `systemctl status` shows

With $NOTIFY_SOCKET unset (not under systemd) every call does nothing. The variable is
taken out of the environment when read, so the instances the process backend starts do
not inherit it (with NotifyAccess=all they could otherwise speak for summon). A socket
name starting with "@" is in the abstract namespace. A lost datagram is not an error:
systemd's own timeouts cover it, and summon must not stop over its supervisor.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger("summon.notify")


class Notifier:
    def __init__(self, address: str | None) -> None:
        if address and address.startswith("@"):
            address = "\0" + address[1:]
        self.address = address or None

    @classmethod
    def from_environ(cls, environ: dict[str, str] | None = None) -> Notifier:
        """Read (and remove) NOTIFY_SOCKET; call once, at the entry point."""
        env = os.environ if environ is None else environ
        return cls(env.pop("NOTIFY_SOCKET", None))

    def send(self, *fields: str) -> bool:
        """Send `fields` as one message; False when there is no socket or it failed."""
        if self.address is None:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.sendto("\n".join(fields).encode(), self.address)
        except OSError as exc:
            log.warning("sd_notify to %r failed: %s", self.address, exc)
            return False
        return True

    def ready(self, status: str = "") -> bool:
        return self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def reloading(self) -> bool:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self) -> bool:
        return self.send("STOPPING=1", "STATUS=draining")
