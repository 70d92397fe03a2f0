"""The interface every instance driver implements: start, ready address, stop.

How this works: the engine decides *that* an instance should exist on a host; the
asyncio shell calls the host's driver to make it so. A driver returns as soon as the
instance has an address the proxy can reach (the VM or process may still be booting);
readiness is then detected by the proxy itself (`proxy.runtime.readiness`), the same way for
every driver, so boot-to-ready times are comparable across drivers.

Errors: a driver raises `BackendError` (or a subclass) for anything that goes wrong,
translating foreign exceptions (OSError, libvirt.libvirtError) with ``raise ... from``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from ..config import Address, Host, Route

if TYPE_CHECKING:
    from ..images.manifest import Image


@dataclass(frozen=True)
class InstanceSpec:
    """Everything a driver needs to start one instance."""

    instance_id: str  # unique, also used as the VM/domain name suffix
    route: Route
    host: Host
    image: Image
    start: str = "boot"  # "boot" or "restore" (a standby of a "resume" route is booted)
    background: bool = False  # a pre-summon: start at a low CPU priority until `Prioritised.foreground`


@dataclass
class Handle:
    """A started instance, as the driver knows it.

    `exited` resolves (with a short reason) if the instance dies on its own, so the
    shell can fail a boot early or replace a dead replica instead of waiting for a
    timeout.
    """

    instance_id: str
    address: Address
    exited: asyncio.Future[str]
    detail: dict[str, object] = field(default_factory=dict)


class Backend(Protocol):
    name: str

    async def start(self, spec: InstanceSpec) -> Handle:
        """Create the instance and return once it has a reachable address."""
        ...

    async def stop(self, handle: Handle) -> None:
        """Destroy the instance. Never raises for an instance that is already gone."""
        ...

    async def reap_orphans(self) -> list[str]:
        """Destroy instances this driver left behind in an earlier run; return their ids."""
        ...

    async def close(self) -> None:
        """Stop everything this driver started and release connections."""
        ...


@runtime_checkable
class Pausable(Protocol):
    """A driver that can keep an instance paused (`start = "resume"` standbys): its memory
    stays, its CPUs stop, and `resume` has it running again in far less than a boot."""

    async def pause(self, handle: Handle) -> None:
        """Stop the instance's CPUs, keeping its memory. Raises BackendError."""
        ...

    async def resume(self, handle: Handle) -> None:
        """Run a paused instance again. Raises BackendError."""
        ...

    def rss_mib(self, handle: Handle) -> float | None:
        """The host memory the instance holds now (resident set), or None if unknown."""
        ...


@runtime_checkable
class Prioritised(Protocol):
    """A driver that starts a `background` spec at a low CPU priority (processes: nice,
    `proxy.backends.priority`; libvirt: the domain's cgroup CPU share), so that on shared
    cores the starts a request waits for come first."""

    async def foreground(self, instance_id: str) -> None:
        """Give the instance the CPU like any other from now on (it may still be starting).
        Never raises for an instance that is gone."""
        ...


def image_target(host: Host) -> str | None:
    """The image target a host's driver boots: ``unix`` for processes, the host's arch
    (``x86_64``, ``aarch64``) for microVMs; None for a driver that needs no image files."""
    if host.backend == "process":
        return "unix"
    if host.backend == "libvirt":
        return host.arch
    return None
